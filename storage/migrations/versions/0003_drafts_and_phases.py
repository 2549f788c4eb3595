"""Drafts of unsaved edits kept in the store; what a run or a prediction is doing now; restore lineage.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drafts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("slice_index", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_mask_id", sa.Integer),
        sa.Column("latest_id", sa.Integer),
        sa.Column("prediction_id", sa.Integer),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("changed_pixels", sa.Integer, nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("dataset_id", "slice_index", "owner", name="uq_draft_slice_owner"),
    )
    op.create_index("ix_drafts_dataset_id", "drafts", ["dataset_id"])
    op.create_index("ix_drafts_owner", "drafts", ["owner"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("phase", sa.String(120), nullable=False, server_default=""))
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("phase", sa.String(120), nullable=False, server_default=""))
    with op.batch_alter_table("mask_versions") as batch:
        batch.add_column(sa.Column("restored_from_id", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("mask_versions") as batch:
        batch.drop_column("restored_from_id")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("phase")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("phase")
    op.drop_table("drafts")
