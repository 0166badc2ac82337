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
    GOLDEN_MEMBER,
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    ORT_TYPES,
    Manifest,
    Member,
    ModelInfo,
    Golden,
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


GoldenSpec = tuple  # (inputs: dict[str, ndarray], tolerance: float | None = None, latency_budget_ms: float | None = None)


def pack_npz(arrays: Mapping[str, Any]) -> bytes:
    """An ``.npz`` (what ``numpy.load`` reads) with fixed timestamps, so the same arrays give the same bytes."""
    import io

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            with zf.open(fmt.zipinfo(key + ".npy"), "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    return buf.getvalue()


def golden_outputs(model_bytes: bytes, info: ModelInfo, inputs: Mapping[str, Any], preprocessing: PreprocessingSpec | None) -> dict[str, Any]:
    """Run the model on each golden sample (axis 0; one at a time as a batch of one, the bundle's
    preprocessing applied to the first input as the agent does) and stack the outputs per sample."""
    import numpy as np
    import onnxruntime as ort

    names = [i.name for i in info.inputs]
    if set(inputs) != set(names):
        raise BundleError(f"golden inputs {sorted(inputs)} differ from the model's inputs {names}")
    counts = set()
    for spec in info.inputs:
        x = inputs[spec.name]
        if not isinstance(x, np.ndarray) or x.ndim == 0:
            raise BundleError(f"golden input {spec.name!r}: expected an ndarray with samples along axis 0")
        if spec.dtype not in ("str", "string", "object") and x.dtype != np.dtype(spec.dtype):
            raise BundleError(f"golden input {spec.name!r}: dtype {x.dtype}, the model takes {spec.dtype}; convert with .astype({spec.dtype!r})")
        counts.add(len(x))
    if len(counts) != 1 or 0 in counts:
        raise BundleError(f"golden inputs need the same, non-zero number of samples along axis 0 (got {sorted(counts)})")
    n = counts.pop()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    per_sample: dict[str, list[Any]] = {o: [] for o in out_names}
    for i in range(n):
        feed = {}
        for j, name in enumerate(names):
            x = inputs[name][i : i + 1]
            if j == 0 and preprocessing:
                x = preprocessing.apply(x)
            feed[name] = x
        try:
            outs = sess.run(out_names, feed)
        except Exception as exc:
            raise BundleError(f"the model fails on golden sample {i}: {exc}") from None
        for name, value in zip(out_names, outs):
            per_sample[name].append(value)
    expected = {}
    for name, values in per_sample.items():
        if not all(isinstance(v, np.ndarray) and v.dtype.kind in "biuf" for v in values):
            continue  # non-tensor or string outputs are not compared
        try:
            expected[name] = np.stack(values)
        except ValueError:
            raise BundleError(f"output {name!r} changes shape between golden samples; it cannot be checked") from None
    if not expected:
        raise BundleError("the model has no numeric tensor output to check golden inputs against")
    return {**{f"inputs/{k}": v for k, v in inputs.items()}, **{f"outputs/{k}": v for k, v in expected.items()}}


def _reference(reference: Any, model_bytes: bytes, preprocessing: PreprocessingSpec | None) -> Any:
    """Reference statistics from what ``build_bundle(reference=...)`` was given (None: none)."""
    if reference is None:
        return None
    from ..data.reference import ReferenceStats, ReferenceStatsError, build_reference

    if isinstance(reference, ReferenceStats):
        return reference
    try:
        if isinstance(reference, Mapping) and "features" in reference and "feature_names" in reference:
            return ReferenceStats.model_validate(reference)
        return build_reference(model_bytes, reference, preprocessing=preprocessing)
    except (ReferenceStatsError, ValueError) as exc:
        raise BundleError(f"reference statistics: {exc}") from None


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
    golden: GoldenSpec | None = None,
    fit_on: Any = None,
    reference: Any = None,
) -> Manifest:
    """Write a signed ``.ewb`` to ``out`` atomically and return its manifest.

    ``golden=(inputs, tolerance=None, latency_budget_ms=None)``: ``inputs`` maps every model input
    to an array with samples along axis 0 (raw inputs: the bundle's preprocessing is applied as on the
    device). The model is run on them now and inputs plus outputs go into ``golden.npz``; the agent
    checks a new model against them before committing it (``tolerance`` is the absolute tolerance).

    ``fit_on``: raw training inputs (samples on axis 0) to fit the statistics the preprocessing needs
    (medians, quantiles, means, stds; see ``edgewise.data.fit``); they are frozen into the manifest.

    ``reference``: held-out data for drift detection, either raw inputs (an ndarray for a single-input
    model, or a mapping input name -> ndarray; the model is run on them now, after the bundle's
    preprocessing) or ready :class:`~edgewise.data.reference.ReferenceStats`. Stored in the manifest
    (``reference``), so it is signed with the bundle and the control plane reads the shared bins.
    """
    model_bytes = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
    members: dict[str, bytes] = {MODEL_MEMBER: model_bytes, **dict(extra_members or {})}
    if MANIFEST_MEMBER in members:
        raise BundleError(f"{MANIFEST_MEMBER} is reserved")
    info = describe_model(model_bytes)
    if isinstance(preprocessing, Mapping):
        preprocessing = PreprocessingSpec.model_validate(preprocessing)
    if fit_on is not None:  # training inputs: fit the statistics the spec's steps need, freeze them in
        from ..data.fit import fit_spec
        from ..data.preprocessing import PreprocessingError

        if not preprocessing:
            raise BundleError("training data to fit preprocessing on was given, but no preprocessing spec")
        try:
            preprocessing = fit_spec(preprocessing, fit_on)
        except PreprocessingError as exc:
            raise BundleError(f"cannot fit the preprocessing: {exc}") from None
    if preprocessing and not preprocessing.fitted:
        raise BundleError(
            f"preprocessing steps {preprocessing.unfitted()} need statistics of the training data; "
            "fit them with --fit-on TRAIN.npz (build_bundle(fit_on=x_train)) or write them into the spec"
        )
    golden_info: Golden | None = None
    if golden is not None:
        g_inputs, g_tol, g_budget = (tuple(golden) + (None, None))[:3]
        if GOLDEN_MEMBER in members:
            raise BundleError(f"{GOLDEN_MEMBER} is reserved when golden inputs are given")
        arrays = golden_outputs(model_bytes, info, g_inputs, preprocessing)
        members[GOLDEN_MEMBER] = pack_npz(arrays)
        try:
            golden_info = Golden(
                samples=len(next(iter(g_inputs.values()))), latency_budget_ms=g_budget,
                **({"atol": float(g_tol)} if g_tol is not None else {}),
            )
        except ValueError as exc:
            raise BundleError(f"invalid golden settings: {exc}") from None
    reference_stats = _reference(reference, model_bytes, preprocessing)
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
        golden=golden_info,
        reference=reference_stats,
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
