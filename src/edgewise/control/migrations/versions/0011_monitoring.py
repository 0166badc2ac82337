"""monitoring: telemetry series columns, per-minute rollups, alert rules and alert states (issue 7)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

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
    _upgrade_monitor()


def downgrade() -> None:
    _downgrade_monitor()
    for table in ("telemetry", "summaries"):
        with op.batch_alter_table(table) as batch:
            for name, _ in reversed(HEALTH_COLUMNS):
                batch.drop_column(name)


# -- MONITOR: per-minute rollups, rollup cursors, alert rules, alert states ---------------------------

ALERT_COLUMNS = (
    ("rule_id", sa.Integer),
    ("subject", lambda: sa.String(160)),
    ("acknowledged_at", lambda: UTC),
    ("acknowledged_by", lambda: sa.String(160)),
    ("notified_status", lambda: sa.String(16)),
)


def _upgrade_monitor() -> None:
    op.create_table(
        "series_minutes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("latency_n", sa.Integer(), nullable=False),
        sa.Column("latency_p50_sum", sa.Float(), nullable=False),
        sa.Column("latency_p95_sum", sa.Float(), nullable=False),
        sa.Column("latency_p95_max", sa.Float(), nullable=True),
        sa.Column("cpu_n", sa.Integer(), nullable=False),
        sa.Column("cpu_sum", sa.Float(), nullable=False),
        sa.Column("mem_n", sa.Integer(), nullable=False),
        sa.Column("mem_sum", sa.Float(), nullable=False),
        sa.Column("rss_max", sa.BigInteger(), nullable=True),
        sa.Column("temperature_n", sa.Integer(), nullable=False),
        sa.Column("temperature_sum", sa.Float(), nullable=False),
        sa.Column("temperature_max", sa.Float(), nullable=True),
        sa.Column("drift_n", sa.Integer(), nullable=False),
        sa.Column("drift_sum", sa.Float(), nullable=False),
        sa.Column("drift_max", sa.Float(), nullable=True),
        sa.Column("outbox_max", sa.Integer(), nullable=True),
        sa.Column("dropped_max", sa.BigInteger(), nullable=True),
        sa.Column("shadow_compared", sa.Integer(), nullable=False),
        sa.Column("shadow_agreed", sa.Integer(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("confidence_hist", sa.JSON(), nullable=False),
        sa.Column("online", sa.Integer(), nullable=True),
        sa.UniqueConstraint("device_id", "minute", name="uq_series_minutes_device_minute"),
    )
    op.create_index("ix_series_minutes_minute", "series_minutes", ["minute"])
    op.create_table(
        "monitor_cursors",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
    )
    op.create_table(
        "alert_rules",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("metric", sa.String(32), nullable=True),
        sa.Column("op", sa.String(2), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("for_s", sa.Float(), nullable=False),
        sa.Column("group_name", sa.String(64), nullable=True),
        sa.Column("tag", sa.String(64), nullable=True),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("webhook_url", sa.String(1024), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
    )
    with op.batch_alter_table("alerts") as batch:
        for name, type_ in ALERT_COLUMNS:
            batch.add_column(sa.Column(name, type_(), nullable=True))
        batch.create_index("ix_alerts_rule_id", ["rule_id"])
    # "open" (issue 6's drift alerts) is now "firing"; alerts that existed before need no notification.
    alerts = sa.table("alerts", sa.column("status", sa.String), sa.column("notified_status", sa.String),
                      sa.column("device_id", sa.String), sa.column("model", sa.String),
                      sa.column("version", sa.String), sa.column("subject", sa.String))
    op.execute(sa.update(alerts).where(alerts.c.status == "open").values(status="firing"))
    op.execute(sa.update(alerts).values(notified_status=alerts.c.status))
    op.execute(sa.update(alerts).where(alerts.c.device_id.is_not(None)).values(subject="device:" + alerts.c.device_id))
    op.execute(sa.update(alerts).where(alerts.c.device_id.is_(None), alerts.c.model.is_not(None))
               .values(subject="model:" + alerts.c.model + "@" + sa.func.coalesce(alerts.c.version, "")))


def _downgrade_monitor() -> None:
    alerts = sa.table("alerts", sa.column("status", sa.String))
    op.execute(sa.update(alerts).where(alerts.c.status.in_(("firing", "acknowledged"))).values(status="open"))
    with op.batch_alter_table("alerts") as batch:
        batch.drop_index("ix_alerts_rule_id")
        for name, _ in reversed(ALERT_COLUMNS):
            batch.drop_column(name)
    op.drop_table("alert_rules")
    op.drop_table("monitor_cursors")
    op.drop_index("ix_series_minutes_minute", table_name="series_minutes")
    op.drop_table("series_minutes")
