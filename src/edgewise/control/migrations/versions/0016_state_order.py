"""state order: the device clock time of the newest state applied, so an older one that arrives later is ignored

Several ingest workers share the state stream (issue 9): a device's successive DeviceState messages may be stored by
different workers, and whichever commits last would win.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("last_state_ts", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("last_state_ts")
