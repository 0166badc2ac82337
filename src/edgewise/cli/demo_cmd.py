"""`edgewise demo`: everything at once, on embedded defaults."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import typer

from ._util import fail, print_json


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def demo(
    agents: int = typer.Option(3, "--agents", "-n", min=1, max=50, help="Number of agent processes."),
    samples: int = typer.Option(60, "--samples", min=1, help="Held-out digits each agent classifies per version."),
    port: int = typer.Option(8000, "--port", help="Control plane HTTP port (the dashboard)."),
    workdir: Path | None = typer.Option(None, "--workdir", help="Keep all files here (default: a temporary folder)."),
    keep_running: bool = typer.Option(False, "--keep-running", help="Leave the fleet up with the dashboard until Ctrl-C."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Train, sign, deploy and update a model on a local fleet; print what came back."""
    from rich.console import Console
    from rich.table import Table

    from ..sim.demo import FleetError, run_demo

    err = Console(stderr=True)
    if not _port_free(port):
        if keep_running:
            fail(f"port {port} is in use; pick another with --port")
        err.print(f"[yellow]port {port} is in use; using a free port instead[/yellow]")
        port = 0

    def hold(url: str) -> None:
        err.print(f"[bold green]fleet is up:[/bold green] dashboard at {url} - press Ctrl-C to stop")
        stop = threading.Event()
        # Ctrl-C, or SIGTERM from a service manager: either shuts everything down cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass

    with err.status("starting") as status:
        try:
            result = run_demo(
                agents=agents, samples_per_agent=samples, workdir=workdir, port=port,
                keep_running=hold if keep_running else None,
                progress=lambda msg: (status.update(msg), err.log(msg)),
            )
        except FleetError as exc:
            fail(str(exc))
    if as_json:
        print_json(result.to_json())
        return
    t = Table(title=f"edgewise demo: {result.devices} devices, digits {result.final_version}")
    for col in ("device", "version", "served", "accuracy", "p95 ms", "records sent", "received"):
        t.add_column(col, justify="right" if col not in ("device", "version") else "left")
    for d in result.per_device:
        t.add_row(
            d.device_id, d.version or "-", str(d.inferences),
            f"{d.correct / d.inferences:.1%}" if d.inferences else "-",
            f"{d.p95_ms:.3f}" if d.p95_ms is not None else "-",
            str(d.telemetry_issued), str(d.telemetry_received),
        )
    out = Console()
    out.print(t)
    out.print(
        f"deployed {result.deployed}/{result.devices} · {result.inferences} inferences · accuracy {result.accuracy:.1%} · "
        f"telemetry received {result.telemetry_received}, lost {result.telemetry_lost} · {result.wall_time_s:.1f} s"
    )
