"""Which variant of a model version each device runs: the fastest it can run, unless an operator says otherwise.

A model version may be stored as several variants (fp32, int8, pruned-int8, ...; see
``bundle create --variant-of``); each bundle's manifest says what it needs and how fast it was:

- RAM: ``requirements.min_ram_mb`` must fit the device's reported ``ram_mb``;
- runtime: the device must offer the variant's execution provider (``runtime.execution_provider``
  when the bundle carries tuned settings, else one of ``requirements.providers``);
- ISA: every feature in ``metadata.requires_isa`` (e.g. ``["avx512_vnni"]``) must be in the device's ``isa``;
- speed: ``variant.figures.latency_b1_median_ms`` (then ``latency_b1_p95_ms``), measured by
  ``edgewise optimize`` on its profile.

Choice, in order (:func:`choose`):

1. an override set for the device and model (``PUT /api/v1/devices/{id}/variant``), when this version has it;
2. among the variants the device can run, those built for its ``hardware_class`` (variant profile) if any;
3. the lowest measured latency when every remaining variant has one; otherwise the documented
   precision order int8 < fp16 < fp32 (by the variant's name or recipe), then the smaller bundle.

A device that never reported its hardware can run anything (nothing is known to rule a variant out);
a device that can run none of the variants is refused with the reason for each (:class:`NoVariantFitsError`).

>>> precision_rank("int8-qdq-minmax"), precision_rank("fp16"), precision_rank("fp32"), precision_rank("default")
(1, 2, 3, 3)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import InvalidRequestError, ModelNotFoundError
from .models import Device, ModelVersion, VariantOverride
from .timeutil import utcnow

DEFAULT_VARIANT = "default"
CPU = "CPUExecutionProvider"

# Precision order when latency figures are missing: fewer bits run faster on the CPUs edge devices have.
_PRECISION = ((re.compile(r"int4|uint4|4bit"), 0), (re.compile(r"int8|uint8|qdq|qop|quant|8bit"), 1),
              (re.compile(r"fp16|float16|half|bf16"), 2), (re.compile(r"fp32|float32|default"), 3))


class NoVariantFitsError(InvalidRequestError):
    """No variant of the version can run on a device (too little RAM, missing provider or ISA feature)."""


def precision_rank(name: str) -> int:
    """0 int4, 1 int8, 2 fp16, 3 fp32/default, 4 unknown: the order used when latency figures are missing."""
    low = name.lower()
    return next((rank for pattern, rank in _PRECISION if pattern.search(low)), 4)


@dataclass(frozen=True)
class VariantInfo:
    """What the choice needs to know about one stored variant, read from its manifest."""

    row: ModelVersion
    name: str
    profile: str | None
    min_ram_mb: int
    providers: list[str]  # any of these will do
    requires_isa: list[str]
    latency_ms: float | None
    size: int
    recipe: str | None

    @classmethod
    def of(cls, row: ModelVersion) -> "VariantInfo":
        manifest: dict[str, Any] = row.manifest or {}
        variant = manifest.get("variant") or {}
        figures = variant.get("figures") or {}
        req = manifest.get("requirements") or {}
        runtime = manifest.get("runtime") or {}
        providers = [runtime["execution_provider"]] if runtime.get("execution_provider") else list(req.get("providers") or [CPU])
        latency = figures.get("latency_b1_median_ms")
        if latency is None:
            latency = figures.get("latency_b1_p95_ms")
        isa = (manifest.get("metadata") or {}).get("requires_isa") or []
        return cls(
            row=row, name=row.variant, profile=variant.get("profile"), min_ram_mb=int(req.get("min_ram_mb") or 0),
            providers=providers, requires_isa=[str(f).lower() for f in isa] if isinstance(isa, list) else [],
            latency_ms=float(latency) if isinstance(latency, (int, float)) else None, size=int(row.size),
            recipe=variant.get("recipe"),
        )

    def rank(self) -> int:
        return min(precision_rank(self.name), precision_rank(self.recipe or self.name))


def variants_of(session: Session, name: str, version: str) -> list[ModelVersion]:
    """Every stored variant of one version (oldest upload first); ModelNotFoundError when there is none."""
    rows = list(session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                                .order_by(ModelVersion.id)).all())
    if not rows:
        from .registry import Registry

        Registry.get(session, name, version)  # raises with the known versions in the message
    return rows


def why_not(info: VariantInfo, hardware: dict[str, Any] | None) -> str | None:
    """Why a device with ``hardware`` cannot run the variant; None when it can (or nothing is known)."""
    if not hardware:
        return None
    ram = int(hardware.get("ram_mb") or 0)
    if ram and info.min_ram_mb > ram:
        return f"{info.name} needs {info.min_ram_mb} MB RAM, the device has {ram} MB"
    offered = list(hardware.get("providers") or []) or [CPU]
    if not set(info.providers) & set(offered):
        return f"{info.name} needs {' or '.join(info.providers)}, the device offers {', '.join(offered)}"
    missing = [f for f in info.requires_isa if f not in {str(x).lower() for x in hardware.get("isa") or []}]
    if missing:
        return f"{info.name} needs CPU features {', '.join(missing)}, which the device does not report"
    return None


def get_override(session: Session, device_id: str, model: str) -> VariantOverride | None:
    return session.get(VariantOverride, (device_id, model))


def set_override(session: Session, device_id: str, model: str, variant: str | None, *, actor: str | None = None
                 ) -> VariantOverride | None:
    """Pin ``device_id`` to ``variant`` of ``model`` in every version that has it (None: back to automatic). Commits.

    Takes effect at the next deployment to the device; the current desired state is left alone.
    """
    from .devices import get_device

    get_device(session, device_id)
    known = set(session.scalars(select(ModelVersion.variant).where(ModelVersion.name == model)).all())
    if not known:
        raise ModelNotFoundError(f"no model named {model!r}; upload one: POST /api/v1/models")
    row = get_override(session, device_id, model)
    if variant is None:
        if row is not None:
            session.delete(row)
        session.commit()
        return None
    if variant not in known:
        raise InvalidRequestError(f"model {model} has no variant {variant!r}; its variants: {', '.join(sorted(known))}")
    if row is None:
        row = VariantOverride(device_id=device_id, model=model, variant=variant, created_at=utcnow(), created_by=actor)
        session.add(row)
    else:
        row.variant, row.created_at, row.created_by = variant, utcnow(), actor
    session.commit()
    return row


def list_overrides(session: Session, device_id: str | None = None) -> list[VariantOverride]:
    stmt = select(VariantOverride).order_by(VariantOverride.device_id, VariantOverride.model)
    if device_id is not None:
        stmt = stmt.where(VariantOverride.device_id == device_id)
    return list(session.scalars(stmt).all())


def overrides_for(session: Session, model: str, device_ids: list[str]) -> dict[str, str]:
    """Device id -> overriding variant of ``model``, for the given devices (one query, in chunks)."""
    out: dict[str, str] = {}
    for i in range(0, len(device_ids), 500):
        chunk = device_ids[i:i + 500]
        for row in session.scalars(select(VariantOverride).where(VariantOverride.model == model,
                                                                 VariantOverride.device_id.in_(chunk))):
            out[row.device_id] = row.variant
    return out


def _fits_phrase(hardware: dict[str, Any] | None, info: VariantInfo) -> str:
    if not hardware:
        return "device hardware not reported yet, nothing rules a variant out"
    ram = int(hardware.get("ram_mb") or 0)
    offered = set(hardware.get("providers") or []) or {CPU}
    provider = next((p for p in info.providers if p in offered), info.providers[0] if info.providers else CPU)
    return f"{ram} MB RAM and {provider}" if ram else provider


def pick(rows: list[ModelVersion], device: Device, override: str | None = None) -> tuple[ModelVersion, str]:
    """The choice on already loaded rows (no database access): see the module docstring for the rules."""
    infos = [VariantInfo.of(r) for r in rows]
    hardware = device.hardware or None
    prefix = ""
    if override is not None:
        pinned = next((i for i in infos if i.name == override), None)
        if pinned is not None:
            return pinned.row, "override"
        prefix = f"override {override} is not a variant of this version; "
    runnable, refused = [], []
    for info in infos:
        reason = why_not(info, hardware)
        (refused if reason else runnable).append(reason or info)
    if not runnable:
        raise NoVariantFitsError(
            f"no variant of {rows[0].name} {rows[0].version} can run on device {device.id}: " + "; ".join(refused)
            + ". Upload a variant that fits it, or leave the device out of the deployment"
        )
    hw_class = (hardware or {}).get("hardware_class")
    built_for = [i for i in runnable if hw_class and i.profile == hw_class]
    pool = built_for or runnable
    if len(pool) == 1:
        best = pool[0]
        how = "the only variant that fits" if len(runnable) == 1 else f"the only variant built for {hw_class} that fits"
    elif all(i.latency_ms is not None for i in pool):
        best = min(pool, key=lambda i: (i.latency_ms, i.size, i.row.id))
        others = ", ".join(f"{i.name} {i.latency_ms:g} ms" for i in pool if i is not best)
        how = f"fastest ({best.latency_ms:g} ms measured vs {others}) that fits"
    else:
        best = min(pool, key=lambda i: (i.rank(), i.size, i.row.id))
        how = "fastest by precision order int8 < fp16 < fp32 (no latency figures for every variant) that fits"
    built = f" (among the variants built for {hw_class})" if built_for and len(pool) > 1 else ""
    return best.row, f"{prefix}{best.name}: {how} {_fits_phrase(hardware, best)}{built}"


def choose(session: Session, device: Device, name: str, version: str) -> tuple[ModelVersion, str]:
    """The variant of ``name`` ``version`` that ``device`` should run, and a human reason.

    E.g. ``(row, "int8: fastest (3.1 ms measured vs fp32 7.9 ms) that fits 1024 MB RAM and CPUExecutionProvider")``
    or ``(row, "override")``. Raises ModelNotFoundError (no such version) or NoVariantFitsError.
    """
    rows = variants_of(session, name, version)
    override = get_override(session, device.id, name)
    return pick(rows, device, override.variant if override is not None else None)


__all__ = [
    "DEFAULT_VARIANT", "NoVariantFitsError", "VariantInfo", "choose", "get_override", "list_overrides", "overrides_for", "pick",
    "precision_rank", "set_override", "variants_of", "why_not",
]
