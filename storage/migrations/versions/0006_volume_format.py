"""Volumes as OME-Zarr: each dataset says in which format its volume is stored (``tiff``, the one TIFF file
of earlier versions, until the start-up conversion moves it; ``ome-zarr`` for every new one; ``link`` for a
stack on the server read where it lies, at ``linked_path``), and its
``sha256`` becomes the digest of the voxels once converted.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("volume_format", sa.String(16), nullable=False, server_default="tiff"))
        batch.add_column(sa.Column("linked_path", sa.String(1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("linked_path")
        batch.drop_column("volume_format")
