"""`edgewise gateway`: a site gateway (site broker, store-and-forward bridge, artifact cache)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ._util import fail


def gateway(
    config: Path = typer.Option(..., "--config", help="gateway.toml (see docs/site-gateway.md)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run a site gateway: the site's devices use it as broker and server; it bridges to the control plane."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from ..agent.gateway import GatewayConfig, GatewayConfigError, run_gateway

    try:
        cfg = GatewayConfig.from_toml(config)
    except GatewayConfigError as exc:
        fail(str(exc), 2)
    try:
        run_gateway(cfg)
    except Exception as exc:  # noqa: BLE001 - a start failure (port taken, ...) is a message, not a traceback
        from ..broker import BrokerStartError

        if isinstance(exc, (BrokerStartError, OSError)):
            fail(f"the site gateway could not start: {exc}")
        raise
