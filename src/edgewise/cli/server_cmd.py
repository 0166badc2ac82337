"""`edgewise server`: the control plane."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ._util import explain, fail


def server(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Database and bundles (default: ./edgewise-data)."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default: 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="HTTP port (default: 8000)."),
    database_url: str | None = typer.Option(None, "--database-url", help="SQLAlchemy URL (default: SQLite in DATA_DIR)."),
    broker_url: str | None = typer.Option(None, "--broker-url", help="External MQTT broker, e.g. mqtt://127.0.0.1:1883 (default: embedded)."),
    mqtt_port: int | None = typer.Option(None, "--mqtt-port", help="Port of the embedded broker (default: 1883)."),
    public_url: str | None = typer.Option(None, "--public-url", help="Base URL devices download bundles from."),
    trust: list[Path] = typer.Option([], "--trust", help="Public key whose signed bundles may be uploaded (repeatable)."),
    mqtt_client_id: str | None = typer.Option(None, "--mqtt-client-id", help="Client id of the persistent MQTT session."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve HTTPS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    insecure_http: bool = typer.Option(
        False, "--insecure-http", help="Allow plain HTTP on a non-loopback --host (only behind a TLS-terminating proxy)."
    ),
    mosquitto: bool = typer.Option(
        False, "--mosquitto", help="Run a managed Mosquitto with mTLS, per-device ACLs and the fleet CRL (instead of the embedded broker)."
    ),
    mosquitto_port: int | None = typer.Option(None, "--mosquitto-port", help="TLS port of the managed Mosquitto (default: 8883)."),
    embedded_broker_auth: str | None = typer.Option(
        None, "--embedded-broker-auth", help="devices (default: every device logs in with its token, fenced to its topics) or open (laptop only)."
    ),
    alert_webhook: list[str] = typer.Option([], "--alert-webhook", help="URL every alert change is POSTed to as JSON (repeatable)."),
    role: str | None = typer.Option(
        None, "--role", help="all (default: everything in one process), api (HTTP only), ingest (one of several workers "
        "sharing the device stream; needs Mosquitto >= 2.0 or EMQX), engines (rollouts, alerts, FL; one holder by "
        "database lease). See docs/scale-out.md.",
    ),
    worker_id: str | None = typer.Option(None, "--worker-id", help="Names this process among its role's on one host "
                                         "(part of its MQTT client id; keep it across restarts)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run the control plane: REST API, dashboard, MQTT ingest, and the embedded broker unless told otherwise."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..control.server import run_server
    from ..control.services import ControlStartError
    from ..control.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(
            data_dir=data_dir, host=host, port=port, database_url=database_url, broker_url=broker_url,
            embedded_broker_port=mqtt_port, public_url=public_url, trust=list(trust) or None, mqtt_client_id=mqtt_client_id,
            tls_cert=tls_cert, tls_key=tls_key, insecure_http=insecure_http or None,
            mosquitto=mosquitto or None, mosquitto_port=mosquitto_port, embedded_broker_auth=embedded_broker_auth,
            alert_webhooks=list(alert_webhook) or None, role=role, worker_id=worker_id,
        )
        if settings.runs_api:
            run_server(settings, log_level=log_level.lower())
        else:
            from ..control.roles import run_headless
            from ..control.server import configure_logging

            configure_logging(log_level.lower())
            run_headless(settings)
    except (ControlStartError, ValueError) as exc:
        fail(f"control plane did not start: {explain(exc)}")
