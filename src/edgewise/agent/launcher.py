"""The agent's launcher: what systemd runs. Picks the env, starts the agent in it, applies the trial rules.

    edgewise-agent-launcher --state-dir /var/lib/edgewise -- --server https://control:8443
    python -m edgewise.agent.launcher --state-dir /var/lib/edgewise -- --server ...

Why a supervising parent rather than ``exec``: the launcher comes from the OS
image (the verified root filesystem), so the decisions that keep a device
alive — which env runs, when a trial is committed, when it is rolled back —
are made by code a bad release cannot replace. It sees the agent's exit code
(``3`` = integrity refused, ``75`` = a new release was installed, start it) and
when the agent became ready, and it can stop a trial that never gets there.

systemd (``Type=notify``, ``NotifyAccess=main``) talks to the launcher only:
the agent's ``READY=1``/``WATCHDOG=1``/``STATUS=`` datagrams go to a socket the
launcher owns (``$NOTIFY_SOCKET`` in the agent's environment) and are
forwarded upstream, so a hung agent stops the watchdog pings and systemd
restarts the whole service.

The agent runs as ``python -I -B -c BOOT SITE agent --state-dir ... ARGS``:
``-I`` ignores ``PYTHONPATH`` and the user site (no code injected from the
environment), ``-B`` writes no bytecode (so the env stays exactly what was
signed), and the env's ``site/`` goes first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from .sdnotify import notify
from .selfupdate import EXIT_INTEGRITY, EXIT_RESTART, AgentReleases, Launch

log = logging.getLogger("edgewise.agent.launcher")

BOOT = (
    "import sys\n"
    "site = sys.argv.pop(1)\n"
    "if site: sys.path.insert(0, site)\n"
    "sys.argv[0] = 'edgewise'\n"
    "from edgewise.cli.main import app\n"
    "app()\n"
)
MAX_QUICK_RESTARTS = 10  # in-process restarts (rollback, fall back, new release) before leaving it to systemd


class NotifyRelay:
    """A datagram socket the agent notifies; records READY/WATCHDOG and forwards upstream to systemd."""

    def __init__(self, upstream: str | None) -> None:
        self.upstream = upstream
        self.name = f"@edgewise-launcher-{os.getpid()}-{secrets.token_hex(4)}"  # abstract: no path, no length limit
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name[1:])
        self._sock.settimeout(0.2)
        self.ready = threading.Event()
        self.last_ping = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgewise-notify-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            lines = [ln for ln in data.decode("utf-8", "replace").split("\n") if ln and not ln.startswith("MAINPID=")]
            if "READY=1" in lines:
                self.ready.set()
            if "WATCHDOG=1" in lines:
                self.last_ping = time.monotonic()
            if lines and self.upstream:
                notify("\n".join(lines), env={"NOTIFY_SOCKET": self.upstream})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._sock.close()


class Launcher:
    def __init__(self, state_dir: Path, agent_args: Sequence[str], *, releases_dir: Path | None = None,
                 ready_timeout: float = 120.0, health_grace: float = 10.0, python: str = sys.executable,
                 trust_dir: Path | None = None, verify: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.trust_dir = Path(trust_dir) if trust_dir else self.state_dir / "trust"
        self.verify = verify
        self.releases = AgentReleases(releases_dir or self.state_dir / "releases")
        self.agent_args = list(agent_args)
        self.ready_timeout = ready_timeout
        self.health_grace = health_grace
        self.python = python
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def command(self, launch: Launch) -> list[str]:
        site = self.releases.site_dir(launch.version)
        return [self.python, "-I", "-B", "-c", BOOT, str(site) if site else "", "agent", "--state-dir", str(self.state_dir), *self.agent_args]

    def _child_env(self, relay: NotifyRelay) -> dict[str, str]:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = relay.name
        env["EDGEWISE_LAUNCHER"] = str(self.releases.root)  # the agent may install releases and exit 75
        if env.get("WATCHDOG_PID") not in (None, str(os.getpid())):
            env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)  # the pings are the child's to send, to us
        return env

    def _precheck(self, launch: Launch) -> str | None:
        """Check a release env against its signed manifest before any of its code runs (this launcher comes
        from the verified OS image; the agent checks again itself). The reason when it must not run, else None."""
        if launch.version is None or not self.verify:
            return None
        from ..security import TrustedKeys
        from .integrity import check_env

        try:
            trusted = TrustedKeys.from_paths([self.trust_dir]) if self.trust_dir.exists() else TrustedKeys()
        except ValueError as exc:
            return f"integrity: cannot read the trust store {self.trust_dir}: {exc}"
        report = check_env(self.releases.env_dir(launch.version), trusted)
        if report.ok:
            return None
        listed = "; ".join(report.problems[:5]) + (f"; and {len(report.problems) - 5} more" if len(report.problems) > 5 else "")
        log.critical("agent release %s does not match its signed release: %s", launch.version, listed)
        return f"integrity: the launcher refused to start it ({listed})"

    def _signal(self, signum: int, _frame: object) -> None:
        self._stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def run(self) -> int:
        """Start envs until the agent exits in a way only systemd should handle; return the exit code."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._signal)
        relay = NotifyRelay(os.environ.get("NOTIFY_SOCKET"))
        try:
            for _ in range(MAX_QUICK_RESTARTS):
                rc, again = self._run_once(relay)
                if not again or self._stopping.is_set():
                    return rc
            log.error("%d restarts in a row; leaving the next one to systemd", MAX_QUICK_RESTARTS)
            return 1
        finally:
            relay.close()

    def _run_once(self, relay: NotifyRelay) -> tuple[int, bool]:
        launch = self.releases.begin_start()
        what = f"agent release {launch.version}" if launch.version else "the OS image's agent"
        log.info("starting %s%s", what, f" (trial start {launch.start})" if launch.trial else "")
        notify(f"STATUS=starting {what}", env={"NOTIFY_SOCKET": relay.upstream} if relay.upstream else {})
        problem = self._precheck(launch)
        if problem is not None:  # never start code that does not match its signed release
            if launch.trial:
                self.releases.fail_trial(launch.version or "", problem, immediate=True)
            else:
                self.releases.fall_back(launch.version, problem)
            return EXIT_INTEGRITY, True
        relay.ready.clear()
        started = time.monotonic()
        self._child = subprocess.Popen(self.command(launch), env=self._child_env(relay))
        committed = not launch.trial
        ready_at: float | None = None
        failure: str | None = None
        while True:
            try:
                rc = self._child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if committed or self._stopping.is_set():
                continue
            now = time.monotonic()
            if relay.ready.is_set():
                ready_at = ready_at or now
                if now - ready_at >= self.health_grace:
                    committed = self.releases.commit_trial(launch.version or "")
            elif now - started > self.ready_timeout and failure is None:
                failure = f"no READY within {self.ready_timeout:.0f}s"
                self._child.terminate()
                try:
                    self._child.wait(10)
                except subprocess.TimeoutExpired:
                    self._child.kill()
        self._child = None
        if self._stopping.is_set():
            return (0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else _code(rc)), False
        if rc == EXIT_RESTART:
            return 0, True  # a release was installed: start whatever current.json says now
        if launch.trial and not committed:
            reason = failure or describe_exit(rc)
            self.releases.fail_trial(launch.version or "", reason, immediate=rc == EXIT_INTEGRITY)
            return _code(rc), True
        if rc == EXIT_INTEGRITY and launch.version is not None:
            if self.releases.fall_back(launch.version, describe_exit(rc)):
                return _code(rc), True
        return _code(rc), False


def describe_exit(rc: int) -> str:
    if rc == EXIT_INTEGRITY:
        return "the agent refused to run: its code does not match the signed release (integrity)"
    if rc < 0:
        try:
            return f"the agent was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"the agent was killed by signal {-rc}"
    return f"the agent exited with status {rc} before it was healthy"


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    agent_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, agent_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="edgewise-agent-launcher", description="Start the edgewise agent from its current (or trial) release env.")
    p.add_argument("--state-dir", type=Path, required=True, help="The agent's state directory (passed on as --state-dir).")
    p.add_argument("--releases-dir", type=Path, default=None, help="Release envs and current.json [default: STATE/releases].")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="Seconds a trial env has to report READY.")
    p.add_argument("--health-grace", type=float, default=10.0, help="Seconds a trial env must stay up after READY to be committed.")
    p.add_argument("--trust-dir", type=Path, default=None, help="Public keys releases must be signed with [default: STATE/trust].")
    p.add_argument("--no-verify", action="store_true", help="Do not check release envs before starting them (the agent still checks itself).")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launcher = Launcher(args.state_dir, agent_args, releases_dir=args.releases_dir, ready_timeout=args.ready_timeout, health_grace=args.health_grace,
                        trust_dir=args.trust_dir, verify=not args.no_verify)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
