"""Device profiles: built-ins, user YAML, clear errors, the honest microcontroller refusal, target matching."""

from __future__ import annotations

import pytest

from edgewise.lab.optimize import (
    DeviceProfile,
    MachineInfo,
    ProfileError,
    TargetOutOfReachError,
    list_profiles,
    load_profile,
    optimize,
)


def test_builtin_profiles_all_load():
    names = list_profiles()
    assert {"rpi4", "rpi5", "jetson-orin-nano", "x86-gateway", "mcu-cortex-m7"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.source == "built-in"
        assert p.threads >= 1 and p.ram_budget_mb > 0 and p.execution_providers


def test_int8_scheme_follows_the_isa():
    assert load_profile("rpi5").int8_scheme()[:2] == ("S8S8", False)
    assert load_profile("x86-gateway").int8_scheme()[:2] == ("U8S8", True)  # no VNNI listed: reduce_range
    vnni = load_profile("x86-gateway").model_copy(update={"isa": ["avx2", "avx512_vnni"]})
    assert vnni.int8_scheme()[:2] == ("U8S8", False)


def test_user_yaml_profile(tmp_path):
    f = tmp_path / "box.yaml"
    f.write_text("name: box\narch: amd64\nthreads: 2\nram_budget_mb: 256\nisa: [AVX2]\nbatch_size: 4\n")
    p = load_profile(f)
    assert (p.name, p.arch, p.isa, p.batch_size, p.source) == ("box", "x86_64", ["avx2"], 4, str(f))
    assert p.execution_providers == ["CPUExecutionProvider"] and p.latency_budget_ms is None


@pytest.mark.parametrize(
    "text, field",
    [
        ("name: b\narch: x86_64\nthreads: zero\nram_budget_mb: 256\n", "threads"),
        ("name: b\narch: x86_64\nthreads: 2\nram_budget_mb: -5\n", "ram_budget_mb"),
        ("name: b\narch: x86_64\nthreads: 2\nram_budget_mb: 256\nthraeds: 4\n", "thraeds"),
        ("name: b\nthreads: 2\nram_budget_mb: 256\n", "arch"),
        ("name: b\narch: x86_64\nthreads: 2\nram_budget_mb: 256\ncpu_match: '(['\n", "cpu_match"),
    ],
)
def test_bad_yaml_names_the_field(tmp_path, text, field):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ProfileError, match=f"field '{field}'"):
        load_profile(f)


def test_unparsable_yaml_and_unknown_names(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: b\narch: [x86_64\n")
    with pytest.raises(ProfileError, match="not valid YAML at line"):
        load_profile(f)
    with pytest.raises(ProfileError, match="no built-in profile 'rpi9'.*rpi4"):
        load_profile("rpi9")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")


def test_microcontroller_is_refused_with_what_would_fit(tmp_path):
    reason = load_profile("mcu-cortex-m7").out_of_reach()
    assert reason and "no general-purpose OS" in reason and "512 KB" in reason
    assert "TensorFlow Lite for Microcontrollers" in reason and "microTVM" in reason
    with pytest.raises(TargetOutOfReachError, match="out of reach for ONNX Runtime"):
        optimize(tmp_path / "whatever.onnx", {}, {}, "mcu-cortex-m7", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cli_refuses_microcontroller_with_exit_3(tmp_path):
    import numpy as np
    from test_lab_optimize_models import invoke_optimize, tiny_graph

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8), np.float32))
    r = invoke_optimize([
        str(tiny_graph("regressor")), "--calibration", str(tmp_path / "d.npz"), "--eval", str(tmp_path / "d.npz"),
        "--target", "mcu-cortex-m7", "--out", str(tmp_path / "o"),
    ])
    assert r.exit_code == 3, r.output
    assert "out of reach for ONNX Runtime" in r.output and "TensorFlow Lite for Microcontrollers" in r.output


def _machine(**kw) -> MachineInfo:
    base = dict(hostname="h", arch="x86_64", cpu_model="AMD EPYC", isa=["avx2", "fma", "avx512_vnni"], cores=4)
    return MachineInfo(**{**base, **kw})


def test_this_machine_is_the_target_when_arch_isa_and_cores_match():
    p = DeviceProfile(name="t", arch="x86_64", threads=2, ram_budget_mb=512, isa=["avx2"])
    assert p.matches(_machine())[0]
    assert not p.matches(_machine(arch="aarch64"))[0]
    assert "lacks" in p.matches(_machine(isa=["sse4_2"]))[1]
    assert "usable cores" in p.matches(_machine(cores=1))[1]
    pinned = p.model_copy(update={"cpu_match": "Celeron"})
    assert "cpu_match" in pinned.matches(_machine())[1]
    assert load_profile("rpi4").matches(_machine(arch="aarch64", cpu_model="Raspberry Pi 4 Model B", isa=["asimd"]))[0]
