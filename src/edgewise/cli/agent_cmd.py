"""`edgewise agent`: the long-running device agent."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import typer

from ._util import explain, fail


def agent(
    state_dir: Path = typer.Option(..., "--state-dir", help="The agent's home: config, keys, slots, outbox."),
    server: str | None = typer.Option(None, "--server", help="Control plane base URL, e.g. http://127.0.0.1:8000."),
    broker: str | None = typer.Option(None, "--broker", help="MQTT broker URL (default: the server's host, port 1883)."),
    device_id: str | None = typer.Option(None, "--device-id", help="This device's id (default: from config, else hostname)."),
    api_port: int | None = typer.Option(None, "--api-port", help="Local API port on 127.0.0.1 (0 = any free port)."),
    telemetry_interval: float | None = typer.Option(None, "--telemetry-interval", help="Seconds between telemetry samples."),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    bandwidth: str | None = typer.Option(None, "--bandwidth", help="Telemetry bandwidth mode: full, summary or alerts-only (default: full)."),
    tag: list[str] = typer.Option([], "--tag", help="Device tag (repeatable), applied when the device first registers."),
    trust: list[Path] = typer.Option([], "--trust", help="Public key to trust for bundles (copied into STATE/trust)."),
    tuf_root: Path | None = typer.Option(
        None, "--tuf-root", help="The control plane's TUF root.json (copied to STATE/trust/root.json): updates are installed only as TUF-signed targets.",
    ),
    update_trust: str | None = typer.Option(None, "--update-trust", help="tuf (default) or signature-only (no TUF repository)."),
    peer_port: int | None = typer.Option(None, "--peer-port", help="Serve verified bundles to peers on this port (0 = any free port); docs/peer-distribution.md."),
    peer_mdns: bool | None = typer.Option(None, "--peer-mdns/--no-peer-mdns", help="Advertise and find peers by mDNS (needs the peer extra: pip install edgewise\\[peer])."),
    install: Path | None = typer.Option(None, "--install", help="Install this local bundle first (seed a device offline)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run the device agent: serve predictions offline, converge to the desired model, report back."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..agent.config import load_config
    from ..agent.service import Agent, run_agent

    overrides = {
        k: v
        for k, v in dict(
            device_id=device_id, server_url=server, broker_url=broker, api_port=api_port,
            telemetry_interval_s=telemetry_interval, threads=threads, tags=tag or None,
            bandwidth_mode=bandwidth, update_trust=update_trust, peer_port=peer_port, peer_mdns=peer_mdns,
        ).items()
        if v is not None
    }
    try:
        config = load_config(state_dir, **overrides)
    except ValueError as exc:
        fail(f"agent configuration: {explain(exc)}")
    if trust:
        config.trust_dir.mkdir(parents=True, exist_ok=True)
        for key in trust:
            if not key.is_file():
                fail(f"--trust {key}: no such file")
            shutil.copy(key, config.trust_dir / key.name)
    if tuf_root:
        from ..agent.tuf_client import install_root

        try:
            install_root(tuf_root, config.tuf_root_path)
        except ValueError as exc:
            fail(f"--tuf-root {tuf_root}: {exc}")
    if install:
        seed = Agent(config)
        try:
            result = seed.install(install)
        finally:
            seed.stop()
        if result.result != "ok":
            fail(f"cannot install {install}: {result.reason}")
    code = run_agent(config)  # 3: refused modified code (integrity); 75: restart into a new agent release
    if code:
        raise typer.Exit(code)
