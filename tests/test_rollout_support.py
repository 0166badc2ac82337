"""Helpers for the rollout tests: a real control plane (TestClient, SQLite, embedded broker) and devices
played through the real ingest path (the same ``Ingest.handle`` the MQTT bus calls with each message).

The engine's background loop is slowed to an hour per tick, so each test drives it by hand with
``fleet.tick(now)`` on a fake clock.
"""

from __future__ import annotations

import itertools
import time

import pytest
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise import protocol as p
from edgewise.control import ServerSettings, create_app
from edgewise.control.models import Device
from edgewise.protocol.messages import HardwareInfo, ShadowStats, UpdateResult

T0 = 1_800_000_000.0  # the fake clock's start (epoch seconds)


@dataclass
class Behaviour:
    """How a version behaves on a device: p95 latency per hardware class ("*" = any), errors, crash, shadow agreement."""

    latency_ms: dict[str, float] = field(default_factory=lambda: {"*": 10.0})
    error_rate: float = 0.0
    install: str = "ok"  # ok | failed | rolled_back
    reason: str | None = None
    shadow_agreement: float = 1.0
    confidence: float = 0.85  # mean top-1 confidence

    def p95(self, hw_class: str) -> float:
        return self.latency_ms.get(hw_class, self.latency_ms.get("*", 10.0))


HEALTHY = Behaviour()


class Fleet:
    """A control plane and the devices it manages, each played by the test."""

    def __init__(self, client: TestClient, settings: ServerSettings, tag: str = "fleet") -> None:
        self.client = client
        self.tag = tag
        self.rollout_id: int | None = None
        self.settings = settings
        self.services = client.app.state.control  # type: ignore[attr-defined]
        self.engine = self.services.rollouts
        self.hw: dict[str, str] = {}
        self.running: dict[str, str | None] = {}
        self.generation: dict[str, int | None] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self._seq = itertools.count(1)

    # -- devices ------------------------------------------------------------------------------------

    def handle(self, topic: str, msg: Any) -> None:
        self.services.ingest.handle(topic, p.encode(msg))

    def add(self, device_id: str, hw_class: str, tags: list[str]) -> None:
        self.hw[device_id] = hw_class
        self.running[device_id] = None
        self.generation[device_id] = None
        self.state(device_id)

    def state(self, device_id: str, last: UpdateResult | None = None) -> None:
        version = self.running[device_id]
        self.handle(p.topics.state(device_id), p.DeviceState(
            device_id=device_id, status="online", model="digits" if version else None, version=version,
            generation=self.generation[device_id], last_update=last, tags=[self.tag],
            hardware=HardwareInfo(arch="x86_64", cores=4, ram_mb=4096, hardware_class=self.hw[device_id],
                                  providers=["CPUExecutionProvider"]),
            ts=time.time()))

    def device(self, device_id: str) -> Device:
        with self.services.db.session() as s:
            d = s.get(Device, device_id)
            assert d is not None
            s.expunge(d)
            return d

    def follow(self) -> list[str]:
        """Every device converges to its desired state, installing as its behaviour says; returns who changed."""
        changed = []
        for device_id in self.hw:
            d = self.device(device_id)
            if d.desired_generation == self.generation[device_id] or d.desired_version is None:
                continue
            self.generation[device_id] = d.desired_generation
            if d.desired_version == self.running[device_id]:
                self.state(device_id)
                continue
            b = self.behaviours.get(d.desired_version, HEALTHY)
            if b.install == "ok" or d.desired_rollback:
                self.running[device_id] = d.desired_version
                result = UpdateResult(model="digits", version=d.desired_version, result="ok", at=time.time())
            else:
                result = UpdateResult(model="digits", version=d.desired_version, result=b.install, reason=b.reason,
                                      at=time.time())
            self.state(device_id, result)
            self.handle(p.topics.events(device_id, "update"), p.Event(
                device_id=device_id, seq=next(self._seq), ts=time.time(), kind="update",
                severity="info" if result.result == "ok" else "error", message="update",
                detail=result.model_dump(mode="json")))
            changed.append(device_id)
        return changed

    def report(self, device_ids: list[str] | None = None, windows: int = 1) -> None:
        """Each device sends summaries of what its running version (and any shadow candidate) did."""
        for device_id in device_ids or list(self.hw):
            version = self.running[device_id]
            if version is None:
                continue
            b = self.behaviours.get(version, HEALTHY)
            shadow = self.device(device_id).desired_shadow
            for _ in range(windows):
                n = 200
                conf_bin = min(9, int(b.confidence * 10))
                hist = [0] * 10
                hist[conf_bin] = n
                stats = None
                if shadow:
                    sb = self.behaviours.get(shadow["version"], HEALTHY)
                    stats = ShadowStats(model="digits", version=shadow["version"], compared=100,
                                        agreed=int(round(100 * sb.shadow_agreement)), errors=0,
                                        latency_p95_ms=sb.p95(self.hw[device_id]),
                                        committed_latency_p95_ms=b.p95(self.hw[device_id]))
                self.handle(p.topics.telemetry(device_id, "summary"), p.Summary(
                    device_id=device_id, seq=next(self._seq), ts=time.time(), model="digits", version=version,
                    window_s=10.0, inferences=n, errors=int(round(n * b.error_rate)), predictions=n,
                    latency_p50_ms=b.p95(self.hw[device_id]) / 2, latency_p95_ms=b.p95(self.hw[device_id]),
                    confidence_hist=hist, shadow=stats))

    def telemetry(self, device_id: str, *, inferences: int, errors: int, p95_ms: float, drift: float | None = None) -> None:
        """One telemetry sample (cumulative counters of the agent process, as the agent's monitor sends them)."""
        version = self.running[device_id]
        self.handle(p.topics.telemetry(device_id, "sample"), p.Telemetry(
            device_id=device_id, seq=next(self._seq), ts=time.time(), model="digits", version=version,
            inferences=inferences, errors=errors, window_s=10.0, window_inferences=100, latency_p95_ms=p95_ms,
            drift_score=drift))

    def event(self, device_id: str, kind: str, **detail: Any) -> None:
        self.handle(p.topics.events(device_id, "alert"), p.Event(
            device_id=device_id, seq=next(self._seq), ts=time.time(), kind=kind, severity="error", message=kind,
            detail=detail))

    # -- control plane ------------------------------------------------------------------------------

    def tick(self, now: float) -> dict[str, Any]:
        self.engine.tick(now=now)
        return self.status()

    def status(self, rollout_id: int | None = None) -> dict[str, Any]:
        rid = rollout_id if rollout_id is not None else self.rollout_id
        r = self.client.get(f"/api/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        return r.json()

    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        self.rollout_id = r.json()["id"]
        return r.json()

    def decisions(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.status()["decisions"] if kind is None or d["decision"] == kind]


def open_control_plane(data_dir, keys_dir, bundles, *, tick_s: float = 3600.0) -> tuple[TestClient, ServerSettings]:
    """Start a control plane (the caller ``__exit__``s the client) holding digits 1.0.0 and 1.1.0."""
    settings = ServerSettings(data_dir=data_dir, port=0, embedded_broker_port=0,
                              trust=[keys_dir / "signing.pub"], rollout_tick_s=tick_s)
    client = TestClient(create_app(settings))
    client.__enter__()
    client.headers.update(admin_headers(settings.data_dir))
    for version in ("1.0.0", "1.1.0"):
        r = client.post("/api/v1/models", content=bundles[version].read_bytes(),
                        headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
    return client, settings


def open_fleet(client: TestClient, settings: ServerSettings, devices: dict[str, str], tag: str) -> Fleet:
    """``devices`` (id -> hardware class), tagged ``tag``, running digits 1.0.0 and reporting its health."""
    fleet = Fleet(client, settings, tag)
    for device_id, hw in devices.items():
        fleet.add(device_id, hw, [tag])
    if devices:
        r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "tag": tag})
        assert r.status_code == 201, r.text
        fleet.follow()
        fleet.report()
    return fleet


def finish(fleet: Fleet) -> None:
    """Abort the fleet's rollout if it is still going, so it does not take part in later tests' ticks."""
    if fleet.rollout_id is not None and fleet.status()["state"] not in ("completed", "halted", "aborted"):
        fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/abort")


def wave(name: str, percent: float | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, **kw}
    if percent is not None:
        out["percent"] = percent
    return out


ERROR = "failed_fraction > 0.2 or error_rate > 0.05 or p95_ratio > 1.5 or crashes > 0 or shadow_agreement < 0.9"
SUCCESS = "reporting >= 1 and error_rate <= 0.01"


_fleets = itertools.count(1)


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir, bundles):
    """One control plane per test module; each test has its own devices, tag and rollout (``make``)."""
    client, settings = open_control_plane(tmp_path_factory.mktemp("rollout") / "cp", keys_dir, bundles)
    yield client, settings
    client.__exit__(None, None, None)


@pytest.fixture()
def make(cp):
    """``make({device: hardware_class})`` -> a Fleet of fresh devices (ids suffixed, own tag) running 1.0.0."""
    made = []

    def _make(devices: dict[str, str]) -> Fleet:
        n = next(_fleets)
        fleet = open_fleet(*cp, {f"{d}-{n}": hw for d, hw in devices.items()}, tag=f"fleet-{n}")
        made.append(fleet)
        return fleet

    yield _make
    for f in made:
        finish(f)


def spec(fleet: Fleet, *waves: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"model": "digits", "version": "1.1.0", "tag": fleet.tag, "waves": list(waves), **kw}
