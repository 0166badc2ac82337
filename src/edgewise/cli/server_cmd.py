"""`edgewise server`: the control plane."""

from __future__ import annotations

import logging
from pathlib import Path

import typer


def server(
    data_dir: Path = typer.Option(Path("edgewise-data"), "--data-dir", help="Database, bundles and broker state."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    database_url: str | None = typer.Option(None, "--database-url", help="SQLAlchemy URL [default: SQLite in DATA_DIR]."),
    broker_url: str | None = typer.Option(None, "--broker-url", help="External MQTT broker, e.g. mqtt://127.0.0.1:1883 [default: embedded]."),
    mqtt_port: int = typer.Option(1883, "--mqtt-port", help="Port of the embedded broker."),
    public_url: str | None = typer.Option(None, "--public-url", help="Base URL devices download bundles from."),
    trust: list[Path] = typer.Option([], "--trust", help="Public key whose signed bundles may be uploaded (repeatable)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run the control plane: REST API, dashboard, MQTT ingest, and the embedded broker unless told otherwise."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..control.server import run_server
    from ..control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=data_dir, host=host, port=port, database_url=database_url, broker_url=broker_url,
        embedded_broker_port=mqtt_port, public_url=public_url, trust=list(trust),
    )
    run_server(settings)
