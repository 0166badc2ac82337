"""Several variants per model version: stored side by side, each device given the fastest it can run."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from conftest import admin_headers
from edgewise.bundle import build_bundle
from edgewise.control import ServerSettings, create_app
from edgewise.control import variants as v
from edgewise.control.db import Database, make_engine, upgrade
from edgewise.control.deployments import deploy
from edgewise.control.devices import register_device
from edgewise.control.models import Device, ModelVersion
from edgewise.control.registry import Registry

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
X86_VNNI = {"arch": "x86_64", "ram_mb": 8192, "cores": 8, "hardware_class": "x86-gateway", "providers": [CPU],
            "isa": ["avx2", "avx512_vnni"]}
PI = {"arch": "aarch64", "ram_mb": 1024, "cores": 4, "hardware_class": "rpi4", "providers": [CPU], "isa": ["asimd"]}
GPU = {"arch": "x86_64", "ram_mb": 8192, "cores": 8, "hardware_class": "gpu-box", "providers": [CUDA, CPU], "isa": ["avx2"]}
TINY = {"arch": "armv7l", "ram_mb": 128, "cores": 1, "hardware_class": "tiny", "providers": [CPU], "isa": ["neon"]}

# name -> (min_ram_mb, measured median latency ms, execution provider, required ISA features)
VARIANTS = {
    "fp32": (400, 6.0, CPU, []),
    "int8": (200, 2.0, CPU, ["avx512_vnni"]),
    "fp16": (300, 4.0, CUDA, []),
}


@pytest.fixture(scope="module")
def variant_bundles(tmp_path_factory, digits_models, signer):
    """digits-v 2.0.0 as three signed variants with the figures and needs of VARIANTS (the same ONNX model:
    what differs, and what the control plane reads, is each manifest)."""
    d = tmp_path_factory.mktemp("variants")
    out = {}
    for name, (ram, latency, provider, isa) in VARIANTS.items():
        path = d / f"digits-v-2.0.0-{name}.ewb"
        build_bundle(digits_models["logreg"], name="digits-v", version="2.0.0", signer=signer, out=path,
                     min_ram_mb=ram, runtime={"execution_provider": provider}, metadata={"requires_isa": isa},
                     variant={"name": name, "recipe": name, "profile": "x86-gateway",
                              "figures": {"latency_b1_median_ms": latency}})
        out[name] = path
    return out


@pytest.fixture()
def settings(tmp_path, keys_dir):
    return ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])


@pytest.fixture()
def client(settings):
    app = create_app(settings)
    with TestClient(app) as c:
        c.headers.update(admin_headers(settings.data_dir))
        c.services = app.state.control  # type: ignore[attr-defined]
        yield c


def _upload(client, path):
    return client.post("/api/v1/models", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})


def _devices(client, **hardware):
    with client.services.db.session() as s:
        for device_id, hw in hardware.items():
            device, _ = register_device(s, device_id, [])
            device.hardware = hw
        s.commit()


def _row(name: str, *, ram=0, latency=None, provider=None, providers=None, isa=(), profile=None, size=1000, row_id=1):
    """A registry row as the choice sees it (no bundle needed for the rules themselves)."""
    manifest = {"requirements": {"min_ram_mb": ram, "providers": providers or [CPU]},
                "runtime": {"execution_provider": provider} if provider else None,
                "metadata": {"requires_isa": list(isa)},
                "variant": {"name": name, "profile": profile,
                            "figures": {"latency_b1_median_ms": latency} if latency is not None else {}}}
    return ModelVersion(id=row_id, name="m", version="1.0.0", variant=name, sha256="0" * 64, size=size, key_id="k",
                        manifest=manifest, path="x")


# -- the choice ----------------------------------------------------------------------------------------


def test_the_fastest_measured_variant_that_fits_is_chosen_with_a_reason():
    rows = [_row("fp32", ram=400, latency=6.0, row_id=1), _row("int8", ram=200, latency=2.0, row_id=2)]
    row, reason = v.pick(rows, Device(id="d", hardware=PI))
    assert row.variant == "int8"
    assert reason.startswith("int8: fastest") and "1024 MB RAM and CPUExecutionProvider" in reason and "6 ms" in reason


def test_a_variant_that_needs_more_ram_than_the_device_has_is_never_chosen():
    rows = [_row("fp32", ram=400, latency=6.0, row_id=1), _row("int8", ram=2048, latency=2.0, row_id=2)]
    row, reason = v.pick(rows, Device(id="d", hardware=PI))
    assert row.variant == "fp32" and "only variant that fits" in reason


def test_a_variant_whose_execution_provider_the_device_lacks_is_never_chosen():
    rows = [_row("fp32", latency=6.0, row_id=1), _row("fp16", latency=1.0, provider=CUDA, row_id=2)]
    assert v.pick(rows, Device(id="d", hardware=PI))[0].variant == "fp32"
    assert v.pick(rows, Device(id="g", hardware=GPU))[0].variant == "fp16"


def test_a_variant_that_needs_an_isa_feature_goes_only_to_devices_that_report_it():
    rows = [_row("fp32", latency=6.0, row_id=1), _row("int8", latency=2.0, isa=["avx512_vnni"], row_id=2)]
    assert v.pick(rows, Device(id="x", hardware=X86_VNNI))[0].variant == "int8"
    assert v.pick(rows, Device(id="g", hardware=GPU))[0].variant == "fp32"


def test_without_latency_figures_the_precision_order_int8_fp16_fp32_decides():
    rows = [_row("fp32", row_id=1), _row("fp16", row_id=2), _row("pruned-int8", size=500, row_id=3),
            _row("int8-qdq", size=900, row_id=4)]
    row, reason = v.pick(rows, Device(id="d", hardware=X86_VNNI))
    assert row.variant == "pruned-int8" and "precision order" in reason  # int8 first, then the smaller bundle
    assert v.pick(rows[:2], Device(id="d", hardware=X86_VNNI))[0].variant == "fp16"


def test_variants_built_for_the_devices_hardware_class_come_first():
    rows = [_row("int8-x86", latency=1.0, profile="x86-gateway", row_id=1),
            _row("int8-rpi4", latency=9.0, profile="rpi4", row_id=2)]
    row, reason = v.pick(rows, Device(id="p", hardware=PI))
    assert row.variant == "int8-rpi4" and "built for rpi4" in reason
    assert v.pick(rows, Device(id="x", hardware=X86_VNNI))[0].variant == "int8-x86"


def test_a_device_that_never_reported_its_hardware_gets_the_fastest_variant():
    rows = [_row("fp32", ram=400, latency=6.0, row_id=1), _row("int8", ram=99999, latency=2.0, row_id=2)]
    row, reason = v.pick(rows, Device(id="new", hardware=None))
    assert row.variant == "int8" and "not reported" in reason


def test_a_device_that_can_run_no_variant_is_refused_with_each_reason():
    rows = [_row("fp32", ram=400, row_id=1), _row("fp16", provider=CUDA, row_id=2)]
    with pytest.raises(v.NoVariantFitsError, match="needs 400 MB RAM, the device has 128 MB.*needs CUDAExecutionProvider"):
        v.pick(rows, Device(id="tiny", hardware=TINY))


def test_an_override_wins_and_one_the_version_lacks_falls_back_to_the_automatic_choice():
    rows = [_row("fp32", latency=6.0, row_id=1), _row("int8", latency=2.0, row_id=2)]
    assert v.pick(rows, Device(id="d", hardware=PI), override="fp32") == (rows[0], "override")
    row, reason = v.pick(rows, Device(id="d", hardware=PI), override="pruned")
    assert row.variant == "int8" and reason.startswith("override pruned is not a variant of this version")


# -- registry, REST, deployments -----------------------------------------------------------------------


def test_two_variants_of_one_version_upload_without_a_conflict(client, variant_bundles):
    for name in ("fp32", "int8"):
        r = _upload(client, variant_bundles[name])
        assert r.status_code == 201, r.text
        assert r.json()["variant"] == name and r.json()["url"].endswith(f"?variant={name}")
    assert _upload(client, variant_bundles["int8"]).status_code == 200  # the same bytes again: idempotent
    assert client.get("/api/v1/models").json() == [{"name": "digits-v", "versions": ["2.0.0"], "latest": "2.0.0"}]
    listed = client.get("/api/v1/models/digits-v/2.0.0/variants").json()
    assert [(x["variant"], x["min_ram_mb"], x["latency_ms"], x["requires_isa"]) for x in listed] == [
        ("fp32", 400, 6.0, []), ("int8", 200, 2.0, ["avx512_vnni"])]
    dl = client.get("/api/v1/models/digits-v/2.0.0/bundle?variant=int8")
    assert dl.status_code == 200 and dl.content == variant_bundles["int8"].read_bytes()
    assert client.get("/api/v1/models/digits-v/2.0.0?variant=fp32").json()["manifest"]["variant"]["name"] == "fp32"
    r = client.get("/api/v1/models/digits-v/2.0.0?variant=int4")
    assert r.status_code == 404 and "fp32, int8" in r.json()["detail"]


def test_a_variant_uploaded_again_with_different_bytes_is_a_conflict(client, variant_bundles, digits_models, signer, tmp_path):
    assert _upload(client, variant_bundles["int8"]).status_code == 201
    other = tmp_path / "other-int8.ewb"
    build_bundle(digits_models["mlp"], name="digits-v", version="2.0.0", signer=signer, out=other, variant={"name": "int8"})
    r = _upload(client, other)
    assert r.status_code == 409 and "variant int8" in r.json()["detail"]


def test_a_deployment_to_a_device_list_gives_each_device_the_variant_it_can_run_fastest(client, variant_bundles):
    for path in variant_bundles.values():
        assert _upload(client, path).status_code == 201
    _devices(client, **{"tv-x86": X86_VNNI, "tv-pi": PI, "tv-gpu": GPU, "tv-other": PI})
    r = client.post("/api/v1/deployments", json={"model": "digits-v", "version": "2.0.0",
                                                "device_ids": ["tv-x86", "tv-pi", "tv-gpu"]})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["target_kind"] == "devices" and body["device_ids"] == ["tv-x86", "tv-pi", "tv-gpu"]
    assert body["variants"] == {"tv-x86": "int8", "tv-pi": "fp32", "tv-gpu": "fp16"}
    with client.services.db.session() as s:
        for device_id, name in body["variants"].items():
            device = s.get(Device, device_id)
            assert device.desired_variant == name
            assert device.desired_artifact["tuf_target"] == f"digits-v/2.0.0/{name}.ewb"
            data = client.get(device.desired_artifact["url"]).content  # what the device downloads
            assert hashlib.sha256(data).hexdigest() == device.desired_artifact["sha256"]
            assert data == variant_bundles[name].read_bytes()
        assert s.get(Device, "tv-other").desired_generation == 0  # not in the list
    assert client.get("/api/v1/devices/tv-gpu").json()["desired"]["variant"] == "fp16"


def test_a_deployment_that_a_listed_device_cannot_run_is_refused_and_records_nothing(client, variant_bundles):
    for path in variant_bundles.values():
        _upload(client, path)
    _devices(client, **{"tn-pi": PI, "tn-tiny": TINY})
    r = client.post("/api/v1/deployments", json={"model": "digits-v", "version": "2.0.0", "device_ids": ["tn-pi", "tn-tiny"]})
    assert r.status_code == 422 and "tn-tiny" in r.json()["detail"] and "128 MB" in r.json()["detail"]
    with client.services.db.session() as s:
        assert s.get(Device, "tn-pi").desired_generation == 0
    r = client.post("/api/v1/deployments", json={"model": "digits-v", "version": "2.0.0", "device_ids": ["tn-pi", "tn-ghost"]})
    assert r.status_code == 404 and "tn-ghost" in r.json()["detail"]


def test_an_operator_override_pins_a_device_to_a_variant_until_it_is_cleared(client, variant_bundles):
    for path in variant_bundles.values():
        _upload(client, path)
    _devices(client, **{"to-x86": X86_VNNI})
    url = "/api/v1/devices/to-x86/variant"
    assert client.get(url, params={"model": "digits-v", "version": "2.0.0"}).json()["variant"] == "int8"
    r = client.put(url, json={"model": "digits-v", "variant": "fp32"})
    assert r.status_code == 200 and r.json()["variant"] == "fp32" and r.json()["created_by"].endswith("user:admin)")
    choice = client.get(url, params={"model": "digits-v", "version": "2.0.0"}).json()
    assert (choice["variant"], choice["reason"]) == ("fp32", "override")
    with client.services.db.session() as s:
        result = deploy(s, None, "digits-v", "2.0.0", device_ids=["to-x86"])
        assert result.deployment.variants == {"to-x86": "fp32"}
    assert client.get(url).json()[0]["variant"] == "fp32"
    assert client.put(url, json={"model": "digits-v", "variant": None}).json()["variant"] is None
    assert client.get(url).json() == []
    r = client.put(url, json={"model": "digits-v", "variant": "int3"})
    assert r.status_code == 422 and "fp16, fp32, int8" in r.json()["detail"]


def test_a_single_bundle_without_a_variant_deploys_exactly_as_before(client, bundles):
    assert _upload(client, bundles["1.0.0"]).json()["variant"] == "default"
    _devices(client, **{"ts-1": TINY})  # 128 MB: still fits the digits bundle's estimated minimum
    r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "ts-1"})
    assert r.status_code == 201, r.text
    with client.services.db.session() as s:
        device = s.get(Device, "ts-1")
        assert device.desired_artifact["url"] == "/api/v1/models/digits/1.0.0/bundle"
        assert device.desired_artifact["tuf_target"] == "digits/1.0.0.ewb" and device.desired_variant == "default"
        assert Registry.get(s, "digits", "1.0.0").variant == "default"


def test_a_tag_deployment_and_a_rollback_choose_variants_per_device_too(client, variant_bundles):
    for path in variant_bundles.values():
        _upload(client, path)
    with client.services.db.session() as s:
        for device_id, hw in (("tt-x86", X86_VNNI), ("tt-pi", PI)):
            device, _ = register_device(s, device_id, ["shelf"])
            device.hardware = hw
        s.commit()
        assert deploy(s, None, "digits-v", "2.0.0", tag="shelf").deployment.variants == {"tt-x86": "int8", "tt-pi": "fp32"}
        back = deploy(s, None, "digits-v", "2.0.0", device_ids=["tt-x86"], rollback=True)
        assert back.states[0].target == "digits-v/2.0.0/int8.rollback.ewb" and back.states[0].rollback


def test_the_migration_keeps_stored_bundles_and_names_their_variant_from_the_manifest(tmp_path):
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    engine = make_engine(url)
    upgrade(engine, "0008")
    with engine.begin() as conn:
        for i, manifest in ((1, '{"variant": {"name": "int8"}}'), (2, '{"description": "no variant"}')):
            conn.execute(text("INSERT INTO model_versions (id, name, version, sha256, size, key_id, manifest, path, uploaded_at) "
                              f"VALUES ({i}, 'm', '1.0.{i}', '{i:064d}', 1, 'k', '{manifest}', 'm{i}.ewb', '2026-01-01 00:00:00')"))
    upgrade(engine, "0009")
    with Database(engine).session() as s:
        assert [r.variant for r in v.variants_of(s, "m", "1.0.1")] == ["int8"]
        assert [r.variant for r in v.variants_of(s, "m", "1.0.2")] == ["default"]
    engine.dispose()


def test_the_choice_rules_are_documented_by_runnable_examples():
    import doctest

    assert doctest.testmod(v).failed == 0
