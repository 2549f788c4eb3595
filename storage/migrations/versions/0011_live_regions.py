"""A live viewer who zooms in says which region of the slice is on screen, and the live session predicts that
region first (the rest of the slice when nothing else waits); a live prediction says which region its newest
weights covered (none: the whole slice).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("live_viewers") as batch:
        batch.add_column(sa.Column("region", sa.String(64), nullable=True))
    with op.batch_alter_table("live_slices") as batch:
        batch.add_column(sa.Column("region", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("live_slices") as batch:
        batch.drop_column("region")
    with op.batch_alter_table("live_viewers") as batch:
        batch.drop_column("region")
