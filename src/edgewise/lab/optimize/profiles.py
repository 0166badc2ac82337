"""Device profiles: what the target is, what it can run, and whether this machine is it.

A profile is a small YAML file. The built-in ones live in ``edgewise/lab/profiles/``
(``list_profiles()`` names them); any other path is read as a user profile.

Fields::

    name: rpi4                     # required
    description: Raspberry Pi 4-class board (4x Cortex-A72)
    arch: aarch64                  # uname -m spelling: x86_64, aarch64, armv7l, cortex-m7 ...
    os: linux                      # "none" = bare metal: out of reach for ONNX Runtime
    threads: 4                     # intra-op threads the model may use on the target
    ram_budget_mb: 512             # RAM the inference process may use (peak RSS)
    latency_budget_ms: 50          # batch-1 median the application needs (optional)
    isa: [asimd]                   # /proc/cpuinfo flags the target has (drives U8S8 vs S8S8, FP16)
    execution_providers: [CPUExecutionProvider]
    batch_size: 1                  # the batch the application sends
    cpu_match: "Cortex-A72|Raspberry Pi 4"   # optional regex, see below

**Is this machine the target?** ``matches(machine)`` is true when the architecture is
the same, every ISA feature the profile lists is in this machine's flags, this machine
has at least ``threads`` usable cores, and (if the profile sets ``cpu_match``) the
regex finds the CPU model line. Then latencies are "measured on the target";
otherwise they are proxies measured on this machine, and every report says so.
``--measure-here`` / ``--no-measure-here`` overrides the decision.

Example:
    >>> sorted(list_profiles())[:2]
    ['jetson-orin-nano', 'mcu-cortex-m7']
    >>> p = load_profile("rpi4")
    >>> p.arch, p.threads, p.int8_scheme()[0]
    ('aarch64', 4, 'S8S8')
    >>> load_profile("mcu-cortex-m7").out_of_reach() is not None
    True
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProfileError
from .machine import MachineInfo, normalize_arch

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# Below this RAM budget a full ONNX Runtime CPU build cannot even hold itself: `import onnxruntime`
# alone is ~30-40 MB resident on x86-64 Linux (measured by the memory probe's baseline), and a
# minimal ORT build still needs an OS, a heap and a few MB of code.
ORT_MIN_RAM_MB = 16.0
BARE_METAL = {"none", "bare-metal", "baremetal", "rtos", "zephyr", "freertos"}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
FP16_FLAGS = ("asimdhp", "fphp", "avx512_fp16")


class DeviceProfile(BaseModel):
    """A target device class. Unknown fields are errors, so a typo cannot silently mean a default."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    arch: str
    os: str = "linux"
    threads: int = Field(ge=1, le=256)
    ram_budget_mb: float = Field(gt=0)
    latency_budget_ms: float | None = Field(default=None, gt=0)
    isa: list[str] = Field(default_factory=list)
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    batch_size: int = Field(default=1, ge=1, le=4096)
    cpu_match: str | None = None
    notes: str = ""
    source: str = Field(default="", exclude=True)  # where it was loaded from (not a YAML field)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return normalize_arch(v)

    @field_validator("isa")
    @classmethod
    def _isa(cls, v: list[str]) -> list[str]:
        return [f.strip().lower() for f in v]

    @field_validator("execution_providers")
    @classmethod
    def _eps(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one execution provider, e.g. [CPUExecutionProvider]")
        return v

    @field_validator("cpu_match")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    # --- what the profile implies ----------------------------------------------------------
    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "i686", "i386")

    @property
    def is_arm(self) -> bool:
        return self.arch.startswith(("aarch64", "arm", "cortex"))

    @property
    def has_vnni(self) -> bool:
        return any(f in self.isa for f in VNNI_FLAGS)

    def int8_scheme(self) -> tuple[str, bool, str]:
        """``(scheme, reduce_range, why)`` for static INT8 on this target's CPU, per ORT's guidance.

        ORT's ``quantize_static`` docs: x86 with VNNI → U8S8 (uint8 activations, int8 weights),
        ``reduce_range=False``; x86 without VNNI → U8S8 with ``reduce_range=True`` (7-bit weights
        avoid saturation in the u8*s8 pairwise adds); ARM → S8S8.
        """
        if self.is_arm:
            return "S8S8", False, "ARM CPU: symmetric int8 activations and weights (S8S8), per ORT's CPU guidance"
        if self.has_vnni:
            return "U8S8", False, "x86 with VNNI: uint8 activations, int8 weights (U8S8), reduce_range off, per ORT's docs"
        return "U8S8", True, "x86 without VNNI: U8S8 with reduce_range (7-bit weights) to avoid saturation, per ORT's docs"

    def out_of_reach(self) -> str | None:
        """Why ONNX Runtime cannot serve on this target, with what would fit instead; None if it can."""
        problems = []
        if self.os.strip().lower() in BARE_METAL:
            problems.append(f"it has no general-purpose OS (os: {self.os}), and ONNX Runtime needs Linux, Android, Windows or macOS")
        if self.ram_budget_mb < ORT_MIN_RAM_MB:
            problems.append(
                f"its RAM budget is {_fmt_mb(self.ram_budget_mb)}, far below ONNX Runtime's own footprint "
                f"(tens of MB resident for a full CPU build; > {ORT_MIN_RAM_MB:.0f} MB even for a minimal build with a model)"
            )
        if not problems:
            return None
        return (
            f"profile {self.name!r} is out of reach for ONNX Runtime: " + "; ".join(problems) + ". "
            "What fits this class instead: an interpreter or compiler built for microcontrollers, such as "
            "TensorFlow Lite for Microcontrollers (with CMSIS-NN kernels on Arm Cortex-M), microTVM / TVM's AOT "
            "executor, or a vendor tool such as STM32Cube.AI, with a fully INT8 model whose weights and activations "
            "fit in the chip's flash and SRAM (typically tens to a few hundred KB). edgewise does not build for "
            "those runtimes today, so it stops here rather than report figures that would not hold on the device."
        )

    def matches(self, machine: MachineInfo) -> tuple[bool, str]:
        """Is ``machine`` this target? Returns the decision and its reason (see the module docstring)."""
        if normalize_arch(machine.arch) != self.arch:
            return False, f"architecture differs (target {self.arch}, this machine {machine.arch})"
        missing = [f for f in self.isa if not machine.has(f)]
        if missing:
            return False, f"this machine lacks the target's ISA features {missing}"
        if machine.cores < self.threads:
            return False, f"this machine has {machine.cores} usable cores, the target {self.threads}"
        if self.cpu_match and not re.search(self.cpu_match, machine.cpu_model, re.IGNORECASE):
            return False, f"CPU model {machine.cpu_model!r} does not match the profile's cpu_match {self.cpu_match!r}"
        return True, f"same architecture ({self.arch}), ISA features and core count" + (
            f", CPU matches {self.cpu_match!r}" if self.cpu_match else ""
        )

    def to_json(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d["source"] = self.source
        return d


def _fmt_mb(mb: float) -> str:
    return f"{mb * 1024:.0f} KB" if mb < 1 else f"{mb:g} MB"


def list_profiles() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path | DeviceProfile) -> DeviceProfile:
    """A built-in profile by name (``rpi4``) or a user YAML file by path; errors name the bad field."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text_name = str(name_or_path)
    builtin = PROFILES_DIR / f"{text_name}.yaml"
    if isinstance(name_or_path, str) and "/" not in text_name and not text_name.endswith((".yaml", ".yml")):
        if not builtin.is_file():
            raise ProfileError(f"no built-in profile {text_name!r}; built-in: {', '.join(list_profiles())}, or give a YAML file path")
        path = builtin
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist; built-in profiles: {', '.join(list_profiles())}")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ProfileError(f"profile {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path}: expected a mapping of fields (name, arch, threads, ...), got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        profile = DeviceProfile(**data)
    except ValidationError as exc:
        raise ProfileError(f"profile {path}: {_explain(exc)}") from None
    profile.source = "built-in" if path.parent.resolve() == PROFILES_DIR else str(path)
    return profile


def _explain(exc: ValidationError) -> str:
    out = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "value"
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (typo?); known fields: " + ", ".join(
                f for f in DeviceProfile.model_fields if f != "source"
            )
        out.append(f"field {loc!r}: {msg}")
    return "; ".join(out)
