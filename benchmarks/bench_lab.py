"""The lab on real models and data shipped with packages, in one run:
FP32 vs `edgewise optimize`'s chosen variant vs ONNX Runtime's default `quantize_static` and
`quantize_dynamic` vs NNCF (where it installs), plus structured pruning + INT8 for the digits CNN.

Every variant is timed by the same interleaved timer (batch 1, one intra-op thread: a small
device's setting), and scored on the same held-out split.

Models: a 3-block CNN (32-64-128 channels) on scikit-learn's digits upsampled to 32x32; an MLP on the
64 digit pixels; a 1-D CNN on BasicMotions (6-channel accelerometer/gyroscope, from the aeon package).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PROFILE = """\
name: x86-vnni-bench
description: this benchmark machine, measured at batch 1 on one thread (a small device's setting)
arch: x86_64
os: linux
threads: 1
ram_budget_mb: 1024
latency_budget_ms: 50
isa: [avx2, avx512_vnni]
execution_providers: [CPUExecutionProvider]
batch_size: 8
"""


class _Reader:
    def __init__(self, x: np.ndarray, name: str = "x") -> None:
        self._it = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self):  # noqa: ANN201 - onnxruntime's CalibrationDataReader protocol
        return next(self._it, None)


def _ort_default_static(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    reader = type("R", (_Reader, CalibrationDataReader), {})(calib)
    quantize_static(str(fp32), str(out), reader)  # ORT's defaults: QDQ, per-tensor, S8S8, MinMax
    return out


def _ort_default_dynamic(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32), str(out))
    return out


def _nncf(fp32: Path, out: Path, calib: np.ndarray) -> Path | str:
    try:
        import nncf
        import onnx
    except Exception as exc:  # noqa: BLE001 - NNCF is an optional baseline
        return f"not installed ({type(exc).__name__})"
    try:
        q = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset([{"x": calib[i : i + 1]} for i in range(len(calib))]),
                          subset_size=len(calib))
        onnx.save(q, str(out))
        return out
    except Exception as exc:  # noqa: BLE001
        return f"failed: {type(exc).__name__}: {exc}"[:200]


def _measure(paths: dict[str, Path], x_eval: np.ndarray, y_eval: np.ndarray) -> dict[str, dict[str, Any]]:
    from edgewise.lab.export import onnx_predict
    from edgewise.lab.optimize.measure import RuntimeSettings, make_session, time_interleaved

    one = {"x": np.ascontiguousarray(x_eval[:1], dtype=np.float32)}
    sessions = {k: (make_session(p, RuntimeSettings(intra_op_threads=1)), one) for k, p in paths.items()}
    lat = time_interleaved(sessions, rounds=15, round_s=0.05)
    out = {}
    for k, p in paths.items():
        acc = float((onnx_predict(p, x_eval, sess=sessions[k][0]).argmax(1) == y_eval).mean())
        out[k] = {"size_bytes": p.stat().st_size, "b1_median_ms": round(lat[k].median_ms, 4),
                  "b1_p95_ms": round(lat[k].p95_ms, 4), "accuracy": round(acc, 4)}
    return out


def _one_model(name: str, model, data, epochs: int, batch_size: int, root: Path, profile: Path,
               budget: float, prune: bool = False) -> dict[str, Any]:
    import torch

    from edgewise.lab.export import export_onnx
    from edgewise.lab.optimize import optimize
    from edgewise.lab.torch_models import train

    torch.manual_seed(0)
    d = root / name
    d.mkdir()
    train(model, data, epochs=epochs, batch_size=batch_size)
    model.eval()
    fp32 = d / "fp32.onnx"
    export_onnx(model, torch.from_numpy(data.x_test[:2]), fp32)
    calib = data.x_train[:128].astype(np.float32)
    res = optimize(fp32, {"x": calib}, {"x": data.x_test, "y": data.y_test}, profile,
                   max_accuracy_drop=budget, out_dir=d / "optimize", measure_here=True)
    paths: dict[str, Path] = {"fp32": fp32}
    if res.chosen is not None:
        paths["edgewise (" + res.chosen.name + ")"] = res.chosen.path
    paths["ort quantize_static (defaults)"] = _ort_default_static(fp32, d / "ort-static.onnx", calib)
    paths["ort quantize_dynamic (defaults)"] = _ort_default_dynamic(fp32, d / "ort-dynamic.onnx")
    nncf_path = _nncf(fp32, d / "nncf.onnx", calib)
    notes = []
    if isinstance(nncf_path, Path):
        paths["nncf quantize"] = nncf_path
    else:
        notes.append(f"NNCF: {nncf_path}")
    if prune:
        from edgewise.lab.prune import structured_prune

        pr = structured_prune(model, torch.from_numpy(data.x_train[:8]), ratio=0.5, data=data,
                              finetune_epochs=epochs // 2, batch_size=batch_size)
        pruned = d / "pruned-fp32.onnx"
        export_onnx(pr.model.eval(), torch.from_numpy(data.x_test[:2]), pruned)
        pres = optimize(pruned, {"x": calib}, {"x": data.x_test, "y": data.y_test}, profile,
                        max_accuracy_drop=budget, out_dir=d / "optimize-pruned", measure_here=True)
        paths["pruned 50% fp32"] = pruned
        if pres.chosen is not None:
            paths["pruned 50% + edgewise (" + pres.chosen.name + ")"] = pres.chosen.path
    rows = _measure(paths, data.x_test.astype(np.float32), data.y_test)
    base = rows["fp32"]
    for r in rows.values():
        r["speedup"] = round(base["b1_median_ms"] / r["b1_median_ms"], 2)
        r["size_ratio"] = round(r["size_bytes"] / base["size_bytes"], 3)
        r["acc_drop_points"] = round(100 * (base["accuracy"] - r["accuracy"]), 2)
    return {"rows": rows, "chosen": res.chosen.name if res.chosen else None, "optimize_reason": res.reason,
            "notes": notes}


def run() -> dict[str, Any]:
    import torch

    from edgewise.lab.datasets import DatasetNotAvailableError, load_basic_motions, load_digits_features, load_digits_images
    from edgewise.lab.torch_models import DigitsCNN, DigitsMLP, MotionCNN

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="ew-bench-lab-"))
    profile = root / "bench.yaml"
    profile.write_text(PROFILE)
    out: dict[str, Any] = {}
    out["digits-cnn"] = _one_model("digits-cnn", DigitsCNN(width=2.0), load_digits_images(), 12, 64, root, profile,
                                   0.005, prune=True)
    out["digits-mlp"] = _one_model("digits-mlp", DigitsMLP(), load_digits_features(), 40, 64, root, profile, 0.005)
    try:
        bm = load_basic_motions()
        out["basicmotions-cnn"] = _one_model("basicmotions-cnn", MotionCNN(), bm, 60, 16, root, profile, 0.01)
    except DatasetNotAvailableError as exc:
        out["basicmotions-cnn"] = {"skipped": str(exc)}
    cnn = out["digits-cnn"]["rows"]
    chosen = next(v for k, v in cnn.items() if k.startswith("edgewise"))
    pruned = next((v for k, v in cnn.items() if k.startswith("pruned 50% + edgewise")), None)
    never_slower = all(
        next(v for k, v in m["rows"].items() if k.startswith("edgewise"))["b1_median_ms"] <= m["rows"]["fp32"]["b1_median_ms"] * 1.02
        for m in out.values() if "rows" in m and any(k.startswith("edgewise") for k in m["rows"])
    )
    out["targets"] = {
        "digits_cnn_speedup_ge_1.9": chosen["speedup"] >= 1.9,
        "digits_cnn_drop_le_0.5pt": chosen["acc_drop_points"] <= 0.5,
        "digits_cnn_size_le_0.3": chosen["size_ratio"] <= 0.3,
        "chosen_never_slower_than_fp32": never_slower,
        "pruned_int8_speedup_ge_3": bool(pruned and pruned["speedup"] >= 3.0),
        "pruned_int8_drop_le_1pt": bool(pruned and pruned["acc_drop_points"] <= 1.0),
    }
    out["pass"] = all(out["targets"].values())
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = []
    for name, m in res.items():
        if name in ("targets", "pass"):
            continue
        lines.append(f"\n### {name}\n")
        if "skipped" in m:
            lines.append(f"skipped: {m['skipped']}\n")
            continue
        lines.append("| variant | size KB | × FP32 size | batch-1 median ms | p95 ms | speedup | accuracy | drop (points) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in m["rows"].items():
            lines.append(f"| {k} | {r['size_bytes'] / 1024:.1f} | {r['size_ratio']} | {r['b1_median_ms']} | {r['b1_p95_ms']} | "
                         f"{r['speedup']}× | {r['accuracy']:.4f} | {r['acc_drop_points']:+.2f} |")
        lines.append(f"\n`edgewise optimize` chose **{m['chosen']}**: {m['optimize_reason']}")
        for n in m["notes"]:
            lines.append(f"\n{n}")
    lines.append("\n| target | met |\n|---|---|")
    for k, v in res["targets"].items():
        lines.append(f"| {k} | {'yes' if v else '**NO**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    r = run()
    print(json.dumps(r, indent=2))
    print(markdown(r))
