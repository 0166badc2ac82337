"""The machine that measures: hostname, CPU model, ISA flags, usable cores, runtime.

Every latency in a report says which machine produced it. On Linux the facts come
from ``/proc/cpuinfo`` (``model name`` on x86; ``Model``/``Hardware``/``CPU part``
on ARM boards, where ``model name`` is often missing); elsewhere from :mod:`platform`.

Example:
    >>> m = MachineInfo.detect()
    >>> m.arch in ("x86_64", "aarch64", "armv7l", "riscv64", "ppc64le", "s390x") or bool(m.arch)
    True
    >>> m.cores >= 1 and isinstance(m.isa, list)
    True
    >>> normalize_arch("AMD64"), normalize_arch("arm64")
    ('x86_64', 'aarch64')
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}

# ARM "CPU part" ids of the cores an edge profile is likely to name (ARM TRM main id register values).
_ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
    "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd4b": "Cortex-A78C", "0xd40": "Neoverse-V1",
}


def normalize_arch(arch: str) -> str:
    """One spelling per architecture, the one ``uname -m`` uses on Linux."""
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


@dataclass
class MachineInfo:
    hostname: str
    arch: str
    cpu_model: str
    isa: list[str] = field(default_factory=list)
    cores: int = 1
    os: str = ""
    onnxruntime: str = ""
    providers: list[str] = field(default_factory=list)

    @classmethod
    def detect(cls) -> MachineInfo:
        info = _read_cpuinfo()
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        ort_version, providers = "", []
        try:
            import onnxruntime as ort

            ort_version, providers = ort.__version__, list(ort.get_available_providers())
        except ImportError:
            pass
        return cls(
            hostname=socket.gethostname(),
            arch=normalize_arch(platform.machine() or "unknown"),
            cpu_model=info.get("cpu_model") or platform.processor() or "unknown",
            isa=sorted(set(info.get("flags", "").split())),
            cores=cores,
            os=f"{platform.system()} {platform.release()}".strip(),
            onnxruntime=ort_version,
            providers=providers,
        )

    def has(self, feature: str) -> bool:
        return feature.lower() in self.isa

    def describe(self) -> str:
        """One line for tables: ``host (CPU model, N cores, arch)``."""
        return f"{self.hostname} ({self.cpu_model}, {self.cores} cores, {self.arch})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key not in fields:  # first processor block is enough: edge boards are homogeneous enough
            fields[key] = value
    parts = []
    for key in ("model name", "model", "hardware"):
        v = fields.get(key)
        if v and v not in parts and not v.isdigit():  # x86's numeric "model" is not a name
            parts.append(v)
    part = fields.get("cpu part", "").lower()
    if part in _ARM_PARTS:
        parts.append(_ARM_PARTS[part])
    flags = fields.get("flags") or fields.get("features") or ""  # x86 says flags, ARM says Features
    return {"cpu_model": " / ".join(parts), "flags": flags.lower()}
