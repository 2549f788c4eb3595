"""Neuroseg's store: database rows (SQLAlchemy 2), the file store, the job queue and its workers. No
Streamlit in here; pages call :class:`storage.service.Neuroseg` and get :mod:`domain.records` back."""
