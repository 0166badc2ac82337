"""The pure helpers of benchmarks/bench_scale.py (issue 9 SIM10K): percentiles, ingest lag, cluster estimates.

The benchmark itself (Mosquitto + control plane + 10,000 simulated devices) is run by `make bench`; no figure is
asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scale  # noqa: E402


def test_percentile_matches_numpys_linear_interpolation() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0, 1, 50, 95, 99, 100):
        assert bench_scale.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none() -> None:
    assert bench_scale.percentile([], 99) is None


def test_percentile_outside_0_to_100_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="150"):
        bench_scale.percentile([1.0], 150)


def test_lag_stats_measure_device_ts_to_received_at_in_milliseconds() -> None:
    pairs = [(100.0, 100.0 + lag / 1000) for lag in range(1, 101)]  # lags 1..100 ms
    s = bench_scale.lag_stats(pairs)
    assert s["count"] == 100
    assert s["p50_ms"] == pytest.approx(50.5, abs=0.1)
    assert s["p99_ms"] == pytest.approx(99.0, abs=0.1)
    assert s["max_ms"] == pytest.approx(100.0, abs=0.1)


def test_lag_stats_show_a_growing_lag_between_first_and_last_tenth() -> None:
    # arrival order, not input order, decides which tenth a record is in
    pairs = [(float(i), i + (0.01 if i < 50 else 2.0)) for i in range(100)][::-1]
    s = bench_scale.lag_stats(pairs)
    assert s["p99_first_tenth_ms"] == pytest.approx(10.0, abs=0.1)
    assert s["p99_last_tenth_ms"] == pytest.approx(2000.0, abs=0.1)


def test_lag_stats_of_no_rows_say_count_zero() -> None:
    assert bench_scale.lag_stats([]) == {"count": 0}


def test_cluster_estimate_scales_per_core_rate_by_workers_and_efficiency() -> None:
    e = bench_scale.cluster_estimate(1000.0, machines=4, cores_per_machine=8, telemetry_s=2.0, reserved_cores=1, efficiency=0.5)
    assert e == {"machines": 4, "ingest_workers": 28, "msgs_per_s": 14_000, "devices": 28_000}


def test_cluster_estimate_refuses_machines_without_a_core_for_ingest() -> None:
    with pytest.raises(ValueError, match="more cores than reserved"):
        bench_scale.cluster_estimate(1000.0, machines=1, cores_per_machine=1, telemetry_s=2.0)


# -- the simulator's download-cost model (sim.virtual download / serve_peers) ----------------------------------------

import hashlib  # noqa: E402
import time  # noqa: E402
import secrets  # noqa: E402

import httpx  # noqa: E402

from edgewise.sim.virtual import VirtualDeviceSpec, VirtualFleet  # noqa: E402
from test_sim_support import Api, build_versions, start_control_plane  # noqa: E402


@pytest.fixture(scope="module")
def plane(tmp_path_factory, mosquitto, keys_dir, signer, digits_models):
    d = tmp_path_factory.mktemp("sim10k-cp")
    cp = start_control_plane(d / "cp", mosquitto, keys_dir / "signing.pub")
    api = Api(cp)
    paths = build_versions(d / "bundles", digits_models["logreg"], signer, ["1.0.0"])
    for path in paths.values():
        api.upload(path)
    yield cp, api, hashlib.sha256(paths["1.0.0"].read_bytes()).hexdigest()
    api.close()
    cp.stop()


def _specs(n: int, *tags: str) -> list[VirtualDeviceSpec]:
    stem = f"dl-{secrets.token_hex(3)}"
    return [VirtualDeviceSpec(device_id=f"{stem}-{i}", tags=list(tags), install_s=0.1) for i in range(n)]


def test_simulated_download_fetches_the_bundle_from_the_control_plane_before_installing(plane, mosquitto) -> None:
    cp, api, _sha = plane
    tag = f"dl{secrets.token_hex(3)}"
    specs = _specs(2, tag)
    with VirtualFleet(mosquitto, cp.url, cp.admin_token, specs, {}, download=True) as fleet:
        fleet.wait_connected(10)
        api.wait_registered([s.device_id for s in specs])
        api.deploy("1.0.0", tag=tag)
        fleet.wait_versions({s.device_id: "1.0.0" for s in specs}, 20)
        d = fleet.summary()["downloads"]
    assert (d["from_server"], d["from_peer"], d["failed"]) == (2, 0, 0)
    assert d["bytes"] > 0


def test_a_simulated_device_serves_only_the_bundles_it_holds_to_its_peers(plane, mosquitto) -> None:
    cp, api, sha = plane
    tag = f"pe{secrets.token_hex(3)}"
    holder, other = _specs(2, "pe-common")
    holder.tags.append(tag)
    with VirtualFleet(mosquitto, cp.url, cp.admin_token, [holder, other], {}, serve_peers=True) as fleet:
        fleet.wait_connected(10)
        api.wait_registered([holder.device_id, other.device_id])
        api.deploy("1.0.0", tag=tag)
        fleet.wait_versions({holder.device_id: "1.0.0"}, 20)
        got = httpx.get(f"{fleet.peer_url(holder.device_id)}/v1/peer/bundles/{sha}", timeout=5)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha
        assert httpx.get(f"{fleet.peer_url(other.device_id)}/v1/peer/bundles/{sha}", timeout=5).status_code == 404
        assert httpx.get(f"{fleet.peer_url(holder.device_id)}/v1/peer/bundles/{'0' * 64}", timeout=5).status_code == 404
        assert fleet.call(lambda: fleet.devices[holder.device_id].state().holds) == [sha]


def test_a_simulated_device_downloads_from_the_peer_the_control_plane_hints(plane, mosquitto) -> None:
    cp, api, sha = plane
    common, first, second = (f"{w}{secrets.token_hex(3)}" for w in ("co", "fi", "se"))
    holder, later = _specs(2, common)
    holder.tags.append(first)
    later.tags.append(second)
    with VirtualFleet(mosquitto, cp.url, cp.admin_token, [holder, later], {}, serve_peers=True) as fleet:
        fleet.wait_connected(10)
        api.wait_registered([holder.device_id, later.device_id])
        api.deploy("1.0.0", tag=first)
        fleet.wait_versions({holder.device_id: "1.0.0"}, 20)
        time.sleep(1.0)  # its state with holds reaches the control plane's peer directory
        api.deploy("1.0.0", tag=second)
        fleet.wait_versions({later.device_id: "1.0.0"}, 20)
        d = fleet.summary()["downloads"]
    assert (d["from_server"], d["from_peer"], d["failed"]) == (1, 1, 0)


def test_sim_running_without_a_version_is_refused_naming_the_form() -> None:
    from typer.testing import CliRunner

    from edgewise.cli.main import app

    result = CliRunner().invoke(app, ["sim", "--devices", "1", "--running", "digits"])
    assert result.exit_code != 0
    assert "MODEL:VERSION" in result.output
