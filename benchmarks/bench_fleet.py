"""Issue 7's fleet figures: 1,000 simulated devices (sim.virtual, one process) against Mosquitto and a control plane
running in its own process, on this machine.

- rollout time: from ``POST /api/v1/rollouts`` of a healthy model (waves 1%, 10%, 50%, 100%, zero soak) to every
  device running it;
- halt time: from the first report of a bad canary (its first telemetry on a model 3x slower, or its crash report) to
  the rollout's halt decision;
- ingest: messages/s the control plane stored, and its CPU% and RSS, with every device sending one summary a second.

Run: ``.venv/bin/python benchmarks/bench_fleet.py [DEVICES]`` (prints JSON, then the markdown).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ERROR = "failed_fraction > 0.2 or crashes > 0 or p95_ratio > 1.5"
SUCCESS = "reporting >= 1 and error_rate <= 0.01"
WAVES = [{"name": n, "percent": p, "min_reporting": 1, "soak_s": 0, "success": SUCCESS, "error": ERROR}
         for n, p in (("canary", 1), ("10%", 10), ("50%", 50), ("all", 100))]
CLASSES = ("rpi4", "x86-small")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _proc(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, RSS MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    return cpu, rss / 1024


def _bundles(root: Path) -> tuple[dict[str, Path], Path]:
    from edgewise.bundle import build_bundle
    from edgewise.lab.demo_model import LABELS, PREPROCESSING, load_digits_split, train_digits_onnx
    from edgewise.security import generate_keypair, load_signer

    generate_keypair(root / "signing.key", root / "signing.pub", overwrite=True)
    signer = load_signer(root / "signing.key")
    model = train_digits_onnx("logreg", load_digits_split())
    out = {}
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        out[v] = root / f"digits-{v}.ewb"
        build_bundle(model, name="digits", version=v, signer=signer, out=out[v], labels=LABELS, preprocessing=PREPROCESSING)
    return out, root / "signing.pub"


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _until(pred: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:.0f} s")


def _log(msg: str) -> None:
    print(f"[bench_fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(devices: int = 1000, ingest_s: float = 30.0, rollout_tick_s: float = 2.0, rollout_telemetry_s: float = 20.0) -> dict:
    """Everything in one run; ``rollout_telemetry_s``: the devices' telemetry interval while rollouts are timed (the
    ingest figures are measured afterwards at 10 s and at 1 s)."""
    from edgewise.sim.behaviour import VersionBehaviour
    from edgewise.sim.virtual import VirtualFleet, specs_for

    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    mq_port, http_port = _free_port(), _free_port()
    (root / "mosquitto.conf").write_text(
        f"listener {mq_port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n"
        f"log_dest file {root / 'mosquitto.log'}\nlog_type error\nlog_type warning\n"
    )
    procs: list[subprocess.Popen] = []
    fleet = None
    try:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([exe, "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(mq_port)
        broker = f"mqtt://127.0.0.1:{mq_port}"
        bundles, pub = _bundles(root)
        script = (
            "from pathlib import Path\nfrom edgewise.control.server import run_server\n"
            "from edgewise.control.settings import ServerSettings\n"
            f"run_server(ServerSettings(data_dir=Path({str(root / 'cp')!r}), port={http_port}, broker_url={broker!r}, "
            f"trust=[Path({str(pub)!r})], rollout_tick_s={rollout_tick_s}), log_level='warning')\n"
        )
        cp = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=open(root / "cp.log", "wb"))
        procs.append(cp)
        _wait_port(http_port, 60)
        url = f"http://127.0.0.1:{http_port}"
        token = _until(lambda: (root / "cp" / "admin.token").is_file() and (root / "cp" / "admin.token").read_text().strip(), 30, "admin token")
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        _until(lambda: http.get("/api/v1/health").status_code == 200, 30, "control plane health")
        for path in bundles.values():
            r = http.post("/api/v1/models", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})
            r.raise_for_status()
        rss_idle = _proc(cp.pid)[1]

        behaviours = {
            "1.0.0": VersionBehaviour(latency_ms={"*": 10.0}), "1.1.0": VersionBehaviour(latency_ms={"*": 10.0}),
            "1.2.0": VersionBehaviour(latency_ms={"*": 30.0}), "1.3.0": VersionBehaviour(crash=True),
        }
        specs = specs_for(devices, prefix="bench", hardware_classes=CLASSES, tags=["bench"], telemetry_s=rollout_telemetry_s,
                          install_s=0.5, record="summary", inference_rate=20)
        fleet = VirtualFleet(broker, url, token, specs, behaviours)
        _log(f"starting {devices} simulated devices")
        t = time.monotonic()
        fleet.start()
        fleet.wait_connected(120)
        connect_s = time.monotonic() - t
        ids = [s.device_id for s in specs]
        _until(lambda: http.get("/api/v1/stats").json()["devices"] >= devices, 300, "every device registered")
        registered_s = time.monotonic() - t
        _log(f"connected in {connect_s:.1f} s, registered in {registered_s:.1f} s; deploying 1.0.0")
        t = time.monotonic()
        http.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "tag": "bench"}).raise_for_status()
        fleet.wait_versions(dict.fromkeys(ids, "1.0.0"), 600)
        deploy_s = time.monotonic() - t
        _log(f"deployed 1.0.0 to all in {deploy_s:.1f} s; baseline telemetry")
        time.sleep(rollout_telemetry_s * 1.3)  # every device reports on 1.0.0: the gates' baseline

        # -- a healthy rollout, 4 waves, zero soak ---------------------------------------------
        t0 = time.time()
        rid = http.post("/api/v1/rollouts", json={"model": "digits", "version": "1.1.0", "tag": "bench", "waves": WAVES}).json()["id"]
        fleet.wait_versions(dict.fromkeys(ids, "1.1.0"), 1800)
        all_updated_s = time.time() - t0
        done = _until(lambda: (r := http.get(f"/api/v1/rollouts/{rid}").json())["state"] in ("completed", "halted", "aborted") and r,
                      600, "rollout finished")
        rollout = {"state": done["state"], "all_updated_s": round(all_updated_s, 1),
                   "completed_s": round(_at(done["finished_at"]) - t0, 1) if done.get("finished_at") else None,
                   "decisions": len(done["decisions"])}
        _log(f"healthy rollout: {rollout}")
        time.sleep(rollout_telemetry_s * 1.3)  # a baseline on 1.1.0 for the next one

        # -- bad canaries: slower (3x p95) and crashing ----------------------------------------
        halts = {}
        for version, what in (("1.2.0", "slow"), ("1.3.0", "crash")):
            rid = http.post("/api/v1/rollouts", json={"model": "digits", "version": version, "tag": "bench", "waves": WAVES}).json()["id"]
            r = _until(lambda: (x := http.get(f"/api/v1/rollouts/{rid}").json())["state"] in ("halted", "completed", "aborted") and x,
                       600, f"{what} rollout halted")
            halted_at = [_at(d["at"]) for d in r["decisions"] if "halt" in d["decision"] and d["cohort"]]
            firsts = fleet.call(lambda: [d.stats.first_report[version] for d in fleet.devices.values() if version in d.stats.first_report])
            halts[what] = {
                "state": r["state"], "halted_cohorts": r["halted_cohorts"], "canaries_reporting": len(firsts),
                "first_report_to_halt_s": round(min(halted_at) - min(firsts), 2) if halted_at and firsts else None,
                "first_report_to_last_cohort_halt_s": round(max(halted_at) - min(firsts), 2) if halted_at and firsts else None,
            }
            _log(f"{what} canary: {halts[what]}")
            fleet.wait_versions(dict.fromkeys(ids, "1.1.0"), 600)  # back where it was before the next one

        # -- ingest: every device one summary per 10 s (baseline), then per second ---------------------
        ingest = {}
        previous = rollout_telemetry_s
        for interval in (10.0, 1.0):
            fleet.set_telemetry_interval(interval)
            time.sleep(previous + 3.0)  # every device has ticked on the new interval
            previous = interval
            me0 = _proc(os.getpid())[0]
            s0, c0, w0 = http.get("/api/v1/stats").json(), _proc(cp.pid)[0], time.monotonic()
            f0 = fleet.summary()
            time.sleep(ingest_s)
            s1, (c1, rss_load), w1 = http.get("/api/v1/stats").json(), _proc(cp.pid), time.monotonic()
            f1 = fleet.summary()
            me1, sim_rss = _proc(os.getpid())
            wall = w1 - w0
            ingest[f"every_{interval:g}s"] = {
                "window_s": round(wall, 1),
                "offered_per_s": round((f1["acked"] - f0["acked"]) / wall, 1),  # records the broker acknowledged
                "messages_per_s": round((s1["ingest"]["messages"] - s0["ingest"]["messages"]) / wall, 1),
                "summaries_per_s": round((s1["ingest"]["summary_rows"] - s0["ingest"]["summary_rows"]) / wall, 1),
                "errors": s1["ingest"]["errors"], "bad": s1["ingest"]["bad"],
                "cp_cpu_percent": round(100 * (c1 - c0) / wall, 1), "cp_rss_mb": round(rss_load, 1),
                "sim_cpu_percent": round(100 * (me1 - me0) / wall, 1), "sim_rss_mb": round(sim_rss, 1),
                "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
            }
            _log(f"ingest every {interval:g} s: {ingest[f'every_{interval:g}s']}")
        ingest["cp_rss_mb_idle"] = round(rss_idle, 1)
        return {"devices": devices, "hardware_classes": list(CLASSES), "rollout_tick_s": rollout_tick_s,
                "rollout_telemetry_s": rollout_telemetry_s, "connect_s": round(connect_s, 1),
                "registered_s": round(registered_s, 1), "deploy_all_s": round(deploy_s, 1), "ingest": ingest,
                "rollout": rollout, "halt": halts, "summary": fleet.summary(), "cores": os.cpu_count()}
    finally:
        if fleet is not None:
            fleet.stop()
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def _ms_per_msg(phase: dict) -> float | None:
    """CPU milliseconds the control plane spent per message it stored: the figure a busy machine distorts least."""
    return round(10 * phase["cp_cpu_percent"] / phase["messages_per_s"], 2) if phase["messages_per_s"] else None


def markdown(r: dict) -> str:
    i, ro, h = r["ingest"], r["rollout"], r["halt"]
    base, full = i["every_10s"], i["every_1s"]
    return "\n".join([
        f"{r['devices']} simulated devices (one process, {', '.join(r['hardware_classes'])} half each, summaries) against "
        f"Mosquitto; the control plane in its own process (SQLite, rollout tick {r['rollout_tick_s']} s); all on one "
        f"{r['cores']}-core machine. Rollouts timed with telemetry every {r['rollout_telemetry_s']:g} s; waves 1% → 10% → 50% → 100%, "
        "min_reporting 1, zero soak.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| devices connected to the broker / registered in the control plane | {r['connect_s']} s / {r['registered_s']} s |",
        f"| plain deployment (one tag) to 100% | {r['deploy_all_s']} s |",
        f"| healthy rollout, start → 100% of the fleet updated | **{ro['all_updated_s']} s** ({ro['state']}, {ro['decisions']} decisions) |",
        f"| bad canary (3× slower p95), its first report → halt | **{h['slow']['first_report_to_halt_s']} s** (halted: {', '.join(h['slow']['halted_cohorts'])}) |",
        f"| bad canary (crashes in its trial), crash report → halt | **{h['crash']['first_report_to_halt_s']} s** |",
        f"| ingest, 1 summary / 10 s per device (offered {base['offered_per_s']}/s) | {base['messages_per_s']} messages/s stored; control plane {base['cp_cpu_percent']} % CPU, {base['cp_rss_mb']} MB RSS |",
        f"| ingest, 1 summary / s per device (offered {full['offered_per_s']}/s) | **{full['messages_per_s']} messages/s** stored; control plane **{full['cp_cpu_percent']} % CPU, {full['cp_rss_mb']} MB RSS** |",
        f"| control plane CPU per stored message (both phases) | {_ms_per_msg(base)} ms / {_ms_per_msg(full)} ms |",
        f"| control plane RSS idle | {i['cp_rss_mb_idle']} MB |",
        f"| simulator process at 1 summary / s per device | {full['sim_cpu_percent']} % CPU, {full['sim_rss_mb']} MB RSS (incl. the bundle-building imports) |",
        f"| machine load average during the 1 s phase | {full['loadavg_1m']} |",
    ])


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    result = run(n)
    print(json.dumps(result, indent=2))
    print(markdown(result))
