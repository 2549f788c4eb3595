"""The shared types of Neuroseg, a leaf that every layer may import and that imports nothing of the project
(only the standard library and NumPy): the kinds and statuses (:mod:`domain.kinds`, enums whose values are
what the database stores and whose ``label`` is what a page shows) and the records that cross the store's
boundary (:mod:`domain.records`: frozen dataclasses and the errors a caller can act on)."""
