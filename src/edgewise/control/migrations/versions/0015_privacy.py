"""privacy: per-device telemetry privacy setting published in the desired state (issue 8, part FL2)

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # devices.desired_privacy: {mechanism, epsilon_per_report, budget_per_day, delta} (protocol TelemetryPrivacy) or
    # NULL (histograms sent as counted); set with PUT /api/v1/privacy (control.privacy).
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_privacy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_privacy")
