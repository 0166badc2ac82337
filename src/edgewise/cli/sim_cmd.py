"""`edgewise sim`: many simulated devices against a real broker and control plane (one process, or several)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from ._util import explain, fail, print_json


def sim(
    devices: int = typer.Option(10, "--devices", "-n", min=1, max=100_000, help="Number of simulated devices."),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker", help="MQTT broker the devices connect to."),
    server: str | None = typer.Option(None, "--server", help="Control plane URL (needed when the broker wants device tokens)."),
    token: str | None = typer.Option(None, "--token", envvar="EDGEWISE_API_TOKEN",
                                     help="Operator API token, to get a device token per device (default $EDGEWISE_API_TOKEN)."),
    profile: str = typer.Option("healthy", "--profile",
                                help="Profile mix, e.g. 'healthy:90,slow(3):4,crashing:2,drifted(2):2,offline(30,20):2'."),
    hardware: str = typer.Option("rpi4,x86-small", "--hardware", help="Hardware classes, assigned round-robin."),
    tag: list[str] = typer.Option(["sim"], "--tag", help="Tag every device carries (repeatable)."),
    prefix: str = typer.Option("sim", "--prefix", help="Device ids are PREFIX-00001, PREFIX-00002, ..."),
    behaviours: Path | None = typer.Option(None, "--behaviours", exists=True, dir_okay=False,
                                           help='JSON file {"VERSION": {"latency_ms": {"*": 10}, "error_rate": 0, "crash": false, '
                                                '"shadow_agreement": 1, "confidence_shift": 0}, ...}.'),
    telemetry_s: float = typer.Option(1.0, "--telemetry-s", min=0.01, help="Telemetry interval (simulated seconds)."),
    install_s: float = typer.Option(0.5, "--install-s", min=0.0, help="How long an install takes (simulated seconds)."),
    record: str = typer.Option("telemetry", "--record", help="What the devices send: telemetry or summary."),
    time_scale: float = typer.Option(1.0, "--time-scale", min=0.001, help="Simulated seconds per wall-clock second."),
    duration: float = typer.Option(0.0, "--duration", min=0.0, help="Wall-clock seconds to run (0: until Ctrl-C)."),
    processes: int = typer.Option(1, "--processes", "-p", min=1, max=64,
                                  help="Split the devices over this many processes (e.g. 4 for 10,000 devices on 4 cores)."),
    first: int = typer.Option(0, "--first", min=0, hidden=True, help="(worker) index of this process's first device."),
    total: int = typer.Option(0, "--total", min=0, hidden=True, help="(worker) devices of the whole fleet."),
    download: bool = typer.Option(False, "--download", help="Download each desired bundle (peers named in the desired state "
                                  "first, then --server with --token) and check its sha256 before the simulated install."),
    peers: bool = typer.Option(False, "--peers", help="Also serve downloaded bundles to the other devices (peer distribution; "
                               "implies --download): devices report peer_url/holds and the control plane hints them."),
    running: str | None = typer.Option(None, "--running", help="MODEL:VERSION every device runs at start (as if it kept its "
                                       "installed model across a restart); default: none until its desired state says."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as one JSON object."),
) -> None:
    """Run simulated devices that register, follow desired state and send telemetry, then print what they did."""
    from ..sim.behaviour import VersionBehaviour, assign, parse_mix
    from ..sim.virtual import VirtualFleet, VirtualFleetError, specs_for

    if record not in ("telemetry", "summary"):
        fail(f"--record {record!r}: use telemetry or summary")
    try:
        mix = parse_mix(profile)
    except ValueError as exc:
        fail(str(exc))
    initial: dict[str, str] = {}
    if running is not None:
        model_name, _, model_version = running.partition(":")
        if not model_name or not model_version:
            fail(f"--running {running!r}: use MODEL:VERSION, e.g. --running digits:1.1.0")
        initial = {"model": model_name, "version": model_version}
    classes = [c.strip() for c in hardware.split(",") if c.strip()]
    if not classes:
        fail("--hardware names no hardware class (e.g. --hardware rpi4,x86-small)")
    table: dict[str, VersionBehaviour] = {}
    if behaviours is not None:
        try:
            raw = json.loads(behaviours.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("the top level must be an object {version: behaviour}")
            table = {str(k): VersionBehaviour.model_validate(v) for k, v in raw.items()}
        except (ValueError, OSError) as exc:
            fail(f"--behaviours {behaviours}: {explain(exc)}")
    if processes > 1:
        if processes > devices:
            fail(f"--processes {processes} is more than --devices {devices}")
        summary = _run_workers(devices, processes, duration, as_json)
    else:
        whole = max(total, first + devices)
        try:
            specs = specs_for(devices, prefix=prefix, profiles=assign(mix, whole), hardware_classes=classes, tags=tag,
                              start=first, total=whole, telemetry_s=telemetry_s, install_s=install_s, record=record, **initial)
            fleet = VirtualFleet(broker, server, token, specs, table, time_scale=time_scale, download=download, serve_peers=peers)
        except (ValueError, VirtualFleetError) as exc:
            fail(explain(exc))
        summary = _run_one(fleet, duration, quiet=as_json)
    summary["profiles"] = {p.describe(): w for p, w in mix}
    if as_json:
        print_json(summary)
    else:
        for k, v in summary.items():
            typer.echo(f"{k:20} {v}")
    if summary["connects"] == 0:
        fail(f"no device connected to {broker} (refused: {summary['refused_connections']}); is the broker up, "
             "and does it need --server/--token for device tokens?")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _run_one(fleet: Any, duration: float, *, quiet: bool) -> dict[str, Any]:
    """Run one fleet in this process until ``duration`` or a signal; its summary."""
    from ..sim.virtual import VirtualFleetError

    started = time.monotonic()
    stop = _stop_on_signals()
    try:
        fleet.start()
    except VirtualFleetError as exc:
        fail(str(exc))
    try:
        last = 0.0
        while not stop.wait(0.25):
            now = time.monotonic() - started
            if duration and now >= duration:
                break
            if not quiet and now - last >= 5.0:
                last = now
                s = fleet.summary()
                typer.echo(f"{now:6.1f}s  connected {s['connected']}/{s['devices']}  versions {s['versions']}  "
                           f"records {s['records']} acked {s['acked']} pending {s['pending']}", err=True)
        summary = fleet.summary()
    finally:
        fleet.stop()
    summary["elapsed_s"] = round(time.monotonic() - started, 3)
    return summary


def _run_workers(devices: int, processes: int, duration: float, quiet: bool) -> dict[str, Any]:
    """Run ``processes`` copies of this command, each with a slice of the devices; add up their summaries."""
    started = time.monotonic()
    args = _worker_args(sys.argv[1:])
    cuts = [devices * k // processes for k in range(processes + 1)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.main", *args, "--processes", "1", "--first", str(cuts[k]),
             "--total", str(devices), "--devices", str(cuts[k + 1] - cuts[k]), "--json"],
            stdout=subprocess.PIPE, text=True,
        )
        for k in range(processes)
    ]
    if not quiet:
        typer.echo(f"{processes} worker processes: {', '.join(str(w.pid) for w in workers)}", err=True)
    stop = _stop_on_signals()
    while not stop.wait(0.25) and any(w.poll() is None for w in workers):
        if duration and time.monotonic() - started > duration + 120:
            break  # a worker that does not end on its own after its duration
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    outs = []
    for w in workers:
        out, _ = w.communicate(timeout=60)
        try:
            outs.append(json.loads(out))
        except ValueError:
            fail(f"worker {w.pid} exited with {w.returncode} without a summary (see its messages above)")
    total: dict[str, Any] = {}
    for o in outs:
        for k, v in o.items():
            if k in ("profiles", "elapsed_s"):
                continue
            if isinstance(v, dict):
                merged = total.setdefault(k, {})
                for kk, vv in v.items():
                    merged[kk] = merged.get(kk, 0) + vv
            elif isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    total["processes"] = processes
    total["elapsed_s"] = round(time.monotonic() - started, 3)
    return total


def _worker_args(argv: list[str]) -> list[str]:
    """This command's own arguments minus the ones each worker gets its own value of."""
    drop_with_value = {"--processes", "-p", "--devices", "-n", "--first", "--total"}
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop_with_value:
            skip = "=" not in a
            continue
        if a == "--json":
            continue
        out.append(a)
    return out
