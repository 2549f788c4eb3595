"""The whole schema: datasets, mask versions, runs, run masks, metrics, checkpoints, predictions.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("z", sa.Integer, nullable=False),
        sa.Column("y", sa.Integer, nullable=False),
        sa.Column("x", sa.Integer, nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("source_name", sa.String(255), nullable=False),
        sa.Column("pixel_size_nm", sa.Float),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("notes", sa.Text, nullable=False),
    )
    op.create_table(
        "mask_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("slice_index", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("author", sa.String(100), nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("mask_versions.id", ondelete="SET NULL")),
        sa.Column("labelled_pixels", sa.Integer, nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.UniqueConstraint("dataset_id", "slice_index", "version", name="uq_mask_version"),
    )
    op.create_index("ix_mask_versions_dataset_id", "mask_versions", ["dataset_id"])
    run_fk = ([sa.ForeignKeyConstraint(["parent_checkpoint_id"], ["checkpoints.id"], ondelete="SET NULL",
                                       name="fk_runs_parent_checkpoint")] if sqlite else [])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("pid", sa.Integer),
        sa.Column("pid_started", sa.Double),
        sa.Column("heartbeat", TZ),
        sa.Column("cancel_requested", TZ),
        sa.Column("created", TZ, nullable=False),
        sa.Column("started", TZ),
        sa.Column("finished", TZ),
        sa.Column("error", sa.Text),
        sa.Column("parent_checkpoint_id", sa.Integer),
        *run_fk,
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("uq_one_running_per_device", "runs", ["device"], unique=True,
                    sqlite_where=sa.text("status = 'RUNNING'"), postgresql_where=sa.text("status = 'RUNNING'"))
    op.create_table(
        "run_masks",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("mask_version_id", sa.Integer, sa.ForeignKey("mask_versions.id", ondelete="RESTRICT"),
                  primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("time", sa.Double, nullable=False),
    )
    op.create_index("ix_metrics_run_key_step", "metrics", ["run_id", "key", "step"])
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("created", TZ, nullable=False),
    )
    op.create_index("ix_checkpoints_run_id", "checkpoints", ["run_id"])
    if not sqlite:
        op.create_foreign_key("fk_runs_parent_checkpoint", "runs", "checkpoints", ["parent_checkpoint_id"], ["id"],
                              ondelete="SET NULL")
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id", ondelete="CASCADE"), nullable=False),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON),
        sa.Column("created", TZ, nullable=False),
    )
    op.create_index("ix_predictions_checkpoint_id", "predictions", ["checkpoint_id"])
    op.create_index("ix_predictions_dataset_id", "predictions", ["dataset_id"])


def downgrade() -> None:
    for table in ("predictions", "metrics", "run_masks"):
        op.drop_table(table)
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("fk_runs_parent_checkpoint", "runs", type_="foreignkey")
    for table in ("checkpoints", "runs", "mask_versions", "datasets"):
        op.drop_table(table)
