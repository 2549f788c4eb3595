"""One engine and one session factory per process. The schema is brought up to date by Alembic once, when
the server starts (or by ``python -m storage migrate``), not by every worker. SQLite gets WAL, foreign
keys and a busy timeout on every connection."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from storage import logs
from storage.records.datasets import convert_legacy_predictions, convert_legacy_volumes
from storage.records.files import FileStore
from storage.records.volumes import remove_partials

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every Alembic migration not yet applied up to ``revision`` (the first one creates the whole
    schema; tests build the stores of earlier versions with an earlier revision)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:  # SQLite alters a table by copying it; dropping the old copy with foreign keys on would
            # cascade into the rows that refer to it (the masks of a dataset), so they are off meanwhile
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:  # rolls the migration back
                        raise RuntimeError(f"the migrated store has broken references: {broken[:5]}")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def open_store(settings, *, migrate: bool = False) -> tuple[sessionmaker[Session], FileStore]:
    """The session factory and the file store of ``settings``. ``migrate=True`` (the server's start, the
    ``migrate`` command) first creates the data directory, brings the schema up to date and moves volumes
    stored by earlier versions into the OME-Zarr store (:func:`storage.records.datasets.convert_legacy_volumes`);
    workers, started by a server, open the store as it is."""
    logs.configure()  # the store's log lines to stderr, unless this process chose (a job: stdout)
    engine = make_engine(settings.database_url)
    sessions, store = session_factory(engine), FileStore(settings.data_dir)
    if migrate:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(engine)
        remove_partials(store.root)
        with sessions() as session:
            convert_legacy_volumes(session, store)
        with sessions() as session:
            convert_legacy_predictions(session, store)
    return sessions, store

