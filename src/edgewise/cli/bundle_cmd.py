"""`edgewise bundle create | inspect | verify`"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ._util import fail, print_json

app = typer.Typer(help="Package, inspect and verify signed model bundles (.ewb).", no_args_is_help=True)


@app.command("create")
def create(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="ONNX model file."),
    name: str = typer.Option(..., "--name", help="Model name, e.g. digits."),
    version: str = typer.Option(..., "--version", help="Semantic version, e.g. 1.0.0."),
    key: Path = typer.Option(..., "--key", help="Private signing key (edgewise keys generate)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: NAME-VERSION.ewb)."),
    labels: Path | None = typer.Option(None, "--labels", help="Text file, one class label per line."),
    preprocessing: Path | None = typer.Option(None, "--preprocessing", help="JSON preprocessing spec."),
    description: str = typer.Option("", "--description"),
    min_ram_mb: int | None = typer.Option(None, "--min-ram-mb", help="Override the estimated minimum RAM."),
    variant_of: Path | None = typer.Option(
        None, "--variant-of", help="`edgewise optimize` output folder (or report.json) MODEL came from: "
        "links the variant to its model version with its profile figures and tuned runtime settings.",
    ),
    variant: str | None = typer.Option(None, "--variant", help="Variant name (default: the optimize candidate's name)."),
    golden: Path | None = typer.Option(
        None, "--golden", exists=True, dir_okay=False,
        help="NPZ of golden inputs (one array per model input, samples along axis 0, before preprocessing): "
        "the model is run on them now and the agent checks a new model against the outputs before committing it.",
    ),
    golden_atol: float | None = typer.Option(None, "--golden-atol", help="Absolute tolerance of the golden check (default: 1e-4)."),
    golden_latency_ms: float | None = typer.Option(None, "--golden-latency-ms", help="Median latency budget per golden sample, ms."),
    reference: Path | None = typer.Option(
        None, "--reference", exists=True, dir_okay=False,
        help="NPZ of held-out inputs (one array per model input, samples along axis 0, before preprocessing): "
        "reference statistics for drift detection are computed from them and the model's outputs, and signed into the bundle.",
    ),
    fit_on: Path | None = typer.Option(
        None, "--fit-on", exists=True, dir_okay=False,
        help="NPZ of raw training inputs (array 'x_train', 'x' or the only one; samples along axis 0): fits the statistics "
        "the preprocessing steps need (medians, quantiles, means, stds) and freezes them into the bundle.",
    ),
    fit_key: str | None = typer.Option(None, "--fit-key", help="Name of the array in the --fit-on NPZ."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Write one signed file holding the model, its manifest and preprocessing."""
    from ..bundle import BundleError, build_bundle
    from ..bundle.variant import variant_from_report
    from ..security import KeyFileError, load_signer

    suffix = f"-{variant}" if variant else ""
    try:
        signer = load_signer(key)
        variant_info, runtime = variant_from_report(variant_of, model, variant) if variant_of else (None, None)
        if variant_info is not None and not variant:
            suffix = f"-{variant_info.name}"
        if variant and variant_info is None:
            from ..bundle import Variant

            variant_info = Variant(name=variant)
        out = out or Path(f"{name}-{version}{suffix}.ewb")
        spec = json.loads(preprocessing.read_text()) if preprocessing else None
        fit_data = None
        if fit_on is not None:
            from ..data.fit import load_training_array

            fit_data = load_training_array(fit_on, fit_key)
        elif fit_key is not None:
            raise ValueError("--fit-key needs --fit-on FILE.npz")
        label_list = [line.strip() for line in labels.read_text().splitlines() if line.strip()] if labels else None
        golden_spec = None
        if golden is not None:
            import numpy as np

            with np.load(golden, allow_pickle=False) as npz:
                golden_spec = ({k: npz[k] for k in npz.files}, golden_atol, golden_latency_ms)
        elif golden_atol is not None or golden_latency_ms is not None:
            raise ValueError("--golden-atol and --golden-latency-ms need --golden FILE.npz")
        reference_inputs = None
        if reference is not None:
            import numpy as np

            with np.load(reference, allow_pickle=False) as npz:
                reference_inputs = {k: npz[k] for k in npz.files}
        manifest = build_bundle(
            model, name=name, version=version, signer=signer, out=out, labels=label_list,
            preprocessing=spec, fit_on=fit_data, description=description, min_ram_mb=min_ram_mb,
            variant=variant_info, runtime=runtime, golden=golden_spec, reference=reference_inputs,
        )
    except (BundleError, KeyFileError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"path": str(out), "key_id": signer.key_id, "manifest": manifest.model_dump(mode="json")})
    else:
        typer.echo(f"wrote {out} ({out.stat().st_size:,} bytes), {name} {version}, signed by key {signer.key_id}")


def _manifest_table(manifest, sig, path: Path):  # type: ignore[no-untyped-def]
    from rich.table import Table

    t = Table(title=f"{path.name}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("name", manifest.name)
    t.add_row("version", manifest.version)
    t.add_row("created", manifest.created_at.isoformat())
    t.add_row("signed by key", sig.key_id if sig else "[red]unsigned[/red]")
    for spec in manifest.model.inputs:
        t.add_row("input", f"{spec.name}  {spec.dtype}  {spec.shape}")
    for spec in manifest.model.outputs:
        t.add_row("output", f"{spec.name}  {spec.dtype}  {spec.shape}")
    t.add_row("opset", ", ".join(f"{d} {v}" for d, v in sorted(manifest.model.opset.items())))
    t.add_row("preprocessing", " → ".join(s.op for s in manifest.preprocessing.steps) or "none")
    t.add_row("labels", ", ".join(manifest.labels) if manifest.labels else "none")
    if manifest.reference is not None:
        r = manifest.reference
        t.add_row("reference", f"{r.samples} held-out samples, {r.num_features} {r.feature_map.kind} features on input {r.input!r}"
                  + (f", classes from {r.output!r}" if r.output else ""))
    t.add_row("min RAM", f"{manifest.requirements.min_ram_mb} MB")
    t.add_row("runtime", f"{manifest.requirements.runtime} >= {manifest.requirements.min_runtime_version}")
    if manifest.runtime is not None:
        r = manifest.runtime
        t.add_row("tuned settings", f"{r.execution_provider}, {r.intra_op_threads or '-'} threads, {r.graph_optimization_level}")
    if manifest.variant is not None:
        v = manifest.variant
        f = v.figures
        figs = ", ".join(
            s for s in (
                f"{f['latency_b1_median_ms']:.3f} ms" if f.get("latency_b1_median_ms") is not None else "",
                f"{f.get('metric')} {f['metric_value']:.4f}" if f.get("metric_value") is not None else "",
                f"drop {f['drop']:+.4f}" if f.get("drop") is not None else "",
            ) if s
        )
        t.add_row("variant", f"{v.name} ({v.recipe or 'custom'}) for {v.profile or 'any profile'}" + (f": {figs}" if figs else ""))
    for name, m in sorted(manifest.members.items()):
        t.add_row("member", f"{name}  {m.size:,} B  sha256 {m.sha256[:16]}…")
    return t


@app.command("inspect")
def inspect(
    file: Path = typer.Argument(..., help="Bundle file (.ewb)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show what a bundle holds (does not verify it: use `verify` for that)."""
    from rich.console import Console

    from ..bundle import BundleError, read_manifest

    try:
        manifest, sig = read_manifest(file)
    except BundleError as exc:
        fail(str(exc))
    if as_json:
        print_json({"manifest": manifest.model_dump(mode="json"), "key_id": sig.key_id if sig else None})
    else:
        Console().print(_manifest_table(manifest, sig, file))


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="Bundle file (.ewb)."),
    trust: list[Path] = typer.Option(..., "--trust", help="Trusted public key file or folder (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check the signature and every member's hash; exit 1 naming what failed."""
    from ..bundle import BundleError, verify_bundle
    from ..security import KeyFileError, TrustedKeys

    try:
        vb = verify_bundle(file, TrustedKeys.from_paths(trust))
    except (BundleError, KeyFileError) as exc:
        if as_json:
            print_json({"ok": False, "error": str(exc), "kind": type(exc).__name__})
            raise typer.Exit(1)
        fail(str(exc))
    if as_json:
        print_json({"ok": True, "name": vb.manifest.name, "version": vb.manifest.version, "key_id": vb.key_id, "sha256": vb.sha256})
    else:
        typer.secho(f"OK {file}: {vb.manifest.name} {vb.manifest.version}, signed by trusted key {vb.key_id}", fg=typer.colors.GREEN)
