"""The gateway's artifact cache over real HTTP: verified before served, Range requests, offline serving."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import pytest
from conftest import free_port
from test_agent_support import BundleServer

from edgewise.agent.gateway import Gateway, GatewayConfig

URL = "/api/v1/models/digits/1.0.0/bundle"


@pytest.fixture()
def upstream():
    server = BundleServer()  # plays the control plane's HTTP side
    yield server
    server.close()


def _gateway(tmp_path, upstream) -> Gateway:
    # No control plane broker at all: the gateway serves its site whether or not its uplink is there.
    cfg = GatewayConfig(state_dir=tmp_path / "gw", upstream_server=upstream.base_url,
                        upstream_broker=f"mqtt://127.0.0.1:{free_port()}", listen_host="127.0.0.1", mqtt_port=0,
                        http_port=0, require_auth=False, reconnect_min_s=0.2, reconnect_max_s=0.5)
    return Gateway(cfg).start()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_a_cached_bundle_is_served_with_range_requests_after_the_upstream_is_gone(tmp_path, upstream, bundles):
    data = bundles["1.0.0"].read_bytes()
    upstream.add(URL, data)
    gw = _gateway(tmp_path, upstream)
    try:
        gw.store.learn_artifact(URL, hashlib.sha256(data).hexdigest(), len(data))
        status, body, _ = _get(gw.http_url + URL)
        assert status == 200 and body == data
        upstream.files.clear()  # the control plane is out of reach from now on
        status, body, headers = _get(gw.http_url + URL, {"Range": "bytes=100-"})
        assert status == 206 and body == data[100:]
        assert headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert _get(gw.http_url + URL, {"Range": f"bytes={len(data)}-"})[0] == 416
        assert gw.cache.fetched == 1 and [p for p, _ in upstream.requests] == [URL]
    finally:
        gw.stop()


def test_bytes_that_differ_from_the_desired_state_are_never_served_or_cached(tmp_path, upstream, bundles):
    data = bundles["1.0.0"].read_bytes()
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF
    upstream.add(URL, bytes(tampered))
    gw = _gateway(tmp_path, upstream)
    try:
        gw.store.learn_artifact(URL, hashlib.sha256(data).hexdigest(), len(data))
        status, body, _ = _get(gw.http_url + URL)
        assert status == 502
        detail = json.loads(body)["detail"]
        assert "sha256" in detail and "not served" in detail
        assert not any(p.name == hashlib.sha256(data).hexdigest() for p in (tmp_path / "gw" / "cache").iterdir())
        upstream.files[URL] = data  # the upstream is fixed: the next request fetches the right bytes
        assert _get(gw.http_url + URL)[:2] == (200, data)
    finally:
        gw.stop()


def test_an_artifact_that_is_not_cached_while_the_uplink_is_down_gets_503_saying_so(tmp_path, upstream, bundles):
    data = bundles["1.0.0"].read_bytes()
    gw = _gateway(tmp_path, upstream)
    upstream.close()  # uplink down before anything was cached
    try:
        gw.store.learn_artifact(URL, hashlib.sha256(data).hexdigest(), len(data))
        status, body, _ = _get(gw.http_url + URL)
        assert status == 503 and "uplink is down" in json.loads(body)["detail"]
    finally:
        gw.stop()
