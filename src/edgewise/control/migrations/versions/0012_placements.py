"""placements: several models per device: placements within RAM/CPU budgets (issue 7)

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    # devices.desired_placements: the placements the control plane admitted (control.placements), published in the
    # desired state; devices.hosted: what the agent last reported of them (DeviceState.hosted).
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_placements", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("hosted", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("hosted")
        batch.drop_column("desired_placements")
