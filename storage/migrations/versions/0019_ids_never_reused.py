"""Ids are never handed out again (SQLite): a deleted prediction's, run's or dataset's number named the next one
too, so the audit trail's "prediction 2" meant two predictions and a crash's leftover folder met a new row.
SQLite reuses the largest rowid once its row is deleted unless the table is AUTOINCREMENT, which only a
rebuild of the table sets (PostgreSQL's sequences never reuse: nothing to do there).

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TABLES = ("datasets", "runs", "predictions", "checkpoints", "mask_versions", "users")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
