"""Users (local accounts and single sign-on), signed-in browsers, the audit trail, and an owner for every
dataset, run and prediction. A store made before accounts existed keeps everything: when it holds any
rows, an ``admin`` account without a password is made here and owns them; the server gives it a one-time
password at its next start (``storage.auth.accounts.ensure_admin``).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

OWNED = ("datasets", "runs", "predictions")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("display_name", sa.String(200), nullable=False, server_default=""),
        sa.Column("email", sa.String(320), nullable=False, server_default=""),
        sa.Column("role", sa.String(16), nullable=False, server_default="viewer"),
        sa.Column("password_hash", sa.String(255)),
        sa.Column("must_change_password", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("oidc_issuer", sa.String(500)),
        sa.Column("oidc_subject", sa.String(255)),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("max_queued_runs", sa.Integer, nullable=False, server_default="1"),
        sa.Column("failed_sign_ins", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", sa.DateTime(timezone=True)),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_sign_in", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("oidc_issuer", "oidc_subject", name="uq_user_oidc"),
    )
    op.create_table(
        "sign_ins",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("address", sa.String(64), nullable=False, server_default=""),
        sa.Column("method", sa.String(16), nullable=False, server_default="password"),
    )
    op.create_index("ix_sign_ins_user_id", "sign_ins", ["user_id"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("username", sa.String(64), nullable=False, server_default=""),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(120), nullable=False, server_default=""),
        sa.Column("outcome", sa.String(16), nullable=False, server_default="ok"),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("address", sa.String(64), nullable=False, server_default=""),
    )
    op.create_index("ix_audit_time", "audit", ["time"])
    op.create_index("ix_audit_user_id", "audit", ["user_id"])
    op.create_index("ix_audit_action", "audit", ["action"])
    for table in OWNED:  # on SQLite the table is copied: storage.db.upgrade turns foreign keys off for it
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("owner_id", sa.Integer))
            batch.create_foreign_key(f"fk_{table}_owner", "users", ["owner_id"], ["id"], ondelete="SET NULL")
            batch.create_index(f"ix_{table}_owner_id", ["owner_id"])

    conn = op.get_bind()
    if any(conn.execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1")).first() for table in OWNED):
        users = sa.table("users", sa.column("username"), sa.column("display_name"), sa.column("role"),
                         sa.column("must_change_password"), sa.column("max_queued_runs"))
        conn.execute(users.insert().values(username="admin", display_name="Administrator", role="admin",
                                           must_change_password=True, max_queued_runs=1))
        admin = conn.execute(sa.text("SELECT id FROM users WHERE username = 'admin'")).scalar_one()
        for table in OWNED:
            conn.execute(sa.text(f"UPDATE {table} SET owner_id = :admin"), {"admin": admin})


def downgrade() -> None:
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_owner_id")
            batch.drop_constraint(f"fk_{table}_owner", type_="foreignkey")
            batch.drop_column("owner_id")
    op.drop_table("audit")
    op.drop_table("sign_ins")
    op.drop_table("users")
