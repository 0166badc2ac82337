"""Helpers for the dashboard tests that click through pages: a headless Debian chromium driven by Playwright, and
scripted devices that speak the real protocol to the control plane's embedded broker.

Playwright's own browser downloads are never used (no `playwright install`): it drives /usr/bin/chromium.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgewise import protocol as p

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is not installed: run `make test` (it runs apt-get install chromium)")
    return exe


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' (playwright drives the system chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser) -> Iterator[Any]:
    """A fresh browser context (no cookies, no sessionStorage) and a page in it; requests it made are in
    ``page.requested``."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()
    pg.requested = []
    pg.on("request", lambda r: pg.requested.append(r.url))
    yield pg
    ctx.close()


def sign_in(page: Any, cp: Any, route: str = "") -> None:
    """Sign in through the form as the bootstrap admin (session cookie + CSRF header, as a person would)."""
    password = (cp.settings.data_dir / "initial-admin-password").read_text().strip()
    page.goto(f"{cp.url}/{route}")
    page.fill("#login-username", "admin")
    page.fill("#login-password", password)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#whoami-name:has-text('admin')")


class ScriptedDevice:
    """One device played over MQTT: retained state, telemetry samples, events (protocol messages, nothing else)."""

    def __init__(self, cp: Any, device_id: str) -> None:
        self.id = device_id
        host, port = cp.settings.effective_broker_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(device_id, cp.issue_device_token(device_id))
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.seq = 0
        self.event_seq = 0
        self.inferences = 0
        self.errors = 0

    def state(self, *, status: str = "online", model: str | None = "digits", version: str | None = "1.0.0",
              tags: list[str] | None = None, hardware_class: str | None = None, **extra: Any) -> None:
        hw = p.HardwareInfo(arch="x86_64", cores=4, ram_mb=2048, providers=["CPUExecutionProvider"],
                            hardware_class=hardware_class, isa=["avx2"], disk_mb=16000)
        msg = p.DeviceState(device_id=self.id, status=status, model=model, version=version, tags=tags or [],
                            hardware=hw, ts=time.time(), **extra)
        self.client.publish(p.topics.state(self.id), p.encode(msg), qos=1, retain=True).wait_for_publish(5)

    def telemetry(self, n: int = 1, *, p95_ms: float = 2.0, errors_per_sample: int = 0, spacing_s: float = 10.0,
                  model: str = "digits", version: str = "1.0.0", **extra: Any) -> None:
        """``n`` samples, ``spacing_s`` apart in device time, ending now."""
        items = []
        now = time.time()
        for i in range(n):
            self.inferences += 100
            self.errors += errors_per_sample
            items.append(p.Telemetry(
                device_id=self.id, seq=self.seq, ts=now - (n - 1 - i) * spacing_s, model=model, version=version,
                inferences=self.inferences, errors=self.errors, window_inferences=100, window_s=spacing_s,
                latency_p50_ms=p95_ms / 2, latency_p95_ms=p95_ms + i * 0.1, cpu_percent=20.0 + i, mem_percent=30.0,
                outbox_pending=i, **extra))
            self.seq += 1
        self.client.publish(p.topics.telemetry(self.id), p.encode(p.Batch(device_id=self.id, items=items)),
                            qos=1).wait_for_publish(5)

    def event(self, kind: str, message: str, *, severity: str = "info", detail: dict[str, Any] | None = None) -> None:
        ev = p.Event(device_id=self.id, seq=self.event_seq, ts=time.time(), kind=kind, severity=severity,  # type: ignore[arg-type]
                     message=message, detail=detail or {})
        self.event_seq += 1
        self.client.publish(p.topics.events(self.id), p.encode(p.Batch(device_id=self.id, items=[ev])),
                            qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
