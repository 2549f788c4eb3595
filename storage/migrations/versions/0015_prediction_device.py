"""Where a prediction computes: "cpu", "cuda" or "dask" (blocks on a Dask cluster elsewhere), set by its
worker when it starts. A CPU training shares the cores only with the predictions that compute on this CPU;
earlier predictions have none (counted as the CPU while they run).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("device", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("device")
