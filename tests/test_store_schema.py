"""The schema: Alembic creates exactly what the models describe, on a real SQLite file."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from storage.db import make_engine, upgrade
from storage.models import Base


def test_migrations_create_the_models_schema_and_are_idempotent(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    upgrade(engine)  # a second start-up applies nothing and breaks nothing
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    tables = set(inspect(engine).get_table_names())
    assert {"datasets", "mask_versions", "runs", "run_masks", "metrics", "checkpoints", "predictions"} <= tables


def test_one_running_run_per_device_is_enforced_by_the_database(database_url):
    import pytest
    from sqlalchemy.exc import IntegrityError

    from storage.db import session_factory
    from storage.models import Run

    engine = make_engine(database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        s.add_all([Run(status="RUNNING", spec={}, config={}, device="cpu"),
                   Run(status="QUEUED", spec={}, config={}, device="cpu"),
                   Run(status="RUNNING", spec={}, config={}, device="cuda:0")])
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(Run(status="RUNNING", spec={}, config={}, device="cpu"))
