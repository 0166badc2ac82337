"""targeting: device capabilities, groups (saved queries), model variants and per-device overrides (issue 7)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("variant", sa.String(64), nullable=False, server_default="default"))
        batch.drop_constraint("uq_model_versions_name_version", type_="unique")
        batch.create_unique_constraint("uq_model_versions_name_version_variant", ["name", "version", "variant"])
    # Bundles stored before variants were distinguished: their manifest names the variant, if any.
    conn = op.get_bind()
    mv = sa.table("model_versions", sa.column("id", sa.Integer), sa.column("manifest", sa.JSON),
                  sa.column("variant", sa.String))
    for row_id, manifest in conn.execute(sa.select(mv.c.id, mv.c.manifest)).all():
        name = ((manifest or {}).get("variant") or {}).get("name") if isinstance(manifest, dict) else None
        if name:
            conn.execute(sa.update(mv).where(mv.c.id == row_id).values(variant=str(name)[:64]))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_variant", sa.String(64), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("variants", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("query", sa.JSON(), nullable=False),
        sa.Column("maintenance", sa.JSON(), nullable=False),
        sa.Column("rate_limit_per_min", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
    )
    op.create_table(
        "variant_overrides",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("created_by", sa.String(160), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("variant_overrides")
    op.drop_table("groups")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("variants")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_variant")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint("uq_model_versions_name_version_variant", type_="unique")
        batch.create_unique_constraint("uq_model_versions_name_version", ["name", "version"])
        batch.drop_column("variant")
