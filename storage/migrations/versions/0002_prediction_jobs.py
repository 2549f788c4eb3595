"""Predictions run as background jobs: their slices, status, progress, process and files.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("slices", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="FINISHED"))
        batch.add_column(sa.Column("done", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("error", sa.Text))
        batch.add_column(sa.Column("pid", sa.Integer))
        batch.add_column(sa.Column("pid_started", sa.Double))
        batch.add_column(sa.Column("files", sa.JSON, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        for name in ("files", "pid_started", "pid", "error", "done", "status", "slices"):
            batch.drop_column(name)
