"""Each single sign-on signs in once, while fresh: the answers already taken (a digest of the provider's
issuer, subject, issue time and nonce). Streamlit's cookie holding the answer lasts 30 days, is sent to every
port of the host and survives a sign-out; before this a copy of it signed anyone in.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "single_sign_ons",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("used", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_single_sign_ons_used", "single_sign_ons", ["used"])


def downgrade() -> None:
    op.drop_index("ix_single_sign_ons_used", table_name="single_sign_ons")
    op.drop_table("single_sign_ons")
