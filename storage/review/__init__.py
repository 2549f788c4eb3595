"""Review: the shared queue of where a correction helps most on a dataset (issue 29)."""
