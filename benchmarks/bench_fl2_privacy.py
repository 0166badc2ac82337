"""Privatized telemetry (issue 8 FL2): what local DP costs in accuracy of the class histogram, and in time per report.

Data: the class histogram of one Summary (a 10-class digits model, 600 predictions per interval, skewed like a real
device: class shares from a Dirichlet(1) draw) privatized by ``agent.privacy.TelemetryPrivatizer`` with the
Summary's confidence histogram alongside (so ε is split over two histograms, as on a device). **Device error**: L1
distance between the privatized and the raw class histogram, as a fraction of the predictions (0 = exact, 2 = all
mass in the wrong place), mean over 200 reports. **Fleet error**: the same for the sum over 100 devices' reports
(what the control plane's class-mix charts and drift pooling see), randomized response unbiased on the server.
**Time**: mean wall time of one ``privatize`` call (no state dir: nothing written).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

PREDICTIONS = 600
CLASSES = 10
REPORTS = 200
FLEET = 100
EPSILONS = (0.5, 1.0, 4.0)
MECHANISMS = ("laplace", "gaussian", "randomized_response")


def _summary(counts: np.ndarray) -> Any:
    from edgewise.protocol import Summary

    conf = np.bincount(np.random.default_rng(0).integers(5, 10, int(counts.sum())), minlength=10)
    return Summary(device_id="bench", seq=0, ts=0.0, predictions=int(counts.sum()),
                   classes={str(i): int(c) for i, c in enumerate(counts) if c}, confidence_hist=conf.tolist())


def _vec(classes: dict[str, int]) -> np.ndarray:
    v = np.zeros(CLASSES)
    for k, n in classes.items():
        v[int(k)] = n
    return v


def _case(mechanism: str, eps: float, rng: np.random.Generator) -> dict[str, float]:
    from edgewise.agent.privacy import TelemetryPrivatizer
    from edgewise.learn.dp import unbias_randomized_response
    from edgewise.protocol.messages import TelemetryPrivacy

    if mechanism == "gaussian" and eps >= 1:
        return {}
    p = TelemetryPrivatizer(None, rng=rng)
    p.set(TelemetryPrivacy(mechanism=mechanism, epsilon_per_report=eps, budget_per_day=1e9))
    device_err, fleet_err, took = [], [], 0.0
    for _ in range(REPORTS // 10):
        fleet_raw, fleet_noisy = np.zeros(CLASSES), np.zeros(CLASSES)
        for d in range(FLEET):
            raw = rng.multinomial(PREDICTIONS, rng.dirichlet(np.ones(CLASSES)))
            s = _summary(raw)
            t0 = time.perf_counter()
            out = p.privatize(s, num_classes=CLASSES, now=0.0)
            took += time.perf_counter() - t0
            noisy = _vec(out.classes)
            if d < 10:
                device_err.append(np.abs(noisy - raw).sum() / PREDICTIONS)
            fleet_raw += raw
            fleet_noisy += unbias_randomized_response(noisy, eps / 2) if mechanism == "randomized_response" else noisy
        fleet_err.append(np.abs(fleet_noisy - fleet_raw).sum() / fleet_raw.sum())
    return {"device_l1": float(np.mean(device_err)), "fleet_l1": float(np.mean(fleet_err)),
            "us_per_report": took / (REPORTS // 10 * FLEET) * 1e6}


def run() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    cases = {f"{m}@{e}": _case(m, e, rng) for m in MECHANISMS for e in EPSILONS}
    return {"predictions": PREDICTIONS, "classes": CLASSES, "fleet": FLEET, "cases": {k: v for k, v in cases.items() if v}}


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Class histogram of one Summary ({r['predictions']} predictions, {r['classes']} classes, skewed), privatized with "
        f"the confidence histogram alongside (ε split over both). L1 error as a fraction of the predictions; fleet = the "
        f"sum of {r['fleet']} devices (randomized response unbiased on the server).",
        "",
        "| mechanism | ε per report | device L1 error | fleet L1 error | µs per report |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, c in r["cases"].items():
        m, e = key.split("@")
        lines.append(f"| {m} | {e} | {c['device_l1']:.3f} | {c['fleet_l1']:.4f} | {c['us_per_report']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(run()))
