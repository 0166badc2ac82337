"""rollouts: staged rollouts: waves, gates, decisions, per-device progress (issue 7)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_shadow", sa.JSON(), nullable=True))
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target_value", sa.String(512), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(160), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("finished_at", UTC, nullable=True),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_cohorts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("cohort", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(24), nullable=False),
        sa.Column("phase_started_at", sa.Float(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.UniqueConstraint("rollout_id", "cohort", name="uq_rollout_cohorts_rollout_cohort"),
    )
    op.create_index("ix_rollout_cohorts_rollout_id", "rollout_cohorts", ["rollout_id"])
    op.create_table(
        "rollout_devices",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("cohort", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_model", sa.String(64), nullable=True),
        sa.Column("previous_version", sa.String(128), nullable=True),
        sa.Column("shadow_at", sa.Float(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("reverted_at", sa.Float(), nullable=True),
        sa.Column("since_telemetry_id", sa.BigInteger(), nullable=False),
        sa.Column("since_summary_id", sa.BigInteger(), nullable=False),
        sa.Column("since_event_id", sa.BigInteger(), nullable=False),
        sa.Column("baseline", sa.JSON(), nullable=False),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_rollout_device"),
    )
    op.create_index("ix_rollout_devices_rollout_id", "rollout_devices", ["rollout_id"])
    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("cohort", sa.String(64), nullable=True),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(160), nullable=True),
    )
    op.create_index("ix_rollout_decisions_rollout_id", "rollout_decisions", ["rollout_id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_decisions_rollout_id", table_name="rollout_decisions")
    op.drop_table("rollout_decisions")
    op.drop_index("ix_rollout_devices_rollout_id", table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollout_cohorts_rollout_id", table_name="rollout_cohorts")
    op.drop_table("rollout_cohorts")
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_shadow")
