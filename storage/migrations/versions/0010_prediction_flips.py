"""A prediction can average the network's answers over the 8 flips and quarter turns of each tile
(test-time augmentation): fewer errors at the borders for 8× the time. Earlier predictions did not.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("tta", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("tta")
