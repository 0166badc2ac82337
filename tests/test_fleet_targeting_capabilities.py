"""Device capabilities: read from this machine, reported by a real agent, used by groups and variant choice."""

from __future__ import annotations

import os
import platform
import uuid

import pytest

from conftest import free_port
from edgewise.agent import capabilities as caps
from edgewise.agent.config import ConfigError, load_config
from edgewise.bundle import build_bundle
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import http_json
from test_agent_support import make_agent, wait_for


def test_capabilities_detected_on_this_machine_are_sane(tmp_path):
    hw = caps.detect(state_dir=tmp_path, hardware_class="ci-runner")
    assert hw.arch == platform.machine() and hw.hardware_class == "ci-runner"
    assert 1 <= hw.cores <= (os.cpu_count() or 1)
    assert 64 <= hw.ram_mb < 16 * 2**20  # at least 64 MB, less than 16 TB
    assert hw.disk_mb > 0
    assert "CPUExecutionProvider" in hw.providers and hw.runtime.startswith("onnxruntime ")
    assert hw.isa == sorted(set(hw.isa)) and set(hw.isa) <= caps.RELEVANT_ISA
    if platform.machine() == "x86_64":
        assert "sse4_2" in hw.isa  # every x86-64 ONNX Runtime supports has it
    assert hw.temperature_c is None or -40 < hw.temperature_c < 150


def test_isa_features_are_read_from_x86_flags_and_arm_features_and_filtered():
    x86 = "processor : 0\nflags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma avx512f avx512_vnni ht\n"
    arm = "processor : 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp i8mm\n"
    assert caps.isa_flags(x86) == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_1", "sse4_2"]
    assert caps.isa_flags(arm) == ["asimd", "asimddp", "i8mm"]
    assert caps.isa_flags("no cpu flags here") == []


def test_the_hottest_plausible_thermal_zone_is_the_temperature(tmp_path):
    for i, raw in enumerate(["48500", "61300", "-273000", "garbage"]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(raw + "\n")
    assert caps.temperature_c(tmp_path) == 61.3  # millidegrees; the -273 °C sensor and the unreadable one are ignored
    assert caps.temperature_c(tmp_path / "missing") is None


def test_hardware_class_comes_from_the_agent_config_and_is_validated(tmp_path):
    config = load_config(tmp_path / "a", device_id="cap-cfg", hardware_class="rpi4")
    assert caps.detect_for(config).hardware_class == "rpi4"
    assert "hardware_class" in (tmp_path / "a" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="hardware_class"):
        load_config(tmp_path / "b", device_id="cap-bad", hardware_class="rpi 4!")


@pytest.fixture()
def control_plane(tmp_path, keys_dir):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                              trust=[keys_dir / "signing.pub"])
    cp = ControlPlane(settings)
    cp.start()
    yield cp
    cp.stop()


def test_a_real_agent_reports_its_class_joins_a_group_and_installs_the_variant_built_for_it(
        control_plane, tmp_path, keys_dir, digits_models, signer):
    cp = control_plane
    device_id = f"cap-{uuid.uuid4().hex[:6]}"
    for name, profile, latency in (("fp32", "x86-gateway", 6.0), ("int8-rpi4", "rpi4", 9.0)):
        path = tmp_path / f"{name}.ewb"
        build_bundle(digits_models["logreg"], name="digits-c", version="1.0.0", signer=signer, out=path,
                     variant={"name": name, "profile": profile, "figures": {"latency_b1_median_ms": latency}})
        upload_bundle(cp.url, path, cp.admin_token)
    http_json("POST", f"{cp.url}/api/v1/groups", {"name": "pis", "query": {
        "where": [{"field": "hardware.hardware_class", "op": "==", "value": "rpi4"},
                  {"field": "hardware.providers", "op": "contains", "value": "CPUExecutionProvider"}]}},
              token=cp.admin_token)

    state_dir = tmp_path / "dev"
    (state_dir / "keys").mkdir(parents=True)
    (state_dir / "keys" / "device.token").write_text(cp.issue_device_token(device_id))
    agent = make_agent(state_dir, keys_dir, device_id=device_id, server_url=cp.url,
                       broker_url=cp.settings.effective_broker_url, hardware_class="rpi4")
    agent.start()
    try:
        members = wait_for(lambda: [d for d in http_json("GET", f"{cp.url}/api/v1/groups/pis/devices", token=cp.admin_token)
                                    if d["id"] == device_id], 30, what="the agent to join the group")
        hardware = members[0]["hardware"]
        assert hardware["hardware_class"] == "rpi4" and hardware["ram_mb"] > 0 and hardware["disk_mb"] > 0
        assert hardware["isa"] == caps.cpu_isa()

        r = http_json("POST", f"{cp.url}/api/v1/deployments",
                      {"model": "digits-c", "version": "1.0.0", "device_ids": [device_id]}, token=cp.admin_token)
        assert r["variants"] == {device_id: "int8-rpi4"}  # built for its class, though slower where measured
        wait_for(lambda: (m := agent.current_model) is not None and m.manifest.variant is not None
                 and m.manifest.variant.name == "int8-rpi4", 30, what="the agent to run the rpi4 variant")
    finally:
        agent.stop()


def test_the_isa_parsing_is_documented_by_runnable_examples():
    import doctest

    assert doctest.testmod(caps).failed == 0
