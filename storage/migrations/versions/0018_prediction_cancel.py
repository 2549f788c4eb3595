"""A prediction can be cancelled: when it was asked to stop. Its process stops after the block it is on
(the blocks written are kept, and Resume goes on from them); one that ignores it is stopped by the
supervisor, as a training is.

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("cancel_requested", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("cancel_requested")
