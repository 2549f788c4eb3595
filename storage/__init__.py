"""Neuroseg's store: database rows (SQLAlchemy 2), the file store, and (coming) background jobs.
No Streamlit in here; pages call the functions in :mod:`storage.api` and get plain dataclasses back."""
