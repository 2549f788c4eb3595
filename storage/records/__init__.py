"""Records and files: datasets, slices and mask versions, drafts, runs, checkpoints and predictions as records,
the file store, volumes and packages on disk."""
