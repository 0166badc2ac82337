"""The evidence: ``report.json`` (every figure), ``report.md`` (tables) and ``pareto.png``.

The plot uses matplotlib's Agg canvas directly (no pyplot, no global backend switch):
x = batch-1 median latency, y = the metric, marker area ∝ file size, the chosen
variant ringed in red, the budget as a dashed line, the Pareto front as a step line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .optimizer import OptimizeResult, Variant


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def rows(result: OptimizeResult) -> list[dict[str, str]]:
    """One row of display strings per candidate (shared by report.md and the CLI table)."""
    out = []
    pb = result.profile.batch_size
    for v in result.candidates:
        mark = "✓ chosen" if v is result.chosen else ("closest" if v is result.closest else "")
        if not v.ok:
            status = f"{v.status}: {v.reason}"
        elif v.within_budget:
            status = "within budget"
        else:
            status = "; ".join(v.budget_notes[:1]) or "outside budget"
        out.append({
            "variant": v.name,
            "size": "-" if v.size_bytes is None else f"{v.size_bytes / 1024:,.1f} KB",
            "b1_median": _fmt(v.latency.median_ms if v.latency else None),
            "b1_p95": _fmt(v.latency.p95_ms if v.latency else None),
            f"b{pb}_median": _fmt(v.latency_batch.median_ms if v.latency_batch else None),
            "peak_mb": _fmt(v.peak_rss_mb, ".1f"),
            "metric": _fmt(v.metric_value, ".4f"),
            "drop": _fmt(v.drop, "+.4f"),
            "runtime": v.runtime.describe() if v.runtime else "-",
            "status": status,
            "mark": mark,
        })
    return out


def markdown(result: OptimizeResult) -> str:
    m, p = result.metric, result.profile
    pb = p.batch_size
    lines = [
        f"# edgewise optimize: `{result.model.name if result.model else 'model'}` for `{p.name}`",
        "",
        f"**{'OK' if result.ok else 'NO VARIANT MEETS THE BUDGET'}** — {result.reason}",
        "",
        f"- **Measured by:** {result.measurement['statement']}",
        f"- **Why:** {result.measurement['decision']}",
        f"- **Machine:** {result.machine.hostname}, {result.machine.cpu_model}, {result.machine.cores} usable cores, "
        f"{result.machine.arch}, onnxruntime {result.machine.onnxruntime}",
        f"- **ISA flags (this machine):** {' '.join(f for f in result.machine.isa if f.startswith(('avx', 'sse4', 'fma', 'f16c', 'amx', 'asimd', 'fp', 'neon', 'sve', 'i8mm', 'dotprod'))) or '-'}",
        f"- **Profile:** {p.name} ({p.description or p.arch}); {p.threads} threads, RAM budget {p.ram_budget_mb:g} MB, "
        f"latency budget {p.latency_budget_ms if p.latency_budget_ms else '-'} ms, batch {pb}, ISA {', '.join(p.isa) or '-'}, "
        f"providers {', '.join(p.execution_providers)}",
        f"- **Metric:** `{m['name']}` ({m['why']}); units: {m['units']}; FP32 = {_fmt(m['baseline_value'], '.4f')} "
        f"on {m['eval_samples']} eval samples",
        f"- **Budget:** max drop {result.max_accuracy_drop:g} in the metric's units",
        "",
        "| variant | size | b1 median ms | b1 p95 ms | b" + str(pb) + " median ms | peak RSS MB | "
        + m["name"] + " | drop | runtime | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows(result):
        name = f"**{r['variant']}** ✓" if r["mark"] == "✓ chosen" else r["variant"]
        lines.append(
            f"| {name} | {r['size']} | {r['b1_median']} | {r['b1_p95']} | {r[f'b{pb}_median']} | {r['peak_mb']} | "
            f"{r['metric']} | {r['drop']} | {r['runtime']} | {r['status'].replace('|', '/')} |"
        )
    lines.append("")
    if result.chosen and result.chosen.runtime:
        lines += ["## Runtime settings for the bundle manifest", "", "```json",
                  json.dumps(result.chosen.runtime.to_runtime(), indent=2), "```", ""]
    if result.mixed_precision:
        mp = result.mixed_precision
        lines += ["## Mixed precision", "", f"Base: `{mp.get('base')}`. {mp.get('note', mp.get('error', ''))}", ""]
        if mp.get("fp32_nodes"):
            lines.append("Nodes kept in FP32: " + ", ".join(f"`{n}`" for n in mp["fp32_nodes"]))
            lines.append("")
        if mp.get("ranking"):
            lines += ["| node | op | sensitivity (NMSE at outputs) |", "|---|---|---:|"]
            lines += [f"| `{e['node']}` | {e['op_type']} | {e['error']:.3g} |" for e in mp["ranking"][:15]]
            lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += [
        "## How these figures were measured", "",
        f"- {result.measurement['method']}.",
        f"- Threads: up to {result.measurement['threads']}; each variant's runtime settings were tuned first "
        "(graph optimization level, intra/inter-op threads, execution provider), then all variants were timed with their best settings.",
        "- Choice: fastest batch-1 median within budget; within 2 % counts as a tie and the smaller file wins; "
        "never slower than FP32.",
        "", "![Pareto plot](pareto.png)", "",
    ]
    return "\n".join(lines)


def pareto_png(result: OptimizeResult, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vs: list[Variant] = [v for v in result.candidates if v.ok and v.latency is not None and v.metric_value is not None]
    fig = Figure(figsize=(8, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if vs:
        sizes = [v.size_bytes or 1 for v in vs]
        biggest = max(sizes)
        colors = {"fp32": "#4c72b0", "fp16": "#8172b2", "int8": "#55a868", "mixed": "#dd8452"}
        placed: list[tuple[float, float]] = []
        values = [v.metric_value for v in vs]
        span = (max(values) - min(values)) or abs(max(values)) or 1.0
        for v, s in sorted(zip(vs, sizes), key=lambda vs_: vs_[0].latency_ms):
            ax.scatter(v.latency_ms, v.metric_value, s=40 + 500 * s / biggest, alpha=0.6,
                       color=colors.get(v.precision, "gray"), edgecolors="black", linewidths=0.5)
            # points that (nearly) coincide get their labels stacked instead of printed over each other
            near = sum(1 for x, y in placed if abs(math.log(x / v.latency_ms)) < 0.5 and abs(y - v.metric_value) <= 0.02 * span)
            placed.append((v.latency_ms, v.metric_value))
            ax.annotate(v.name, (v.latency_ms, v.metric_value), textcoords="offset points", xytext=(8, 6 + 9 * near), fontsize=7)
        for precision, color in colors.items():
            if any(v.precision == precision for v in vs):
                ax.scatter([], [], color=color, alpha=0.6, edgecolors="black", linewidths=0.5, label=precision)
        lats = [v.latency_ms for v in vs]
        if max(lats) / max(min(lats), 1e-9) > 4:
            from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.12, y=0.25)
        hib = result.metric["higher_is_better"]
        front, best = [], None
        for v in sorted(vs, key=lambda v: v.latency_ms):
            if best is None or (v.metric_value > best if hib else v.metric_value < best):
                front.append(v)
                best = v.metric_value
        if len(front) > 1:
            ax.step([v.latency_ms for v in front], [v.metric_value for v in front], where="post", color="gray", lw=1, ls=":",
                    label="Pareto front")
        base = result.metric["baseline_value"]
        if base is not None:
            line = base - result.max_accuracy_drop if hib else base + result.max_accuracy_drop
            ax.axhline(line, color="red", ls="--", lw=1, label=f"budget (drop {result.max_accuracy_drop:g})")
        if result.chosen is not None and result.chosen in vs:
            c = result.chosen
            ax.scatter([c.latency_ms], [c.metric_value], s=300, facecolors="none", edgecolors="red", linewidths=2,
                       label=f"chosen: {c.name}")
        ax.legend(loc="best", fontsize=8)
    where = "target" if result.measured_on_target else f"PROXY on {result.machine.hostname}"
    ax.set_xlabel(f"batch-1 median latency, ms ({where})")
    ax.set_ylabel(result.metric["name"])
    ax.set_title(f"{result.profile.name}: latency vs {result.metric['name']} (marker size = file size)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def write_reports(result: OptimizeResult) -> dict[str, str]:
    out = result.out_dir
    files = {"report_json": str(out / "report.json"), "report_md": str(out / "report.md"), "pareto_png": str(out / "pareto.png")}
    result.files = files
    pareto_png(result, out / "pareto.png")
    (out / "report.md").write_text(markdown(result))
    data: dict[str, Any] = result.to_json()
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return files
