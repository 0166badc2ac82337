"""Deployments: record what each device should run, then tell it (retained MQTT message).

The database is the source of truth; the retained ``desired`` message is its copy
on the broker. Recording happens first and publishing second, so a lost publish
(broker down) is repaired by :func:`republish_all` when the bus reconnects, and a
device that was offline for a month finds the retained message when it returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..protocol import ArtifactRef, DesiredState, encode, topics
from ..protocol.messages import AgentReleaseRef, ModelPlacement, ShadowTarget, TelemetryPrivacy
from .devices import get_device, list_devices
from ..security.tuf_repo import TufRepoError
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .models import Deployment, Device, ModelVersion
from .peers import peers_for_device
from .registry import bundle_url
from .timeutil import utcnow
from .tuf_service import tuf_of
from .variants import NoVariantFitsError, overrides_for, pick, variants_of

log = logging.getLogger(__name__)

DESIRED_QOS = 1


class Publisher(Protocol):
    """Anything that can put a message on the broker (``MqttBus`` in the server)."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool: ...


def desired_state(device: Device) -> DesiredState | None:
    """The device's recorded desired state as a wire message; None if nothing was ever deployed."""
    if not device.desired_generation:  # every generation records something (a model, an agent, a capture setting)
        return None
    return DesiredState(
        device_id=device.id,
        generation=device.desired_generation,
        model=device.desired_model,
        version=device.desired_version,
        artifact=ArtifactRef.model_validate(device.desired_artifact) if device.desired_artifact else None,
        target=(device.desired_artifact or {}).get("tuf_target"),
        rollback=bool(device.desired_rollback),
        agent=AgentReleaseRef.model_validate(device.desired_agent) if device.desired_agent else None,
        capture=device.desired_capture,
        privacy=TelemetryPrivacy.model_validate(device.desired_privacy) if device.desired_privacy else None,  # FL2 (control.privacy)
        shadow=ShadowTarget.model_validate(device.desired_shadow) if device.desired_shadow else None,  # ROLLOUT
        placements=[ModelPlacement.model_validate(p) for p in device.desired_placements or []],  # HOST (control.placements)
        peers=peers_for_device(device),  # PEER: nearby devices that hold the artifact (control.peers)
        issued_at=device.desired_issued_at or 0.0,
    )


def setting_targets(session: Session, *, device_id: str | None = None, tag: str | None = None,
                    group: str | None = None) -> list[Device]:
    """The devices one of device id, tag or group (``control.groups``, resolved now) names: exactly one is given."""
    if sum(x is not None for x in (device_id, tag, group)) != 1:
        raise InvalidRequestError("give exactly one target: device_id, tag or group")
    if device_id is not None:
        return [get_device(session, device_id)]
    if tag is not None:
        devices = list_devices(session, tag=tag)
    else:
        from .groups import resolve

        devices = resolve(session, group)  # type: ignore[arg-type]
    if not devices:
        raise NotFoundError(f"no registered device has tag {tag!r}" if tag is not None else f"group {group!r} holds no device now")
    return devices


def set_desired(session: Session, publisher: Publisher | None, targets: list[Device], column: str, value: Any,
                what: str) -> list[DesiredState]:
    """Record ``column = value`` in every target's desired state, as a new desired generation (an SQL increment:
    concurrent changes never share a generation), commit, then publish each retained. Settings that are not a
    model version (sample capture, telemetry privacy) travel exactly like deployments."""
    now = time.time()
    for device in targets:
        device.desired_generation = Device.desired_generation + 1  # type: ignore[assignment]
        setattr(device, column, value)
        device.desired_issued_at = now
    session.flush()
    for device in targets:
        session.refresh(device)
    session.commit()
    states = []
    for device in targets:
        state = desired_state(device)
        if state is not None:
            states.append(state)
            if publisher is not None and not publish_desired(publisher, device):
                log.warning("%s for %s recorded but not yet published; it goes out when the bus reconnects", what, device.id)
    return states


def set_capture(session: Session, publisher: Publisher | None, enabled: bool | None, *,
                device_id: str | None = None, tag: str | None = None, group: str | None = None) -> list[DesiredState]:
    """Switch sample capture off (False), allow it (True) or leave it to each device's config (None) for one
    device, every device carrying ``tag``, or a group's devices: a new desired generation, published retained."""
    targets = setting_targets(session, device_id=device_id, tag=tag, group=group)
    states = set_desired(session, publisher, targets, "desired_capture", enabled, "capture setting")
    log.info("sample capture %s for %s", {True: "allowed", False: "off", None: "per device config"}[enabled],
             f"device {device_id}" if device_id else f"tag {tag}" if tag else f"group {group}")
    return states


def publish_desired(publisher: Publisher | None, device: Device) -> bool:
    """Publish the device's desired state retained, QoS 1; False if there is none or no bus."""
    state = desired_state(device)
    if state is None or publisher is None:
        return False
    return publisher.publish(topics.desired(device.id), encode(state), qos=DESIRED_QOS, retain=True)


def republish_all(session: Session, publisher: Publisher) -> int:
    """Publish every recorded desired state again (on bus connect: the broker may have
    restarted and lost its retained messages, e.g. the embedded broker keeps them in memory)."""
    n = 0
    for device in session.scalars(select(Device).where(Device.desired_generation > 0)):
        n += bool(publish_desired(publisher, device))
    return n


@dataclass(frozen=True)
class DeploymentResult:
    deployment: Deployment
    states: list[DesiredState]  # one per device reached, with its new generation


def deploy(
    session: Session,
    publisher: Publisher | None,
    model: str | None,
    version: str | None,
    *,
    device_id: str | None = None,
    tag: str | None = None,
    device_ids: list[str] | None = None,
    rollback: bool = False,
    agent_version: str | None = None,
) -> DeploymentResult:
    """Set ``model`` ``version`` as the desired state of one device, of every device carrying ``tag`` now,
    or of exactly the devices in ``device_ids``; bump each device's generation, record the deployment,
    commit, then publish each new desired state retained on ``edgewise/devices/{id}/desired``.

    Each device gets the variant of the version that ``control.variants.choose`` picks for it (the fastest
    it can run, or its override); a device that can run none refuses the whole deployment
    (``NoVariantFitsError``, nothing recorded) naming the device and why.

    Agents refuse a version lower than the highest they have committed unless ``rollback``
    is true (a deliberate downgrade); the flag travels in the desired state.

    ``agent_version`` also sets the agent release the devices should run (a stored release, see
    ``control.releases``); ``model``/``version`` may then be None (agent only). Each part keeps the
    other's earlier desired value: deploying a model never drops the desired agent, and vice versa."""
    if sum(t is not None for t in (device_id, tag, device_ids)) != 1:
        raise InvalidRequestError("give exactly one target: device_id, tag or device_ids")
    if (model is None) != (version is None) or (model is None and agent_version is None):
        raise InvalidRequestError("give a model and its version, an agent_version, or both")
    agent_ref = None
    if agent_version is not None:
        from .releases import release_ref

        agent_ref = release_ref(session, agent_version)
    if model is not None and version is not None:
        variants_of(session, model, version)  # ModelNotFoundError before looking at the targets
    if device_id is not None:
        targets = [get_device(session, device_id)]
        kind, value = "device", device_id
    elif device_ids is not None:
        targets = _devices_by_id(session, device_ids)
        kind, value = "devices", _summary(targets)
    else:
        assert tag is not None
        targets = list_devices(session, tag=tag)
        kind, value = "tag", tag
        if not targets:
            raise NotFoundError(
                f"no registered device has tag {tag!r}; tag devices first (POST /api/v1/devices or the agent's config)"
            )
    chosen: dict[str, ModelVersion] = {}  # device id -> its variant
    if model is not None and version is not None:
        # variants.choose per device, with the version's rows and the overrides loaded once (a wave of 1,000 devices
        # is two queries, not two thousand).
        rows = variants_of(session, model, version)
        overrides = overrides_for(session, model, [d.id for d in targets])
        refused: list[str] = []
        for device in targets:
            try:
                chosen[device.id] = pick(rows, device, overrides.get(device.id))[0]
            except NoVariantFitsError as exc:
                refused.append(exc.message)
        if refused:
            raise NoVariantFitsError("; ".join(refused) if len(refused) <= 3 else
                                     f"{len(refused)} devices can run no variant, e.g. " + "; ".join(refused[:3]))
    used = {mv.id: mv for mv in chosen.values()}
    artifacts: dict[int, dict[str, Any]] = {}
    for mv in used.values():
        artifacts[mv.id] = ArtifactRef(url=bundle_url(mv.name, mv.version, mv.variant), sha256=mv.sha256,
                                       size=mv.size).model_dump(mode="json")
    tuf = tuf_of(session)
    if tuf is not None and used:
        # The desired state names a signed TUF target; a rollback gets its own target whose signed custom data
        # says rollback: true (the only thing a TUF agent accepts as permission to downgrade).
        ordered = list(used.values())
        try:
            names = tuf.register(ordered, rollback=rollback)
        except TufRepoError as exc:  # e.g. the stored bundle changed on disk since upload: never sign it
            raise ConflictError(f"cannot deploy {model} {version}: {exc}") from None
        for mv, name in zip(ordered, names):
            artifacts[mv.id]["tuf_target"] = name
    issued_at = time.time()
    for device in targets:
        # An SQL expression, not a Python increment: two concurrent deployments never hand
        # out the same generation.
        device.desired_generation = Device.desired_generation + 1  # type: ignore[assignment]
        mv = chosen.get(device.id)
        if mv is not None:
            device.desired_model = mv.name
            device.desired_version = mv.version
            device.desired_variant = mv.variant
            device.desired_artifact = dict(artifacts[mv.id])
            device.desired_rollback = rollback
        if agent_ref is not None:
            device.desired_agent = agent_ref.model_dump(mode="json")
        device.desired_issued_at = issued_at
    session.flush()
    for device in targets:
        session.refresh(device)
    record = Deployment(
        model=model,
        version=version,
        agent_version=agent_ref.version if agent_ref is not None else None,
        target_kind=kind,
        target_value=value,
        created_at=utcnow(),
        device_count=len(targets),
        device_ids=[d.id for d in targets],
        variants={d: mv.variant for d, mv in chosen.items()},
    )
    session.add(record)
    session.commit()
    states: list[DesiredState] = []
    for device in targets:
        state = desired_state(device)
        assert state is not None
        states.append(state)
        if publisher is not None and not publish_desired(publisher, device):
            log.warning("desired state for %s recorded but not yet published; it goes out when the bus reconnects", device.id)
    what = " + ".join(([f"{model} {version}"] if model is not None else []) + ([f"agent {agent_ref.version}"] if agent_ref else []))
    names = sorted({mv.variant for mv in chosen.values()})
    log.info("deployed %s%s to %s %s (%d devices)%s", what, f" (variants {', '.join(names)})" if len(names) > 1 else "",
             kind, value, len(targets), " as a rollback" if rollback else "")
    return DeploymentResult(record, states)


def _devices_by_id(session: Session, device_ids: list[str]) -> list[Device]:
    """The listed devices (each once, in the order given); every id must be registered."""
    ids = list(dict.fromkeys(device_ids))
    if not ids:
        raise InvalidRequestError("device_ids is empty; list at least one device (GET /api/v1/devices)")
    found = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids))).all()}
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise NotFoundError(f"devices not registered: {', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}; "
                            "register them (POST /api/v1/devices) or start their agents")
    return [found[i] for i in ids]


def _summary(devices: list[Device]) -> str:
    """A deployment's target_value for an explicit device list (the full list is in device_ids)."""
    text = ",".join(d.id for d in devices)
    return text if len(text) <= 128 else f"{len(devices)} devices: {text[:100]}…"


def list_deployments(session: Session, limit: int = 100) -> list[Deployment]:
    return list(session.scalars(select(Deployment).order_by(Deployment.id.desc()).limit(limit)).all())
