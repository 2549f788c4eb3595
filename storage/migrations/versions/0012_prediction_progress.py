"""A prediction's progress as numbers: ``phase`` holds the stage alone (``predict``, ``linking``) and the new
``total`` the blocks in all (``done`` counts those written). Before, the total was written into the phase's
text (``predict 24``, ``instances 3/8``) and parsed back by the page.

Revision ID: 0012
Revises: 0011
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("total", sa.Integer(), nullable=False, server_default="0"))
    predictions = sa.table("predictions", sa.column("id", sa.Integer), sa.column("phase", sa.String),
                           sa.column("done", sa.Integer), sa.column("total", sa.Integer))
    conn = op.get_bind()
    for row in conn.execute(sa.select(predictions.c.id, predictions.c.phase)).all():
        text = row.phase or ""
        values: dict = {}
        if m := re.fullmatch(r"predict (\d+)", text):
            values = {"phase": "predict", "total": int(m.group(1))}
        elif m := re.fullmatch(r"instances (\d+)/(\d+)", text):
            values = {"phase": "predict", "total": int(m.group(2))}  # (``done`` counted its slices: kept)
        elif text.startswith("linking"):
            values = {"phase": "linking"}
        if values:
            conn.execute(sa.update(predictions).where(predictions.c.id == row.id).values(**values))


def downgrade() -> None:
    predictions = sa.table("predictions", sa.column("phase", sa.String), sa.column("total", sa.Integer))
    conn = op.get_bind()
    conn.execute(sa.update(predictions).where(predictions.c.phase == "predict")
                 .values(phase=sa.literal("predict ") + sa.cast(predictions.c.total, sa.String)))
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("total")
