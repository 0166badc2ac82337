"""Captured samples: stored per model version and device, exported as a data set for retraining.

Devices send :class:`~edgewise.protocol.Sample` records (agent.capture) on their telemetry channel;
ingest stores each once (UNIQUE(device_id, seq)). Plain functions here; ``api/samples.py`` is the
thin HTTP face. Exports are built in memory: they are meant for one model version's captures at
a time (``MAX_EXPORT_SAMPLES``), not for the whole history of a large fleet.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..protocol import Sample
from .errors import InvalidRequestError, NotFoundError
from .models import SampleRow

MAX_EXPORT_SAMPLES = 100_000
ExportFormat = Literal["npz", "parquet"]


def sample_values(s: Sample, now: Any) -> dict[str, Any]:
    """The row for one received sample: array metadata as JSON, the bytes concatenated.

    Raises ValueError (naming the input) if an array's bytes do not match its dtype and shape:
    such a sample cannot be exported, so it is refused at the door.
    """
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for a in s.inputs:
        arr = a.array()  # checks dtype, shape and byte count
        raw = base64.b64decode(a.data)
        inputs.append({"name": a.name, "dtype": arr.dtype.name, "shape": list(arr.shape), "nbytes": len(raw)})
        chunks.append(raw)
    data = b"".join(chunks)
    return {
        "device_id": s.device_id,
        "seq": s.seq,
        "ts": s.ts,
        "received_at": now,
        "model": s.model,
        "version": s.version,
        "reason": s.reason,
        "top1": s.top1,
        "confidence": s.confidence,
        "inputs": inputs,
        "data": data,
        "size": len(data),
    }


def arrays_of(row: SampleRow) -> dict[str, np.ndarray]:
    """The input arrays of one stored sample, by input name, exactly as the device served them."""
    out: dict[str, np.ndarray] = {}
    pos = 0
    for meta in row.inputs:
        n = int(meta["nbytes"])
        dtype = np.dtype(meta["dtype"])
        out[meta["name"]] = np.frombuffer(row.data[pos : pos + n], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(tuple(meta["shape"]))
        pos += n
    return out


def _query(model: str | None, version: str | None, device_id: str | None, reason: str | None) -> Any:
    q = select(SampleRow)
    if model is not None:
        q = q.where(SampleRow.model == model)
    if version is not None:
        q = q.where(SampleRow.version == version)
    if device_id is not None:
        q = q.where(SampleRow.device_id == device_id)
    if reason is not None:
        q = q.where(SampleRow.reason == reason)
    return q


def list_samples(
    session: Session, *, model: str | None = None, version: str | None = None, device_id: str | None = None,
    reason: str | None = None, limit: int = 100, offset: int = 0,
) -> list[SampleRow]:
    """Stored samples matching the filters, oldest first (by device clock, then device and seq)."""
    q = _query(model, version, device_id, reason).order_by(SampleRow.ts, SampleRow.device_id, SampleRow.seq)
    return list(session.scalars(q.offset(offset).limit(limit)).all())


def summarize(session: Session) -> list[dict[str, Any]]:
    """How many samples (and bytes) are stored per model version, device and reason."""
    q = (
        select(SampleRow.model, SampleRow.version, SampleRow.device_id, SampleRow.reason, func.count(), func.sum(SampleRow.size))
        .group_by(SampleRow.model, SampleRow.version, SampleRow.device_id, SampleRow.reason)
        .order_by(SampleRow.model, SampleRow.version, SampleRow.device_id, SampleRow.reason)
    )
    return [
        {"model": m, "version": v, "device_id": d, "reason": r, "count": int(n), "bytes": int(b or 0)}
        for m, v, d, r, n, b in session.execute(q).all()
    ]


def dataset(
    session: Session, model: str, version: str, *, device_id: str | None = None, reason: str | None = None,
) -> dict[str, np.ndarray]:
    """One model version's samples as arrays, one row per sample, ordered by (device, seq).

    ``x:<input>``: each sample's input stacked on axis 0 (a sample is one row of the batch the
    device served, shape (1, ...), so the stack is (n, ...)); ``device_id``, ``seq``, ``ts``,
    ``reason``, ``top1`` (-1: none), ``confidence`` (NaN: none). There are no labels: captured
    samples are unlabelled by nature (label them, or use them as the target domain).
    """
    q = _query(model, version, device_id, reason).order_by(SampleRow.device_id, SampleRow.seq)
    rows = list(session.scalars(q.limit(MAX_EXPORT_SAMPLES + 1)).all())
    if not rows:
        raise NotFoundError(
            f"no samples stored for {model} {version}" + (f" from device {device_id!r}" if device_id else "")
            + (f" with reason {reason!r}" if reason else "") + "; are devices capturing (agent config `capture = true`)?"
        )
    if len(rows) > MAX_EXPORT_SAMPLES:
        raise InvalidRequestError(
            f"more than {MAX_EXPORT_SAMPLES} samples for {model} {version}; export per device (device_id=...) or per reason"
        )
    first = rows[0].inputs
    layout = [(m["name"], m["dtype"], list(m["shape"][1:])) for m in first]
    cols: dict[str, list[np.ndarray]] = {m["name"]: [] for m in first}
    for r in rows:
        got = [(m["name"], m["dtype"], list(m["shape"][1:])) for m in r.inputs]
        if got != layout:
            raise InvalidRequestError(
                f"sample {r.device_id}/{r.seq} has inputs {got}, others {layout}: the arrays cannot be stacked; "
                "export per device (device_id=...)"
            )
        for name, arr in arrays_of(r).items():
            cols[name].append(arr if arr.ndim else arr.reshape(1))
    out = {f"x:{name}": np.concatenate(parts, axis=0) for name, parts in cols.items()}
    out["device_id"] = np.array([r.device_id for r in rows])
    out["seq"] = np.array([r.seq for r in rows], dtype=np.int64)
    out["ts"] = np.array([r.ts for r in rows], dtype=np.float64)
    out["reason"] = np.array([r.reason for r in rows])
    out["top1"] = np.array([-1 if r.top1 is None else r.top1 for r in rows], dtype=np.int64)
    out["confidence"] = np.array([np.nan if r.confidence is None else r.confidence for r in rows], dtype=np.float32)
    return out


def export(session: Session, model: str, version: str, fmt: ExportFormat = "npz", **filters: Any) -> tuple[bytes, str]:
    """The data set as file bytes and its media type: ``npz`` (numpy.load) or ``parquet`` (needs pyarrow)."""
    arrays = dataset(session, model, version, **filters)
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue(), "application/octet-stream"
    if fmt == "parquet":
        return _parquet(arrays), "application/vnd.apache.parquet"
    raise InvalidRequestError(f"unknown export format {fmt!r}; use npz or parquet")


def _parquet(arrays: dict[str, np.ndarray]) -> bytes:
    """One row per sample; each input as a list column of its flattened values, its dtype and shape in the schema metadata."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidRequestError(
            "parquet export needs pyarrow, which this control plane does not have; install it (pip install pyarrow) "
            "or export as npz (format=npz)"
        ) from None
    cols: dict[str, Any] = {}
    meta: dict[str, str] = {}
    for key, arr in arrays.items():
        if key.startswith("x:"):
            cols[key] = pa.array(list(arr.reshape(arr.shape[0], -1)))
            meta[key] = f"{arr.dtype.name}{list(arr.shape[1:])}"
        else:
            cols[key] = pa.array(arr.tolist())
    table = pa.table(cols).replace_schema_metadata({f"edgewise.shape.{k}": v for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
