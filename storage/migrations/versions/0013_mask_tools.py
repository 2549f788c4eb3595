"""A mask version records which tools made it (the brush, Accept of a live prediction, the object tools of
issue 29: accept, merge, split, erase, fill, don't know), as a JSON list; none for the versions
saved before.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mask_versions") as batch:
        batch.add_column(sa.Column("tools", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mask_versions") as batch:
        batch.drop_column("tools")
