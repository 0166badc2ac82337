"""What this device can run: CPU architecture and ISA features, cores, RAM, disk, execution providers.

The control plane uses these to pick the variant of a model each device gets (a device with 512 MB
is not sent a 700 MB fp32 build; an int8 build that needs VNNI goes only where ``isa`` lists it) and
to place several models within a device's budget. Everything is read from the OS at start (Linux
``/proc`` and ``/sys``; elsewhere the fields it cannot read stay empty/0), never guessed; the
``hardware_class`` is what the operator declares in the agent config (``hardware_class = "rpi4"``),
because "which optimize profile is this board" is a fleet decision, not something the kernel knows.

>>> isa_flags("flags : fpu sse4_1 avx2 fma avx512_vnni ht")
['avx2', 'avx512_vnni', 'fma', 'sse4_1']
>>> isa_flags("Features : fp asimd evtstrm aes asimddp")
['asimd', 'asimddp']
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

from ..protocol import HardwareInfo

# The ISA features that decide which ONNX Runtime kernels (and so which quantized variants) are fast.
# /proc/cpuinfo lists a hundred flags; the state message carries only these.
RELEVANT_ISA = frozenset({
    # x86
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_int8", "amx_bf16",
    # Arm (aarch64 "Features"; 32-bit kernels say "neon")
    "neon", "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",
})


def isa_flags(cpuinfo: str) -> list[str]:
    """The relevant ISA features in a /proc/cpuinfo text (x86 ``flags``, Arm ``Features``), sorted."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(f for f in value.split() if f in RELEVANT_ISA)
    return sorted(found)


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def cpu_isa() -> list[str]:
    text = _read("/proc/cpuinfo")
    return isa_flags(text) if text else []


def usable_cores() -> int:
    """CPUs this process may run on: the affinity mask, further capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    quota = (_read("/sys/fs/cgroup/cpu.max") or "").split()
    if len(quota) == 2 and quota[0] != "max":
        try:
            cores = min(cores, max(1, int(int(quota[0]) / int(quota[1]) + 0.999)))
        except (ValueError, ZeroDivisionError):
            pass
    return cores


def ram_mb() -> int:
    """Physical RAM in MB, capped by a cgroup v2 memory limit when the agent runs in a container."""
    try:
        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError, AttributeError):
        total = 0
    limit = (_read("/sys/fs/cgroup/memory.max") or "").strip()
    if limit.isdigit():
        total = min(total, int(limit) // 2**20) if total else int(limit) // 2**20
    return total


def disk_mb(path: str | Path) -> int:
    """Free space in MB where the agent keeps its slots (what an update needs), 0 if unknown."""
    try:
        return int(shutil.disk_usage(path).free / 2**20)
    except OSError:
        return 0


def temperature_c(thermal_dir: str | Path = "/sys/class/thermal") -> float | None:
    """The hottest thermal zone in °C (SoC boards expose one or more), None where the kernel exposes none."""
    hottest: float | None = None
    for zone in sorted(Path(thermal_dir).glob("thermal_zone*")):
        raw = (_read(zone / "temp") or "").strip()
        try:
            value = int(raw) / 1000.0  # millidegrees
        except ValueError:
            continue
        if -40.0 < value < 150.0 and (hottest is None or value > hottest):  # drop sensors reporting nonsense
            hottest = value
    return round(hottest, 1) if hottest is not None else None


def providers() -> tuple[str, list[str]]:
    """The ONNX Runtime version string and its available execution providers (empty if it cannot be imported)."""
    try:
        import onnxruntime as ort
    except Exception:  # pragma: no cover - the agent depends on onnxruntime; keep reporting without it
        return "onnxruntime", []
    return f"onnxruntime {ort.__version__}", list(ort.get_available_providers())


def detect(*, state_dir: str | Path = ".", hardware_class: str | None = None) -> HardwareInfo:
    """Everything above as the ``HardwareInfo`` the agent reports in its state message."""
    runtime, eps = providers()
    return HardwareInfo(
        arch=platform.machine(),
        cores=usable_cores(),
        ram_mb=ram_mb(),
        os=f"{platform.system()} {platform.release()}",
        runtime=runtime,
        providers=eps,
        hardware_class=hardware_class,
        isa=cpu_isa(),
        disk_mb=disk_mb(state_dir),
        temperature_c=temperature_c(),
    )


def detect_for(config: Any) -> HardwareInfo:
    """``detect`` for an ``AgentConfig`` (its state directory and declared hardware class)."""
    return detect(state_dir=config.state_dir, hardware_class=getattr(config, "hardware_class", None))


__all__ = ["RELEVANT_ISA", "cpu_isa", "detect", "detect_for", "disk_mb", "isa_flags", "providers", "ram_mb",
           "temperature_c", "usable_cores"]
