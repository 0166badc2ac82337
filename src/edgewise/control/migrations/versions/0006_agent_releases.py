"""agent releases: stored signed releases, the desired agent per device, agent deployments

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agent_releases",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(64), nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("uploaded_at", UTC, nullable=False),
    )
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_agent", sa.JSON(), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("agent_version", sa.String(64), nullable=True))
        # an agent-only deployment names no model
        batch.alter_column("model", existing_type=sa.String(64), nullable=True)
        batch.alter_column("version", existing_type=sa.String(128), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM deployments WHERE model IS NULL OR version IS NULL")
    with op.batch_alter_table("deployments") as batch:
        batch.alter_column("version", existing_type=sa.String(128), nullable=False)
        batch.alter_column("model", existing_type=sa.String(64), nullable=False)
        batch.drop_column("agent_version")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_agent")
    op.drop_table("agent_releases")
