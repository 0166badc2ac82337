"""Link a bundle to the `edgewise optimize` report that produced its model.

The report is plain JSON (format ``edgewise-optimize-report/1``), so the bundle package reads it
without importing the lab: the model file is matched to a candidate by sha256, and that
candidate's figures and tuned runtime settings go into the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import BundleError
from .manifest import RuntimeSettings, Variant

REPORT_FORMAT = "edgewise-optimize-report/1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def variant_from_report(report: Path, model: Path, name: str | None = None) -> tuple[Variant, RuntimeSettings | None]:
    """The manifest's ``variant`` and ``runtime`` for ``model``, taken from an optimize report.

    ``report`` is the optimize output folder or its ``report.json``. Raises BundleError naming the
    variants the report has when ``model`` is none of them.
    """
    report = Path(report)
    path = report / "report.json" if report.is_dir() else report
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"--variant-of {report}: cannot read an optimize report ({exc})") from None
    if data.get("format") != REPORT_FORMAT:
        raise BundleError(f"--variant-of {path}: not an edgewise optimize report (format {data.get('format')!r})")
    base_dir = path.parent
    want = _sha256(Path(model))

    def file_of(c: dict[str, Any]) -> Path | None:
        f = base_dir / str(c.get("file") or "")
        return f if c.get("file") and f.is_file() else None

    candidates = [c for c in data.get("candidates", []) if c.get("status") == "ok"]
    match = next((c for c in candidates if (f := file_of(c)) is not None and _sha256(f) == want), None)
    if match is None:
        names = ", ".join(f"{c['name']} ({c.get('file')})" for c in candidates) or "none"
        raise BundleError(f"{model} is not one of the variants in {path}: {names}")
    baseline = next((c for c in candidates if c.get("name") == data.get("baseline")), None)
    base_file = file_of(baseline) if baseline else None
    machine = data.get("machine") or {}
    b1 = (match.get("latency_ms") or {}).get("batch_1") or {}
    figures = {
        "size_bytes": match.get("size_bytes"),
        "latency_b1_median_ms": b1.get("median_ms"),
        "latency_b1_p95_ms": b1.get("p95_ms"),
        "peak_rss_mb": match.get("peak_rss_mb"),
        "metric": (data.get("metric") or {}).get("name"),
        "metric_value": match.get("metric_value"),
        "drop": match.get("drop"),
        "fp32_nodes": match.get("fp32_nodes") or [],
        "measured_on_target": bool(data.get("measured_on_target")),
        "chosen": data.get("chosen") == match["name"],
    }
    variant = Variant(
        name=name or match["name"],
        recipe=match.get("recipe"),
        base_model_sha256=_sha256(base_file) if base_file else None,
        profile=(data.get("profile") or {}).get("name"),
        measured_on=" ".join(str(machine.get(k, "")) for k in ("hostname", "cpu_model", "arch")).strip() or None,
        figures=figures,
    )
    runtime = RuntimeSettings.model_validate(match["runtime"]) if match.get("runtime") else None
    return variant, runtime
