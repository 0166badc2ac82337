"""Helpers for the federated-learning system tests (no tests here): a control plane with FL on, fake devices, signed updates."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.protocol import Batch, DeviceState, encode, topics
from edgewise.protocol.messages import FLUpdate, SampleArray
from edgewise.sim.fleet import http_json, wait_until


def register_fake(cp: Any, device_id: str, version: str = "1.1.0") -> None:
    """A device that exists for the control plane (its state went through ingest) but runs no agent."""
    cp.services.ingest.handle(topics.state(device_id), encode(DeviceState(device_id=device_id, status="online", model="digits", version=version)))


def signed_update(device_id: str, job_id: str, rnd: int, base_version: int, delta: dict[str, np.ndarray], *,
                  key: ec.EllipticCurvePrivateKey, num_samples: int = 20, seq: int = 1) -> FLUpdate:
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    u = FLUpdate(device_id=device_id, seq=seq, ts=time.time(), job_id=job_id, round=rnd, base_version=base_version,
                 model="digits", version="1.1.0", num_samples=num_samples, loss=0.5,
                 tensors=[SampleArray.of(k, v) for k, v in delta.items()], public_key=pub, signature="")
    return u.model_copy(update={"signature": base64.b64encode(key.sign(u.signed_bytes(), ec.ECDSA(hashes.SHA256()))).decode()})


def deliver(cp: Any, update: FLUpdate) -> None:
    """Through the real ingest path, as the device's outbox sends it (a Batch on telemetry/fl)."""
    cp.services.ingest.handle(topics.telemetry(update.device_id, "fl"), encode(Batch(device_id=update.device_id, items=[update])))


def job(cp: Any, job_id: str) -> dict[str, Any]:
    return http_json("GET", f"{cp.url}/api/v1/fl/jobs/{job_id}", token=cp.admin_token)


def wait_round(cp: Any, job_id: str, number: int, state: str = "open", timeout: float = 20.0) -> dict[str, Any]:
    def found() -> Any:
        j = job(cp, job_id)
        return next((r for r in j["rounds"] if r["number"] == number and r["state"] == state), None)

    return wait_until(found, timeout, interval=0.05, what=f"round {number} {state}")


def head_shapes(cp: Any) -> dict[str, tuple[int, ...]]:
    """The digits 1.1.0 (mlp) head: initializer name -> shape."""
    from edgewise.control.fl import _load_base, head_weights

    with cp.services.db.session() as s:
        return {k: v.shape for k, v in head_weights(_load_base(s, cp.services.registry, "digits", "1.1.0")).items()}
