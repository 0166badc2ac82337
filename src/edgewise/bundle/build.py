"""Build a signed bundle from an ONNX model."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from ..data.preprocessing import PreprocessingSpec
from ..security.keys import Signer
from . import format as fmt
from .errors import BundleError
from .manifest import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    ORT_TYPES,
    Manifest,
    Member,
    ModelInfo,
    Requirements,
    RuntimeSettings,
    TensorSpec,
    Variant,
)



def describe_model(model_bytes: bytes) -> ModelInfo:
    """Read inputs, outputs and opsets; loading it in ONNX Runtime also proves it loads."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception zoo
        raise BundleError(f"ONNX Runtime cannot load the model: {exc}") from None

    def spec(arg: Any) -> TensorSpec:
        return TensorSpec(name=arg.name, dtype=ORT_TYPES.get(arg.type, arg.type), shape=list(arg.shape))

    opset: dict[str, int] = {}
    ir_version = producer = None
    try:
        import onnx

        proto = onnx.load_from_string(model_bytes)
        opset = {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}
        ir_version = int(proto.ir_version)
        producer = f"{proto.producer_name} {proto.producer_version}".strip() or None
    except ImportError:  # the device may build bundles without the onnx package
        pass
    return ModelInfo(
        path=MODEL_MEMBER,
        inputs=[spec(i) for i in sess.get_inputs()],
        outputs=[spec(o) for o in sess.get_outputs()],
        opset=opset,
        ir_version=ir_version,
        producer=producer,
    )


def estimate_min_ram_mb(model_size: int) -> int:
    """Weights held twice while the session initializes, plus the runtime's own ~40 MB."""
    return int(2 * model_size / 2**20) + 40


def build_bundle(
    model: Path | bytes,
    *,
    name: str,
    version: str,
    signer: Signer,
    out: Path,
    labels: list[str] | None = None,
    preprocessing: PreprocessingSpec | Mapping[str, Any] | None = None,
    description: str = "",
    min_ram_mb: int | None = None,
    extra_members: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
    runtime: RuntimeSettings | Mapping[str, Any] | None = None,
    variant: Variant | Mapping[str, Any] | None = None,
) -> Manifest:
    """Write a signed ``.ewb`` to ``out`` atomically and return its manifest."""
    model_bytes = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
    members: dict[str, bytes] = {MODEL_MEMBER: model_bytes, **dict(extra_members or {})}
    if MANIFEST_MEMBER in members:
        raise BundleError(f"{MANIFEST_MEMBER} is reserved")
    info = describe_model(model_bytes)
    if isinstance(preprocessing, Mapping):
        preprocessing = PreprocessingSpec.model_validate(preprocessing)
    fields: dict[str, Any] = dict(
        name=name,
        version=version,
        description=description,
        model=info,
        preprocessing=preprocessing or PreprocessingSpec(),
        labels=labels,
        requirements=Requirements(
            min_ram_mb=estimate_min_ram_mb(len(model_bytes)) if min_ram_mb is None else min_ram_mb,
            min_runtime_version="1.17",
        ),
        members={n: Member(sha256=hashlib.sha256(b).hexdigest(), size=len(b)) for n, b in sorted(members.items())},
        metadata=dict(metadata or {}),
        runtime=RuntimeSettings.model_validate(runtime) if isinstance(runtime, Mapping) else runtime,
        variant=Variant.model_validate(variant) if isinstance(variant, Mapping) else variant,
    )
    if created_at is not None:
        fields["created_at"] = created_at
    try:
        manifest = Manifest(**fields)
    except ValueError as exc:
        raise BundleError(f"invalid bundle fields: {exc}") from None

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(fmt.zipinfo(MANIFEST_MEMBER), manifest.to_bytes())
                for member_name in sorted(members):
                    zf.writestr(fmt.zipinfo(member_name), members[member_name])
                zf.comment = b"\0" * fmt.BLOCK_LEN
            size = f.seek(0, os.SEEK_END)
            digest = fmt.hash_prefix(f, size - fmt.BLOCK_LEN)
            block = fmt.pack_block(signer.key_id, signer.sign(fmt.signed_message(digest)))
            f.seek(size - fmt.BLOCK_LEN)
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest
