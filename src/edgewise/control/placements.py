"""Placing models on devices within each device's RAM and CPU budget (issue 7, orchestration).

A device runs its primary model (the one deployments and rollouts manage) and may host more: *placements*,
each a model version served by its own worker process on the device with ``threads`` intra-op threads and a
memory limit (``agent.hosting``). The control plane refuses a placement that does not fit, with the figures:

    needed   = model footprint + memory_mb + WORKER_OVERHEAD_MB       (per placement)
    budget   = reported ram_mb - AGENT_RESERVE_MB - primary footprint - the other placements' needs
    threads  = primary threads + Σ placement threads  <=  reported cores

The model footprint is the variant profile's ``peak_rss_mb`` figure when the bundle has one (measured by
``edgewise optimize``), else the bundle size × MODEL_RAM_FACTOR: the same rule the agent uses to size the
worker's address-space limit, so what the control plane admits is what the device enforces.

Placements live on the device row (``devices.desired_placements``, migration 0012) and go out in the desired
state (``DesiredState.placements``); the agent reports how each is doing (``DeviceState.hosted``, kept in
``devices.hosted``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from ..protocol import ArtifactRef
from ..protocol.messages import ModelPlacement
from ..security.tuf_repo import TufRepoError
from .deployments import Publisher, publish_desired
from .devices import get_device
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .models import Device, ModelVersion
from .registry import Registry, bundle_url
from .tuf_service import tuf_of

log = logging.getLogger(__name__)

MODEL_RAM_FACTOR = 2.0  # resident size ≈ bundle size × this when no profile figure exists (agent.hosting uses the same)
WORKER_OVERHEAD_MB = 90.0  # an idle worker process resident: interpreter, numpy, ONNX Runtime, bundle verification (measured 88 MB, x86-64)
AGENT_RESERVE_MB = 128.0  # the OS and the agent itself (its interpreter, outbox, link), never given to models


class PlacementIn(BaseModel):
    """One placement an operator asks for."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=128)
    threads: int = Field(default=1, ge=1, le=64, description="ONNX Runtime intra-op threads of the model's worker.")
    memory_mb: int = Field(default=256, ge=16, le=1 << 20, description="Memory the model may use besides its footprint (the worker's limit).")


class PlacementRefusedError(ConflictError):
    """The placement does not fit the device; ``figures`` says by how much."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


def footprint_mb(manifest: Mapping[str, Any] | None, size_bytes: int) -> float:
    """RAM a model itself needs: its variant profile's peak figure, else its bundle size × MODEL_RAM_FACTOR."""
    figures = ((manifest or {}).get("variant") or {}).get("figures") or {}
    peak = figures.get("peak_rss_mb")
    if isinstance(peak, (int, float)) and peak > 0:
        return float(peak)
    return size_bytes / 2**20 * MODEL_RAM_FACTOR


def _mv_footprint(mv: ModelVersion) -> float:
    return footprint_mb(mv.manifest, mv.size)


def _primary(session: Session, device: Device) -> tuple[float, int, str | None]:
    """The primary model's footprint (MB), its threads, and what it is (desired first, else what the device runs)."""
    name, version, variant = device.desired_model, device.desired_version, getattr(device, "desired_variant", None)
    if not (name and version):
        name, version, variant = device.model, device.version, None
    if not (name and version):
        return 0.0, 0, None
    mv = Registry.find(session, name, version, variant) if variant else Registry.find(session, name, version)
    if mv is None:
        return 0.0, 1, f"{name} {version}"
    runtime = (mv.manifest or {}).get("runtime") or {}
    threads = runtime.get("intra_op_threads") or 1
    return _mv_footprint(mv), int(threads), f"{name} {version}"


def _resolve(session: Session, device: Device, want: PlacementIn) -> ModelVersion:
    """The registry row to place: the variant ``control.variants`` picks for the device when variants exist."""
    try:
        from .variants import choose
    except ImportError:  # pragma: no cover - variants are part of issue 7 (TARGET)
        return Registry.get(session, want.model, want.version)
    return choose(session, device, want.model, want.version)[0]


def _figures_base(session: Session, device: Device) -> dict[str, Any]:
    hw = device.hardware or {}
    ram, cores = int(hw.get("ram_mb") or 0), int(hw.get("cores") or 0)
    primary_mb, primary_threads, primary = _primary(session, device)
    return {
        "ram_mb": ram, "cores": cores, "reserve_mb": AGENT_RESERVE_MB, "primary": primary,
        "primary_mb": round(primary_mb, 1), "primary_threads": primary_threads,
    }


def placement_need_mb(footprint: float, memory_mb: int) -> float:
    return footprint + memory_mb + WORKER_OVERHEAD_MB


def plan(session: Session, device: Device, wanted: Sequence[PlacementIn]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check ``wanted`` (the device's whole new list of placements) against its budget, in order.

    Returns the stored form of each placement (a ModelPlacement dump plus ``variant`` and ``need_mb``) and the
    figures; raises PlacementRefusedError naming the first placement that does not fit and why, with the figures.
    """
    names = [w.model for w in wanted]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(f"model(s) {', '.join(dupes)} placed twice; a device hosts one version of each model")
    figures = _figures_base(session, device)
    primary = figures["primary"]
    if any(primary is not None and primary.split(" ")[0] == w.model for w in wanted):
        raise InvalidRequestError(f"{primary.split(' ')[0]} is this device's primary model; deploy it (POST /api/v1/deployments) instead of placing it")
    if wanted and not figures["ram_mb"]:
        raise PlacementRefusedError(
            f"device {device.id} has not reported its hardware (RAM, cores) yet, so no placement can be checked; "
            "wait until its agent connects", figures)
    used_mb = AGENT_RESERVE_MB + figures["primary_mb"]
    used_threads = figures["primary_threads"]
    stored: list[dict[str, Any]] = []
    tuf = tuf_of(session)
    for w in wanted:
        mv = _resolve(session, device, w)
        fp = _mv_footprint(mv)
        need = placement_need_mb(fp, w.memory_mb)
        free = figures["ram_mb"] - used_mb
        row = {"model": w.model, "version": w.version, "footprint_mb": round(fp, 1), "memory_mb": w.memory_mb,
               "worker_overhead_mb": WORKER_OVERHEAD_MB, "needed_mb": round(need, 1), "free_mb": round(free, 1),
               "threads": w.threads, "threads_free": figures["cores"] - used_threads}
        if need > free:
            figures.update(placed_mb=round(used_mb - AGENT_RESERVE_MB - figures["primary_mb"], 1), refused=row)
            raise PlacementRefusedError(
                f"{w.model} {w.version} does not fit device {device.id}: it needs {need:.0f} MB (model {fp:.1f} + memory_mb "
                f"{w.memory_mb} + worker {WORKER_OVERHEAD_MB:.0f}) but only {free:.0f} MB of {figures['ram_mb']} MB are free "
                f"(reserve {AGENT_RESERVE_MB:.0f}, primary {figures['primary_mb']:.0f}, other placements "
                f"{used_mb - AGENT_RESERVE_MB - figures['primary_mb']:.0f}); lower memory_mb or remove a placement", figures)
        if used_threads + w.threads > figures["cores"]:
            figures.update(threads_used=used_threads, refused=row)
            raise PlacementRefusedError(
                f"{w.model} {w.version} does not fit device {device.id}: it asks for {w.threads} thread(s) but "
                f"{used_threads} of its {figures['cores']} core(s) are taken (primary {figures['primary_threads']}, other placements "
                f"{used_threads - figures['primary_threads']}); lower threads or remove a placement", figures)
        used_mb += need
        used_threads += w.threads
        artifact = ArtifactRef(url=bundle_url(mv.name, mv.version), sha256=mv.sha256, size=mv.size)
        target = None
        if tuf is not None:
            try:
                target = tuf.register([mv])[0]
            except TufRepoError as exc:
                raise ConflictError(f"cannot place {mv.name} {mv.version}: {exc}") from None
        placement = ModelPlacement(model=mv.name, version=mv.version, artifact=artifact, target=target,
                                   threads=w.threads, memory_mb=w.memory_mb)
        stored.append({**placement.model_dump(mode="json"), "variant": getattr(mv, "variant", None), "needed_mb": round(need, 1)})
    figures.update(placed_mb=round(used_mb - AGENT_RESERVE_MB - figures["primary_mb"], 1), free_mb=round(figures["ram_mb"] - used_mb, 1),
                   threads_used=used_threads)
    return stored, figures


def placements_of(device: Device) -> list[ModelPlacement]:
    """The device's recorded placements as wire messages (what ``deployments.desired_state`` publishes)."""
    return [ModelPlacement.model_validate(p) for p in (device.desired_placements or [])]


def describe(session: Session, device: Device) -> dict[str, Any]:
    """What ``GET /devices/{id}/placements`` returns: each placement with the device's reported status, and the budget."""
    reported = {h.get("model"): h for h in (device.hosted or []) if isinstance(h, dict)}
    out = []
    used_mb, used_threads = 0.0, 0
    for p in device.desired_placements or []:
        h = reported.get(p["model"]) or {}
        same = h.get("version") == p["version"]
        out.append({
            "model": p["model"], "version": p["version"], "variant": p.get("variant"), "threads": p["threads"],
            "memory_mb": p["memory_mb"], "needed_mb": p.get("needed_mb"),
            "status": h.get("status", "pending") if same else "pending", "reason": h.get("reason") if same else None,
            "rss_mb": h.get("rss_mb") if same else None,
        })
        used_mb += float(p.get("needed_mb") or 0)
        used_threads += int(p["threads"])
    figures = _figures_base(session, device)
    free = figures["ram_mb"] - AGENT_RESERVE_MB - figures["primary_mb"] - used_mb if figures["ram_mb"] else None
    figures.update(placed_mb=round(used_mb, 1), free_mb=round(free, 1) if free is not None else None,
                   threads_used=figures["primary_threads"] + used_threads)
    return {"device_id": device.id, "generation": device.desired_generation, "placements": out, "budget": figures}


def _publish(session: Session, publisher: Publisher | None, device: Device, stored: list[dict[str, Any]]) -> None:
    device.desired_placements = stored
    device.desired_generation = Device.desired_generation + 1  # type: ignore[assignment]  # SQL side: no lost increments
    device.desired_issued_at = time.time()
    session.flush()
    session.refresh(device)
    session.commit()
    if publisher is not None and not publish_desired(publisher, device):
        log.warning("placements for %s recorded but not yet published; they go out when the bus reconnects", device.id)


def set_placements(session: Session, publisher: Publisher | None, device_id: str, wanted: Sequence[PlacementIn]) -> dict[str, Any]:
    """Replace the device's placements with ``wanted`` if all of them fit (else nothing changes), then publish."""
    device = get_device(session, device_id)
    stored, _figures = plan(session, device, wanted)
    _publish(session, publisher, device, stored)
    log.info("placements of %s: %s", device_id, ", ".join(f"{p['model']} {p['version']}" for p in stored) or "none")
    return describe(session, device)


def remove_placement(session: Session, publisher: Publisher | None, device_id: str, model: str) -> dict[str, Any]:
    """Stop hosting ``model`` on the device (its worker is stopped when the agent gets the new desired state)."""
    device = get_device(session, device_id)
    current = list(device.desired_placements or [])
    kept = [p for p in current if p.get("model") != model]
    if len(kept) == len(current):
        placed = ", ".join(p.get("model", "?") for p in current) or "none"
        raise NotFoundError(f"device {device_id} hosts no placed model {model!r} (placed: {placed})")
    _publish(session, publisher, device, kept)
    log.info("removed placement %s from %s", model, device_id)
    return describe(session, device)
