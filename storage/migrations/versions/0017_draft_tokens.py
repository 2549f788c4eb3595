"""Which tab's edit a kept draft is: a token written with every keep. A tab keeps its draft only over the
one it last kept or loaded (else another tab or browser of the same user changed it meanwhile, and it is
asked which to keep instead of overwriting it); a save forgets only the draft it was. Earlier drafts have
none (any tab may keep over them).

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.add_column(sa.Column("token", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.drop_column("token")
