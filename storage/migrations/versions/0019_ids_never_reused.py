"""Ids are never handed out again (SQLite): a deleted prediction's, run's or dataset's number named the next one
too, so the audit trail's "prediction 2" meant two predictions and a crash's leftover folder met a new row.
SQLite reuses the largest rowid once its row is deleted unless the table is AUTOINCREMENT, which only a
rebuild of the table sets (PostgreSQL's sequences never reuse: nothing to do there). Ids the audit trail names
whose rows were deleted before this count as used too.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TABLES = ("datasets", "runs", "predictions", "checkpoints", "mask_versions", "users")


#: the audit trail's name of each table's rows ("prediction 2"): the ids a store handed out before this, whose
#: rows may be gone (the sequence starts above the largest of them, not only above the rows left)
NAMED = {"datasets": "dataset", "runs": "run", "predictions": "prediction", "checkpoints": "checkpoint"}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass
    for table, word in NAMED.items():
        used = [int(t.split(" ", 1)[1]) for (t,) in bind.exec_driver_sql(
            "SELECT DISTINCT target FROM audit WHERE target LIKE ?", (f"{word} %",)) if t.split(" ", 1)[1].isdigit()]
        highest = max(used, default=0)
        known = bind.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).scalar()
        if known is None and highest:
            bind.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, highest))
        elif known is not None and highest > known:
            bind.exec_driver_sql("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (highest, table))


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
