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


def test_a_predictions_progress_becomes_numbers_and_the_page_reads_them(database_url):
    """0012: the blocks in all leave the phase's text (``predict 24``, ``instances 3/8``) for a column, and the
    progress bar is computed from the numbers."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from domain.kinds import PredictionStage, RunStatus
    from domain.records import PredictionInfo
    from ui.prediction import progress

    engine = make_engine(database_url)
    upgrade(engine, "0011")
    with engine.begin() as conn:
        now = datetime.now(UTC)
        conn.execute(text("INSERT INTO datasets (id, name, z, y, x, dtype, source_name, sha256, size_bytes, created,"
                          " notes, volume_format) VALUES (1, 'd', 9, 8, 8, 'uint8', 'd.tif', 'x', 1, :t, '',"
                          " 'ome-zarr')"), {"t": now})
        conn.execute(text("INSERT INTO runs (id, status, kind, spec, config, device, created, phase) VALUES "
                          "(1, 'FINISHED', 'train', '{}', '{}', 'cpu', :t, '')"), {"t": now})
        conn.execute(text("INSERT INTO checkpoints (id, run_id, step, kind, file, sha256, metrics, created) VALUES "
                          "(1, 1, 5, 'best', 'c', 's', '{}', :t)"), {"t": now})
        for pid, done, phase in ((1, 5, "predict 24"), (2, 8, "instances 3/8"), (3, 9, "linking 3D neurons"),
                                 (4, 0, "")):
            conn.execute(text("INSERT INTO predictions (id, checkpoint_id, dataset_id, file, sha256, created, slices,"
                              " status, done, phase, files, postprocess) VALUES (:id, 1, 1, 'p', 's', :t, "
                              "'[0,1,2,3,4,5,6,7]', 'RUNNING', :done, :phase, '{}', 'watershed')"),
                         {"id": pid, "t": now, "done": done, "phase": phase})
    upgrade(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, phase, done, total FROM predictions ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, "predict", 5, 24), (2, "predict", 8, 8), (3, "linking", 9, 0),
                                        (4, "", 0, 0)]
    job = PredictionInfo(1, 1, 1, 1, list(range(8)), RunStatus.RUNNING, 5, None, None, datetime.now(UTC),
                         stage=PredictionStage.PREDICT, total=24)
    assert progress(job) == (5 / 24, "5 of 24 blocks written (a block is a slice, or a tile of a large slice)")
    assert progress(PredictionInfo(1, 1, 1, 1, [0], RunStatus.RUNNING, 0, None, None, datetime.now(UTC),
                                   stage=PredictionStage.LINKING))[0] == 0.99


def test_a_deleted_rows_id_is_never_handed_out_again(database_url):
    """0019: SQLite handed the largest id out again once its row was deleted (the audit trail's "prediction 2"
    then meant two predictions); its tables are AUTOINCREMENT now, rows kept, as PostgreSQL's sequences are."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    engine = make_engine(database_url)
    upgrade(engine, "0018")
    insert = text("INSERT INTO datasets (name, z, y, x, dtype, source_name, sha256, size_bytes, created, notes, "
                  "volume_format) VALUES (:n, 2, 8, 8, 'uint8', 'd.tif', 'x', 1, :t, '', 'ome-zarr')")
    with engine.begin() as conn:
        for name in ("a", "b", "gone"):
            conn.execute(insert, {"n": name, "t": datetime.now(UTC)})
        conn.execute(text("DELETE FROM datasets WHERE name = 'gone'"))  # before 0019: the trail still names it
        conn.execute(text("INSERT INTO audit (time, username, action, target, outcome, detail, address) VALUES "
                          "(:t, 'ann', 'delete', 'dataset 3', 'ok', '', '')"), {"t": datetime.now(UTC)})
    upgrade(engine)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT id, name FROM datasets ORDER BY id")).all() == [(1, "a"), (2, "b")]
        conn.execute(text("DELETE FROM datasets WHERE id = 2"))
        conn.execute(insert, {"n": "c", "t": datetime.now(UTC)})
        # neither 2 (deleted now) nor 3 (deleted before, named by the trail) again
        assert conn.execute(text("SELECT id FROM datasets WHERE name = 'c'")).scalar() == 4
