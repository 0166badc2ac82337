"""Federated learning on non-IID real data with 30% of devices offline in any round, with and without DP.

Digits (scikit-learn's bundled set, 1,257 training images) split by class skew (Dirichlet α = 0.5) over 20 and
100 simulated devices; BasicMotions (aeon's bundled accelerometer/gyroscope set, 40 training recordings) split
subject-like: 10 devices, each holding one recording of each of the four activities. Model: a softmax head
(numpy, `edgewise.learn.local`); digits on its 64 scaled pixels, BasicMotions on 30 per-channel statistics.
Each round samples every device with probability q = cohort / devices; 30% of the fleet is offline that round
(their replies are missing). Centralized = the same model trained on the union of the devices' data.
DP-FedAvg: per-device clipping, Gaussian noise at the server calibrated with dp-accounting's RDP accountant to
spend exactly ε over the rounds (δ = 1e-5).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = 20
EPSILONS = (8.0, 4.0, 1.0)
DELTA = 1e-5


def _digits() -> tuple[np.ndarray, ...]:
    from edgewise.lab.demo_model import load_digits_split

    d = load_digits_split()
    return d.x_train / 16, d.y_train, d.x_test / 16, d.y_test


def _motion_features(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.mean(2), x.std(2), x.min(2), x.max(2), np.abs(np.diff(x, axis=2)).mean(2)], axis=1)


def _basic_motions() -> tuple[np.ndarray, ...]:
    from edgewise.lab.datasets import load_basic_motions

    d = load_basic_motions()
    ftr, fte = _motion_features(d.x_train), _motion_features(d.x_test)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    return (ftr - mu) / sd, d.y_train, (fte - mu) / sd, d.y_test


def _case(name: str, data: tuple[np.ndarray, ...], parts: list[np.ndarray], cohort: int, sim_kw: dict[str, Any]) -> dict[str, Any]:
    from edgewise.learn import simulate

    x, y, xt, yt = data
    out: dict[str, Any] = {"name": name, "devices": len(parts), "cohort": cohort, "rounds": ROUNDS}
    base = dict(devices=len(parts), rounds=ROUNDS, cohort=cohort, offline_fraction=0.3, **sim_kw)
    out["centralized"] = round(simulate.centralized(x, y, xt, yt, simulate.Recipe(batch_size=16, lr=0.2), epochs=20), 4)
    t = time.perf_counter()
    r = simulate.run(x, y, parts, xt, yt, simulate.FleetSim(**base))
    out["fedavg"] = {"final": round(r.final, 4), "curve": [round(a, 4) for a in r.accuracy], "replies_mean": round(float(np.mean(r.participants)), 1)}
    for eps in EPSILONS:
        r = simulate.run(x, y, parts, xt, yt, simulate.FleetSim(**base, clip_norm=0.3, target_epsilon=eps, delta=DELTA, server_lr=2.0))
        out[f"dp_eps{eps:g}"] = {"final": round(r.final, 4), "curve": [round(a, 4) for a in r.accuracy],
                                 "noise_multiplier": round(r.noise_multiplier, 3), "epsilon_spent": round(r.epsilon[-1], 3)}
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def run() -> dict:
    from edgewise.learn import partition

    results: dict[str, Any] = {"cases": []}
    digits = _digits()
    for n in (20, 100):
        parts = partition.dirichlet_split(digits[1], n, alpha=0.5, seed=0)
        results["cases"].append(_case(f"digits, {n} devices (Dirichlet 0.5)", digits, parts, cohort=n // 2, sim_kw={}))
    try:
        bm = _basic_motions()
        parts = [np.array([c * 10 + s for c in range(4)]) for s in range(10)]  # "subject" s: one recording per activity
        results["cases"].append(_case("BasicMotions, 10 subject-like devices", bm, parts, cohort=5,
                                      sim_kw={"recipe": __import__("edgewise.learn.local", fromlist=["Recipe"]).Recipe(epochs=5, batch_size=4, lr=0.2)}))
    except Exception as exc:  # BasicMotions ships inside aeon (a bench dependency)
        results["basic_motions_skipped"] = f"{type(exc).__name__}: {exc}"
    results["plot"] = _plot(results["cases"])
    results["pass"] = all(c["fedavg"]["final"] > 0.5 for c in results["cases"])
    return results


def _plot(cases: list[dict[str, Any]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.4), sharey=True)
    for ax, c in zip(np.atleast_1d(axes), cases):
        rounds = np.arange(1, c["rounds"] + 1)
        ax.plot(rounds, c["fedavg"]["curve"], label="FedAvg", lw=2)
        for eps in EPSILONS:
            ax.plot(rounds, c[f"dp_eps{eps:g}"]["curve"], label=f"DP ε={eps:g}", lw=1.2)
        ax.axhline(c["centralized"], color="k", ls="--", lw=1, label="centralized")
        ax.set_title(c["name"], fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy (held-out)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(__file__).resolve().parent.parent / "docs" / "img" / "fl-accuracy.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out.relative_to(out.parent.parent.parent))


def markdown(r: dict) -> str:
    lines = [
        f"Accuracy on the held-out set after {ROUNDS} rounds, 30% of devices offline in every round (their replies missing); "
        "DP: (ε, δ = 1e-5) spent over all rounds, noise calibrated by dp-accounting (RDP), clip 0.3, server learning rate 2.",
        "",
        "| data, fleet | centralized | FedAvg | DP ε = 8 | DP ε = 4 | DP ε = 1 | noise z at ε = 8 / 4 / 1 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in r["cases"]:
        z = " / ".join(str(c[f"dp_eps{e:g}"]["noise_multiplier"]) for e in EPSILONS)
        lines.append(f"| {c['name']} (cohort {c['cohort']}) | {c['centralized']:.3f} | {c['fedavg']['final']:.3f} | "
                     + " | ".join(f"{c[f'dp_eps{e:g}']['final']:.3f}" for e in EPSILONS) + f" | {z} |")
    if r.get("basic_motions_skipped"):
        lines.append(f"\nBasicMotions skipped: {r['basic_motions_skipped']}")
    if r.get("plot"):
        lines.append(f"\n![accuracy per round]({Path(r['plot']).relative_to('docs') if r['plot'].startswith('docs') else r['plot']})")
    return "\n".join(lines)
