"""federated: federated-learning jobs, rounds, updates and pinned device keys (issue 8, part FL-SYSTEM)

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fl_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("base_version", sa.String(64), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("weights_version", sa.Integer(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=True),
        sa.Column("privacy", sa.JSON(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("base_accuracy", sa.Float(), nullable=True),
        sa.Column("result_version", sa.String(64), nullable=True),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("finished_at", UTC, nullable=True),
    )
    op.create_index("ix_fl_jobs_state", "fl_jobs", ["state"])
    op.create_table(
        "fl_rounds",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("fl_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cohort", sa.JSON(), nullable=False),
        sa.Column("population", sa.Integer(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("opened_at", UTC, nullable=False),
        sa.Column("deadline_at", UTC, nullable=False),
        sa.Column("closed_at", UTC, nullable=True),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("late", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("clipped", sa.Integer(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.UniqueConstraint("job_id", "number", name="uq_fl_rounds_job_number"),
    )
    op.create_index("ix_fl_rounds_job_id", "fl_rounds", ["job_id"])
    op.create_table(
        "fl_updates",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("counted_in", sa.Integer(), nullable=True),
        sa.Column("delta", sa.LargeBinary(), nullable=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.UniqueConstraint("job_id", "device_id", "round", name="uq_fl_updates_job_device_round"),
    )
    op.create_index("ix_fl_updates_job_id", "fl_updates", ["job_id"])
    op.create_index("ix_fl_updates_status", "fl_updates", ["status"])
    op.create_table(
        "fl_device_keys",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("pinned_at", UTC, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fl_device_keys")
    op.drop_index("ix_fl_updates_status", table_name="fl_updates")
    op.drop_index("ix_fl_updates_job_id", table_name="fl_updates")
    op.drop_table("fl_updates")
    op.drop_index("ix_fl_rounds_job_id", table_name="fl_rounds")
    op.drop_table("fl_rounds")
    op.drop_index("ix_fl_jobs_state", table_name="fl_jobs")
    op.drop_table("fl_jobs")
