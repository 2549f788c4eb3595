"""The live loop and held-out scores: what a live session predicted for whom (``live_slices``,
``live_viewers``), a dataset's frozen held-out slices and default model, and each run's held-out scores.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "live_slices",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("slice_index", sa.Integer, primary_key=True),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("masks_seen", sa.Integer, nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "live_viewers",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("slice_index", sa.Integer, nullable=False),
        sa.Column("seen", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("held_out", sa.JSON, nullable=True))
        batch.add_column(sa.Column("held_out_version", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("default_checkpoint_id", sa.Integer, nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("held_out", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("held_out")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("default_checkpoint_id")
        batch.drop_column("held_out_version")
        batch.drop_column("held_out")
    op.drop_table("live_viewers")
    op.drop_table("live_slices")
