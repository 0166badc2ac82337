"""Issue 9's scale figures: 10,000 simulated devices against Mosquitto and a control plane in its own process(es).

What it starts (all on this machine, loopback): Mosquitto (``max_connections -1``, ``max_inflight_messages 1000``,
``max_queued_messages 1000000``); the control plane with ``edgewise server`` (one process with the default role, or,
once ``edgewise server --role`` exists, one ``api``, ``EDGEWISE_BENCH_INGEST_WORKERS`` ``ingest`` and one ``engines``
process) on SQLite, or PostgreSQL with ``EDGEWISE_BENCH_DB=postgresql``; and the devices with
``edgewise sim --processes K`` (summaries every ``telemetry_s``). Everything it measures is read from the control
plane (its API and its database), not from the simulator:

- telemetry ingested per second, sustained over ``sustain_s`` (summary rows and MQTT messages stored), against what
  the fleet offers (devices / telemetry_s);
- ingest lag (device timestamp of a summary → ``received_at`` of its row): p50/p95/p99 over the window, and p99 of
  the window's first and last tenth (a lag that grows means ingest is falling behind);
- CPU% and RSS of every control-plane process, Mosquitto and the simulator workers;
- a healthy staged rollout (waves 1% → 10% → 50% → 100%, zero soak) to every device with peer distribution off, and
  (with ``EDGEWISE_BENCH_SCALE_DOWNLOAD=1``, the default) one of another version with it on: the devices download each
  bundle (``edgewise sim --download``), and with ``--peers`` serve it to each other on the control plane's hints;
- a bad canary (3× slower p95, then one that crashes in its trial): its first report → the halt decision.

Parameters come from ``run()``'s arguments, or from the environment when run as ``benchmarks/run.py`` does:
``EDGEWISE_BENCH_SCALE_DEVICES`` (10000), ``EDGEWISE_BENCH_SCALE_SUSTAIN_S`` (600), ``EDGEWISE_BENCH_SCALE_PROCESSES``
(4), ``EDGEWISE_BENCH_SCALE_TELEMETRY_S`` (2.0), ``EDGEWISE_BENCH_INGEST_WORKERS`` (2, only with ``--role``),
``EDGEWISE_BENCH_DB`` (sqlite | postgresql), ``EDGEWISE_BENCH_DB_URL`` (an existing PostgreSQL to use),
``EDGEWISE_BENCH_SCALE_ROLLOUT_TELEMETRY_S`` (20), ``EDGEWISE_BENCH_SCALE_ROLLOUT_TIMEOUT_S`` (900),
``EDGEWISE_BENCH_SCALE_DOWNLOAD`` (1), ``EDGEWISE_BENCH_KEEP`` (keep the temporary folder). docs/scale-out-figures.md.

Short run: ``EDGEWISE_BENCH_SCALE_DEVICES=2000 EDGEWISE_BENCH_SCALE_SUSTAIN_S=60 .venv/bin/python benchmarks/bench_scale.py``
"""

from __future__ import annotations

import inspect
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_fleet import WAVES, _at, _bundles, _free_port, _proc, _until, _wait_port  # noqa: E402

CLASSES = "rpi4,x86-small"
# Published figures the issue asks us to stand beside (their numbers, their hardware: see docs/scale-out-figures.md).
THINGSBOARD_MSGS_PER_NODE = 30_000
KUBEEDGE_NODES_PER_CLUSTER = 100_000


def _log(msg: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- pure helpers (unit-tested in tests/test_sim10k.py) ---------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default); None if empty.
    Plain Python so the benchmark's figures do not depend on numpy's version."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def lag_stats(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Ingest lag from (device ts, received_at) pairs, both Unix seconds: count, p50/p95/p99/max in ms, and p99 of the
    first and the last tenth in arrival order (growing lag = ingest falling behind). Negative lags (device clock ahead)
    are kept: on one machine they are measurement noise and dropping them would bias p50."""
    if not pairs:
        return {"count": 0}
    ordered = sorted(pairs, key=lambda p: p[1])
    lags = [(r - t) * 1000 for t, r in ordered]
    tenth = max(1, len(lags) // 10)
    r = lambda v: None if v is None else round(v, 1)  # noqa: E731
    return {"count": len(lags), "p50_ms": r(percentile(lags, 50)), "p95_ms": r(percentile(lags, 95)),
            "p99_ms": r(percentile(lags, 99)), "max_ms": r(max(lags)),
            "p99_first_tenth_ms": r(percentile(lags[:tenth], 99)), "p99_last_tenth_ms": r(percentile(lags[-tenth:], 99))}


def cluster_estimate(per_core_msgs_s: float, *, machines: int, cores_per_machine: int, telemetry_s: float,
                     reserved_cores: int = 1, efficiency: float = 0.7) -> dict[str, float]:
    """What ``machines`` machines of ``cores_per_machine`` cores would ingest, from a measured per-core rate.

    Assumptions (stated in the doc): ingest workers scale out through MQTT shared subscriptions, one per core, minus
    ``reserved_cores`` per machine for the API/engines/OS; ``efficiency`` discounts for the database and broker
    becoming shared bottlenecks (PostgreSQL and the broker cluster on their own machines, not counted here)."""
    if per_core_msgs_s <= 0 or machines < 1 or cores_per_machine <= reserved_cores or telemetry_s <= 0:
        raise ValueError("need a positive rate, at least one machine, more cores than reserved and a positive interval")
    workers = machines * (cores_per_machine - reserved_cores)
    msgs = per_core_msgs_s * workers * efficiency
    return {"machines": machines, "ingest_workers": workers, "msgs_per_s": round(msgs), "devices": round(msgs * telemetry_s)}


# -- processes -------------------------------------------------------------------------------------------


def _raise_nofile() -> tuple[int, int]:
    """Soft open-file limit up to the hard one: Mosquitto and the simulator workers inherit it (one socket per device)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _has_roles() -> bool:
    """True once ``edgewise server --role`` exists (SCALE's part)."""
    from edgewise.cli import server_cmd

    return "role" in inspect.signature(server_cmd.server).parameters


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu_rss(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = _proc(pid)
        except (OSError, StopIteration):
            pass
    return out


def _postgres() -> tuple[str, Any]:
    """A PostgreSQL URL for the control plane and a stop function: EDGEWISE_BENCH_DB_URL, or a private cluster from
    tests/pg.py (PG's helper: Debian's server binaries, a free loopback port, fsync off as for tests)."""
    url = os.environ.get("EDGEWISE_BENCH_DB_URL")
    if url:
        return url, lambda: None
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from pg import PgCluster  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("EDGEWISE_BENCH_DB=postgresql needs tests/pg.py (PgCluster) or "
                           "EDGEWISE_BENCH_DB_URL=postgresql+psycopg://... of a database to use") from exc
    base = Path(tempfile.mkdtemp(prefix="bench-scale-pg-"))  # in /tmp: the postgres user must reach it when we are root
    cluster = PgCluster(base)
    cluster.start()

    def stop() -> None:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)

    try:
        return cluster.create_database("edgewise_bench"), stop
    except Exception:
        stop()
        raise


def _json(http: httpx.Client, path: str) -> Any:
    """GET ``path``'s JSON, or None when the API answers with an error (a busy API must not end the benchmark: the
    download storm of a rollout has made it answer 500 while its database pool was exhausted)."""
    r = http.get(path)
    return r.json() if r.status_code == 200 else None


def _stop_sim(sim: subprocess.Popen) -> dict[str, Any]:
    """SIGTERM to ``edgewise sim`` (it stops its workers and prints their summed summary); that summary, or {}."""
    if sim.poll() is None:
        sim.send_signal(signal.SIGTERM)
    try:
        out, _ = sim.communicate(timeout=120)
        return json.loads(out or "{}")
    except subprocess.TimeoutExpired:
        sim.kill()
        sim.communicate()
    except ValueError:
        pass
    return {}


def _one_more_bundle(root: Path, version: str) -> Path:
    """Another digits version signed with the key bench_fleet._bundles left in ``root``."""
    from edgewise.bundle import build_bundle
    from edgewise.lab.demo_model import LABELS, PREPROCESSING, load_digits_split, train_digits_onnx
    from edgewise.security import load_signer

    out = root / f"digits-{version}.ewb"
    build_bundle(train_digits_onnx("logreg", load_digits_split()), name="digits", version=version,
                 signer=load_signer(root / "signing.key"), out=out, labels=LABELS, preprocessing=PREPROCESSING)
    return out


def _env_params() -> dict[str, Any]:
    e = os.environ.get
    return {"devices": int(e("EDGEWISE_BENCH_SCALE_DEVICES", "10000")), "sustain_s": float(e("EDGEWISE_BENCH_SCALE_SUSTAIN_S", "600")),
            "processes": int(e("EDGEWISE_BENCH_SCALE_PROCESSES", "4")), "telemetry_s": float(e("EDGEWISE_BENCH_SCALE_TELEMETRY_S", "2.0")),
            "ingest_workers": int(e("EDGEWISE_BENCH_INGEST_WORKERS", "2")), "db": e("EDGEWISE_BENCH_DB", "sqlite"),
            "rollout_telemetry_s": float(e("EDGEWISE_BENCH_SCALE_ROLLOUT_TELEMETRY_S", "20")),
            "rollout_timeout_s": float(e("EDGEWISE_BENCH_SCALE_ROLLOUT_TIMEOUT_S", "900")),
            "download": e("EDGEWISE_BENCH_SCALE_DOWNLOAD", "1") not in ("0", "false", "no", "")}


# -- the run ---------------------------------------------------------------------------------------------


def run(devices: int | None = None, sustain_s: float | None = None, *, processes: int | None = None,
        telemetry_s: float | None = None, ingest_workers: int | None = None, db: str | None = None,
        rollout_telemetry_s: float | None = None, rollout_tick_s: float = 2.0, rollout_timeout_s: float | None = None) -> dict:
    """Everything in one run; arguments left None come from the environment (see the module docstring).

    Order: register, deploy, the healthy rollout and the two bad canaries with the devices reporting every
    ``rollout_telemetry_s``; then the simulator again at ``telemetry_s`` for the sustained-ingest window (last, so a
    control plane that cannot keep up with the target rate does not hold the rollouts up behind its backlog)."""
    p = _env_params()
    devices = devices if devices is not None else p["devices"]
    sustain_s = sustain_s if sustain_s is not None else p["sustain_s"]
    processes = processes if processes is not None else p["processes"]
    telemetry_s = telemetry_s if telemetry_s is not None else p["telemetry_s"]
    ingest_workers = ingest_workers if ingest_workers is not None else p["ingest_workers"]
    rollout_telemetry_s = rollout_telemetry_s if rollout_telemetry_s is not None else p["rollout_telemetry_s"]
    rollout_timeout_s = rollout_timeout_s if rollout_timeout_s is not None else p["rollout_timeout_s"]
    db = (db or p["db"]).lower()
    download = p["download"]
    if db not in ("sqlite", "postgresql"):
        raise ValueError(f"EDGEWISE_BENCH_DB={db!r}: use sqlite or postgresql")
    from sqlalchemy import create_engine, func, select

    from edgewise.control.models import Device, EventRow, SummaryRow

    nofile = _raise_nofile()
    if nofile[0] < devices + 1000:
        _log(f"open-file limit {nofile[0]} is below {devices} devices + margin: Mosquitto will refuse connections")
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    mq_port, http_port = _free_port(), _free_port()
    (root / "mosquitto.conf").write_text(
        f"listener {mq_port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"
        "max_queued_messages 1000000\nmax_inflight_messages 1000\n"
        f"log_dest file {root / 'mosquitto.log'}\nlog_type error\nlog_type warning\n"
    )
    procs: dict[str, subprocess.Popen] = {}
    stop_db = lambda: None  # noqa: E731
    sim: subprocess.Popen | None = None
    engine = None
    try:
        procs["mosquitto"] = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(root / "mosquitto.conf")],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(mq_port)
        broker = f"mqtt://127.0.0.1:{mq_port}"
        bundles, pub = _bundles(root)
        bundles["1.4.0"] = _one_more_bundle(root, "1.4.0")
        data_dir = root / "cp"
        if db == "postgresql":
            db_url, stop_db = _postgres()
        else:
            db_url = f"sqlite:///{data_dir / 'edgewise.db'}"

        # -- control plane ----------------------------------------------------------------------------
        roles = _has_roles()
        layout = [("api", 0), *[("ingest", k) for k in range(ingest_workers)], ("engines", 0)] if roles else [("all", 0)]
        env = {**os.environ, "EDGEWISE_ROLLOUT_TICK_S": str(rollout_tick_s)}
        for role, k in layout:
            name = f"{role}{k}" if role == "ingest" else role
            args = [sys.executable, "-m", "edgewise.cli.main", "server", "--data-dir", str(data_dir), "--broker-url", broker,
                    "--trust", str(pub), "--database-url", db_url, "--log-level", "warning",
                    "--port", str(http_port if role in ("api", "all") else _free_port())]
            args += ["--role", role, "--worker-id", f"bench{k}"] if roles else ["--mqtt-client-id", "edgewise-bench"]
            procs[name] = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(root / f"{name}.log", "wb"))
            if role in ("api", "all"):  # the first one creates the database and the admin token
                _wait_port(http_port, 90)
        url = f"http://127.0.0.1:{http_port}"
        token = _until(lambda: (data_dir / "admin.token").is_file() and (data_dir / "admin.token").read_text().strip(), 60, "admin token")
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        _until(lambda: http.get("/api/v1/health").status_code == 200, 60, "control plane health")
        for path in bundles.values():
            http.post("/api/v1/models", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"}).raise_for_status()
        cp_names = [n for n in procs if n != "mosquitto"]
        idle = _cpu_rss({n: procs[n].pid for n in cp_names})
        engine = create_engine(db_url)

        def scalar(stmt: Any) -> Any:
            with engine.connect() as c:
                return c.execute(stmt).scalar()

        def on_version(v: str) -> int:
            return scalar(select(func.count()).select_from(Device).where(Device.version == v)) or 0

        # -- devices ----------------------------------------------------------------------------------
        (root / "behaviours.json").write_text(json.dumps({
            "1.0.0": {"latency_ms": {"*": 10}}, "1.1.0": {"latency_ms": {"*": 10}},
            "1.2.0": {"latency_ms": {"*": 30}}, "1.3.0": {"crash": True}, "1.4.0": {"latency_ms": {"*": 10}}}))
        def start_sim(interval: float, *extra: str) -> subprocess.Popen:
            _log(f"starting {devices} simulated devices in {processes} processes (one summary / {interval:g} s each) {' '.join(extra)}")
            return subprocess.Popen(
                [sys.executable, "-m", "edgewise.cli.main", "sim", "--devices", str(devices), "--processes", str(processes),
                 "--broker", broker, "--server", url, "--token", token, "--record", "summary", "--telemetry-s", str(interval),
                 "--hardware", CLASSES, "--tag", "bench", "--prefix", "scale", "--install-s", "0.5",
                 "--behaviours", str(root / "behaviours.json"), "--json", *extra],
                stdout=subprocess.PIPE, stderr=open(root / "sim.log", "ab"), text=True)

        t = time.monotonic()
        sim = start_sim(rollout_telemetry_s, *(["--download"] if download else []))
        _until(lambda: (st := _json(http, "/api/v1/stats")) and st["devices"] >= devices, 600, "every device registered", 1.0)
        registered_s = time.monotonic() - t
        _log(f"registered in {registered_s:.1f} s; deploying 1.0.0")
        t = time.monotonic()
        http.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "tag": "bench"}).raise_for_status()
        try:
            _until(lambda: on_version("1.0.0") >= devices, rollout_timeout_s, "1.0.0 on every device", 1.0)
            deploy_s: float | None = time.monotonic() - t
        except TimeoutError:
            deploy_s = None
            _log(f"1.0.0 reached {on_version('1.0.0')} of {devices} devices within {rollout_timeout_s:g} s; going on")
        _log(f"1.0.0 on all in {deploy_s} s; a healthy rollout")

        # -- a healthy staged rollout to every device --------------------------------------------------
        def healthy_rollout(version: str, peers: str) -> dict[str, Any]:
            c0, t0 = _cpu_rss({n: procs[n].pid for n in cp_names}), time.time()
            rid = http.post("/api/v1/rollouts", json={"model": "digits", "version": version, "tag": "bench", "waves": WAVES}).json()["id"]
            out: dict[str, Any] = {"version": version, "peer_distribution": peers}
            try:
                _until(lambda: on_version(version) >= devices, rollout_timeout_s, f"{version} on every device", 1.0)
                out["all_updated_s"] = round(time.time() - t0, 1)
            except TimeoutError:
                out["all_updated_s"] = None
                out["updated_at_timeout"] = on_version(version)
            try:
                done = _until(lambda: (r := _json(http, f"/api/v1/rollouts/{rid}")) and r["state"] in ("completed", "halted", "aborted") and r,
                              rollout_timeout_s, "rollout finished", 1.0)
                out.update(state=done["state"], decisions=len(done["decisions"]),
                           completed_s=round(_at(done["finished_at"]) - t0, 1) if done.get("finished_at") else None)
            except TimeoutError:
                out.update(state="not finished within the timeout", decisions=None, completed_s=None)
            c1 = _cpu_rss({n: procs[n].pid for n in cp_names})
            out["cp_cpu_s"] = {n: round(c1[n][0] - c0[n][0], 1) for n in c1 if n in c0}  # CPU seconds each process spent on it
            _log(f"healthy rollout: {out}")
            time.sleep(rollout_telemetry_s * 1.3)  # every device reports on the new version: the gates' baseline
            return out

        rollout = healthy_rollout("1.1.0", "off")

        # -- bad canaries ------------------------------------------------------------------------------
        halts = {}
        for version, what in (("1.2.0", "slow"), ("1.3.0", "crash")):
            rid = http.post("/api/v1/rollouts", json={"model": "digits", "version": version, "tag": "bench", "waves": WAVES}).json()["id"]
            try:
                r = _until(lambda: (x := _json(http, f"/api/v1/rollouts/{rid}")) and x["state"] in ("halted", "completed", "aborted") and x,
                           rollout_timeout_s, f"{what} rollout halted", 0.5)
            except TimeoutError:
                halts[what] = {"state": "not halted within the timeout", "halted_cohorts": [], "first_report_to_halt_s": None}
                http.post(f"/api/v1/rollouts/{rid}/abort")
                continue
            halted_at = [_at(d["at"]) for d in r["decisions"] if "halt" in d["decision"] and d["cohort"]]
            if what == "slow":
                first = scalar(select(func.min(SummaryRow.ts)).where(SummaryRow.version == version))
            else:
                with engine.connect() as c:
                    first = min((ts_ for ts_, detail in c.execute(select(EventRow.ts, EventRow.detail).where(EventRow.kind == "model.crash"))
                                 if (detail or {}).get("version") == version), default=None)
            halts[what] = {"state": r["state"], "halted_cohorts": r["halted_cohorts"],
                           "first_report_to_halt_s": round(min(halted_at) - first, 2) if halted_at and first else None}
            _log(f"{what} canary: {halts[what]}")
            try:
                _until(lambda: on_version("1.1.0") >= devices, rollout_timeout_s, "back on 1.1.0", 1.0)
            except TimeoutError:
                _log(f"{on_version('1.1.0')} of {devices} devices on 1.1.0 after {rollout_timeout_s:g} s; going on")

        # -- peer distribution on: the simulator again, serving what it downloads; a rollout of 1.4.0 -------
        rollout_peers: dict[str, Any] | None = None
        sim_peer_phase: dict[str, Any] = {}
        if download:
            sim_rollout_phase = _stop_sim(sim)
            sim = start_sim(rollout_telemetry_s, "--peers", "--running", "digits:1.1.0")  # kept what they installed
            restart = datetime.now(timezone.utc)
            try:
                _until(lambda: (scalar(select(func.count()).select_from(Device).where(Device.version == "1.1.0", Device.last_state_at >= restart))
                                or 0) >= devices, rollout_timeout_s, "every device back on 1.1.0 after the restart", 1.0)
            except TimeoutError as exc:
                _log(f"{exc}; going on")
            time.sleep(rollout_telemetry_s * 1.3)
            rollout_peers = healthy_rollout("1.4.0", "on")
            sim_peer_phase = _stop_sim(sim)
            sim = start_sim(telemetry_s, "--running", "digits:1.4.0")
        else:
            sim_rollout_phase = _stop_sim(sim)
            sim = start_sim(telemetry_s, "--running", "digits:1.1.0")

        # -- sustained ingest -------------------------------------------------------------------------
        # the simulator again, at the target rate (the CLI's interval is fixed per run): the devices reconnect,
        # find their retained desired state, and report; the window starts once every device has reported
        restart = datetime.now(timezone.utc)
        try:  # a control plane far behind the target rate may take long to hear from the last few
            _until(lambda: (scalar(select(func.count(func.distinct(SummaryRow.device_id))).where(SummaryRow.received_at >= restart)) or 0)
                   >= 0.95 * devices, rollout_timeout_s, "95 % of the devices reporting at the target rate", 2.0)
        except TimeoutError as exc:
            _log(f"{exc}; measuring anyway")
        time.sleep(telemetry_s)
        sim_pids = _until(lambda: len(c := _children(sim.pid)) >= processes and c, 30, "simulator workers")
        pids = {**{n: procs[n].pid for n in procs}, **{f"sim{k}": pid for k, pid in enumerate(sim_pids)}}
        s0, u0, w0, ts0 = http.get("/api/v1/stats").json(), _cpu_rss(pids), time.monotonic(), time.time()
        peak: dict[str, float] = {}
        while time.monotonic() - w0 < sustain_s:
            time.sleep(min(5.0, max(0.1, sustain_s - (time.monotonic() - w0))))
            for n, (_, rss) in _cpu_rss(pids).items():
                peak[n] = max(peak.get(n, 0.0), rss)
        s1, u1, w1, ts1 = http.get("/api/v1/stats").json(), _cpu_rss(pids), time.monotonic(), time.time()
        wall = w1 - w0
        lo, hi = datetime.fromtimestamp(ts0, timezone.utc), datetime.fromtimestamp(ts1, timezone.utc)
        with engine.connect() as c:
            rows = c.execute(select(SummaryRow.ts, SummaryRow.received_at).where(SummaryRow.received_at >= lo, SummaryRow.received_at < hi)).all()
        # ingest counters are per process: with several ingest workers the API's own are not the fleet's, so the
        # row counts in the database are what count.
        stored = scalar(select(func.count()).select_from(SummaryRow).where(SummaryRow.received_at >= lo, SummaryRow.received_at < hi)) or 0
        procs_fig = {n: {"cpu_percent": round(100 * (u1[n][0] - u0[n][0]) / wall, 1), "rss_mb": round(u1[n][1], 1),
                         "rss_peak_mb": round(peak.get(n, u1[n][1]), 1)} for n in u1 if n in u0}
        for n in cp_names:
            if n in procs_fig and n in idle:
                procs_fig[n]["rss_idle_mb"] = round(idle[n][1], 1)
        ingest = {
            "window_s": round(wall, 1), "offered_per_s": round(devices / telemetry_s, 1),
            "summaries_per_s": round(stored / wall, 1),
            "messages_per_s_api_process": round((s1["ingest"]["messages"] - s0["ingest"]["messages"]) / wall, 1),
            "errors": s1["ingest"]["errors"], "bad": s1["ingest"]["bad"], "duplicates": s1["ingest"].get("duplicates"),
            "lag": lag_stats([(t_, r_.timestamp()) for t_, r_ in rows]),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }
        _log(f"ingest: {ingest}")
        sim_sustain_phase = _stop_sim(sim)
        keep = ("devices", "connected", "connects", "refused_connections", "records", "acked", "pending", "resent", "elapsed_s")

        cores = os.cpu_count() or 1
        return {"devices": devices, "sim_processes": processes, "telemetry_s": telemetry_s, "db": db, "roles": roles,
                "cp_processes": cp_names, "rollout_tick_s": rollout_tick_s, "sustain_s": sustain_s, "cores": cores,
                "nofile": nofile[0], "registered_s": round(registered_s, 1), "deploy_all_s": round(deploy_s, 1) if deploy_s else None,
                "ingest": ingest, "processes": procs_fig, "rollout": rollout, "halt": halts, "rollout_peers": rollout_peers, "download": download,
                "sim_peer_phase": {k: sim_peer_phase.get(k) for k in (*keep, "downloads")} if sim_peer_phase else None,
                "sim_rollout_phase": {k: sim_rollout_phase.get(k) for k in (*keep, "downloads")},
                "sim_sustain_phase": {k: sim_sustain_phase.get(k) for k in keep}}
    finally:
        if sim is not None and sim.returncode is None:
            _stop_sim(sim)
        if engine is not None:
            engine.dispose()
        for proc in reversed(list(procs.values())):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_db()
        if os.environ.get("EDGEWISE_BENCH_KEEP"):
            _log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# -- the page --------------------------------------------------------------------------------------------


def per_core(r: dict, *, ingest_only: bool = False) -> float | None:
    """Summaries stored per second per core of control-plane CPU (all its processes, or only the ingest workers when
    they run apart: the per-worker figure the sizing uses): the figure a shared machine distorts least."""
    names = [n for n in r["cp_processes"] if not ingest_only or n.startswith("ingest") or n == "all"]
    cpu = sum(v["cpu_percent"] for n, v in r["processes"].items() if n in names) / 100
    return round(r["ingest"]["summaries_per_s"] / cpu, 1) if cpu > 0 else None


def api_ms_per_download(r: dict) -> float | None:
    """CPU milliseconds the API process (or the all-in-one process) spent per bundle it served in the peer-off rollout
    (with everything else it did then: an upper bound)."""
    ro = r["rollout"]
    if not r.get("download") or not ro.get("all_updated_s"):
        return None
    api = (ro.get("cp_cpu_s") or {}).get("api", (ro.get("cp_cpu_s") or {}).get("all"))
    return round(1000 * api / r["devices"], 2) if api else None  # every device fetched the new version once


def _rollout_line(ro: dict, r: dict, phase: dict | None) -> str:
    dl = (phase or {}).get("downloads") or {}
    how = (f"each device downloads the bundle ({dl.get('from_server', 0):,} from the control plane, {dl.get('from_peer', 0):,} from "
           f"peers, {dl.get('failed', 0)} failed, in this simulator run)") if r.get("download") else "no downloads simulated"
    late = "" if ro["all_updated_s"] else f", {ro.get('updated_at_timeout')} updated at the timeout"
    return (f"| healthy rollout to {ro['version']}, 4 waves, zero soak, **peer distribution {ro['peer_distribution']}** ({how}): "
            f"start → every device updated | **{ro['all_updated_s']} s** ({ro['state']}, {ro['decisions']} decisions{late}) |")


def markdown(r: dict) -> str:
    i, lag, ro, h = r["ingest"], r["ingest"]["lag"], r["rollout"], r["halt"]
    pc = per_core(r)
    pw = per_core(r, ingest_only=True) or pc
    apims = api_ms_per_download(r)
    cp = [(n, r["processes"][n]) for n in r["cp_processes"] if n in r["processes"]]
    cp_rss = sum(v["rss_mb"] for _, v in cp)
    cp_idle = sum(v.get("rss_idle_mb", 0.0) for _, v in cp)
    mq = r["processes"].get("mosquitto", {})
    sims = [v for n, v in r["processes"].items() if n.startswith("sim")]
    lines = [
        f"{r['devices']:,} simulated devices (`edgewise sim --processes {r['sim_processes']}`, {CLASSES}, one summary every "
        f"{r['telemetry_s']:g} s each) against Mosquitto; the control plane as {len(cp)} process(es) "
        f"({', '.join(n for n, _ in cp)}; {'--role' if r['roles'] else 'default role: API + ingest + engines in one'}) on "
        f"{r['db']}; rollout tick {r['rollout_tick_s']:g} s; all on one {r['cores']}-core machine, loopback; open-file limit {r['nofile']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| devices registered (start → all {r['devices']:,} in the database) | {r['registered_s']} s |",
        f"| plain deployment to all | {r['deploy_all_s']} s |",
        f"| telemetry stored, sustained over {i['window_s']:g} s (offered {i['offered_per_s']:g}/s) | **{i['summaries_per_s']:g} summaries/s** |",
        f"| ingest lag (device ts → received_at) p50 / p95 / **p99** / max | {lag.get('p50_ms')} / {lag.get('p95_ms')} / **{lag.get('p99_ms')}** / {lag.get('max_ms')} ms |",
        f"| ingest lag p99, first → last tenth of the window | {lag.get('p99_first_tenth_ms')} → {lag.get('p99_last_tenth_ms')} ms |",
        f"| ingest errors / rejected | {i['errors']} / {i['bad']} |",
    ]
    for n, v in cp:
        lines.append(f"| control plane `{n}`: CPU, RSS (idle → under load, peak) | {v['cpu_percent']} %, {v.get('rss_idle_mb')} → {v['rss_mb']} MB ({v['rss_peak_mb']} MB) |")
    lines += [
        f"| control plane, summaries stored per second per core of its CPU: all processes / ingest workers only | **{pc}** / **{pw}** |",
        f"| Mosquitto: CPU, RSS | {mq.get('cpu_percent')} %, {mq.get('rss_mb')} MB |",
        f"| simulator ({len(sims)} processes): CPU, RSS in all | {round(sum(v['cpu_percent'] for v in sims), 1)} %, {round(sum(v['rss_mb'] for v in sims), 1)} MB |",
        *[_rollout_line(x, r, phase) for x, phase in ((ro, r.get("sim_rollout_phase")), (r.get("rollout_peers"), r.get("sim_peer_phase"))) if x],
        f"| bad canary (3× slower p95), first report → halt | **{h['slow']['first_report_to_halt_s']} s** ({h['slow']['state']}: {', '.join(h['slow']['halted_cohorts'])}) |",
        f"| bad canary (crashes in its trial), crash report → halt | **{h['crash']['first_report_to_halt_s']} s** ({h['crash']['state']}) |",
        f"| machine load average (1 min) at the end of the window | {i['loadavg_1m']} |",
        "",
    ]
    if pw:
        pc = pw
        per_1k = (cp_rss - cp_idle) / r["devices"] * 1000 if cp_idle else None
        lines += [
            "Sizing from these figures (one ingest core = the measured per-core rate; see docs/scale-out-figures.md for the assumptions):",
            "",
            "| | value |",
            "|---|---:|",
            f"| devices per ingest worker (one core) at one summary / {r['telemetry_s']:g} s | {round(pc * r['telemetry_s']):,} |",
            f"| API process: CPU per bundle download served (peer off; upper bound) → downloads per API core per second | "
            f"{apims} ms → {round(1000 / apims) if apims else 'n/a'} |",
            f"| ThingsBoard's 30,000 msg/s per node ÷ our per-core rate | {THINGSBOARD_MSGS_PER_NODE / pc:.1f} cores of ours |",
            f"| control-plane memory per 1,000 devices (load − idle RSS) | {round(per_1k, 1) if per_1k is not None else 'n/a'} MB |",
            f"| Mosquitto memory per 1,000 connections | {round(mq.get('rss_mb', 0) / r['devices'] * 1000, 1)} MB |",
        ]
        for m in (1, 4, 10):
            e = cluster_estimate(pc, machines=m, cores_per_machine=8, telemetry_s=r["telemetry_s"])
            lines.append(f"| {m} × 8-core machine(s), {e['ingest_workers']} ingest workers at 70 % | {e['msgs_per_s']:,} msg/s = "
                         f"{e['devices']:,} devices (KubeEdge: {KUBEEDGE_NODES_PER_CLUSTER:,} nodes/cluster) |")
    return "\n".join(lines)


if __name__ == "__main__":
    def _terminate(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second TERM must not cut the clean-up short
        sys.exit(143)  # run()'s finally stops Mosquitto, the control plane, the devices, PostgreSQL

    signal.signal(signal.SIGTERM, _terminate)
    result = run()
    print(json.dumps(result, indent=2))
    print(markdown(result))
