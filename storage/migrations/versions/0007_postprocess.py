"""Each prediction says how its neurons were made from the probability map (``unet.prediction.postprocess.METHODS``):
the predictions of earlier versions used the seeded watershed.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("postprocess", sa.String(32), nullable=False, server_default="watershed"))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("postprocess")
