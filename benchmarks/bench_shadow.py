"""Shadow mode's cost to serving: µs per predict with a shadow candidate on vs off, same agent, same run (issue 7).

The agent serves digits 1.0.0 (logistic regression) through its Python API, batch 1, one intra-op
thread; the shadow candidate is digits 1.1.0 (MLP) in its own session with one thread on the shadow's
worker thread. Rounds of 2,000 calls alternate between "off" (no candidate) and "on" at several
``sample_every`` rates (interleaved, so load on the machine hits all alike); the figure is the median
round. The serving loop runs flat out, which is the worst case: with ``sample_every=1`` the candidate
cannot keep up, the bounded queue stays full, and the skipped count shows how much was not compared.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from _common import build_demo_bundles, machine, tempdir

RATES = (1, 10, 100, 1000)
CALLS, ROUNDS = 2000, 11
PREEMPTED_US = 1000.0  # calls slower than this are the OS running another process (counted apart, not averaged)


def run() -> dict:
    from edgewise.agent.config import AgentConfig
    from edgewise.agent.runtime import LoadedModel
    from edgewise.agent.service import Agent
    from edgewise.bundle import verify_bundle
    from edgewise.lab.demo_model import load_digits_split
    from edgewise.security import TrustedKeys

    root = tempdir("ew-bench-shadow-")
    bundles, pub = build_demo_bundles(root)
    (root / "state" / "trust").mkdir(parents=True)
    (root / "state" / "trust" / "signing.pub").write_bytes(pub.read_bytes())
    agent = Agent(AgentConfig(device_id="bench-shadow", state_dir=root / "state", api_port=0, threads=1))
    try:
        agent.install(bundles["1.0.0"])
        candidate = LoadedModel.from_bundle(verify_bundle(bundles["1.1.0"], TrustedKeys.from_paths([pub])), threads=1)
        shadow = agent.shadow
        shadow.start()
        x = load_digits_split().x_test
        rows = [x[i : i + 1] for i in range(len(x))]

        def serve(n: int) -> np.ndarray:
            lat = np.empty(n)
            for i in range(n):
                t = time.perf_counter_ns()
                agent.predict(rows[i % len(rows)])
                lat[i] = time.perf_counter_ns() - t
            return lat / 1000

        # "off again" is a second run without a candidate: the spread between the two is the noise of this machine.
        configs: dict[str, int | None] = {"off": None, **{f"every {r}": r for r in RATES}, "off again": None}
        lat: dict[str, list[np.ndarray]] = {k: [] for k in configs}
        counts: dict[str, dict[str, int]] = {k: {"offered": 0, "compared": 0, "skipped": 0, "agreed": 0} for k in configs}
        shadow.use(candidate, sample_every=1)
        serve(300)  # warm up both sessions and the worker
        for _ in range(ROUNDS):
            for name, rate in configs.items():
                shadow.use(None if rate is None else candidate, sample_every=rate or 1)
                lat[name].append(serve(CALLS))
                if rate is not None:
                    deadline = time.monotonic() + 10
                    while shadow._queue.qsize() and time.monotonic() < deadline:  # let the worker finish this round's queue
                        time.sleep(0.005)
                    time.sleep(0.01)
                    stats = shadow.take_interval()
                    c = counts[name]
                    c["offered"] += -(-CALLS // rate)
                    c["compared"] += stats.compared
                    c["skipped"] += stats.skipped
                    c["agreed"] += stats.agreed
        shadow.use(None)

        def figures(values: list[np.ndarray]) -> dict[str, float]:
            a = np.concatenate(values)
            kept = a[a < PREEMPTED_US]
            return {"p50_us": round(float(np.percentile(a, 50)), 2), "p99_us": round(float(np.percentile(a, 99)), 1),
                    "mean_us": round(float(kept.mean()), 2), "over_1ms": int((a >= PREEMPTED_US).sum())}

        off = figures(lat["off"])
        out: dict[str, Any] = {"machine": machine(), "calls_per_round": CALLS, "rounds": ROUNDS, "off": off,
                               "off_again": figures(lat["off again"]), "on": {}}
        for name, rate in configs.items():
            if rate is None:
                continue
            f = figures(lat[name])
            c = counts[name]
            out["on"][name] = {
                **f, "added_mean_us": round(f["mean_us"] - off["mean_us"], 2), "added_p50_us": round(f["p50_us"] - off["p50_us"], 2),
                "ratio": round(f["mean_us"] / off["mean_us"], 3),
                "compared_fraction": round(c["compared"] / c["offered"], 3) if c["offered"] else None,
                "skipped": c["skipped"], "agreement": round(c["agreed"] / c["compared"], 3) if c["compared"] else None,
            }
        out["pass"] = True
        return out
    finally:
        agent.stop()


def markdown(r: dict) -> str:
    off, again = r["off"], r["off_again"]
    lines = [
        f"Shadow mode's cost to serving (digits 1.0.0 served, 1.1.0 as the candidate; batch 1, one thread each; "
        f"{r['rounds']} interleaved rounds of {r['calls_per_round']:,} calls per setting, serving flat out; per-call latency, "
        f"mean without the calls over 1 ms, which are counted apart as preemption by other processes). "
        f"Without a candidate: **{off['mean_us']} µs** mean, {off['p50_us']} µs p50 "
        f"(control rounds, also without: {again['mean_us']} µs mean, {again['p50_us']} µs p50: the difference is this machine's noise).",
        "",
        "| sample_every | mean µs | added µs (mean) | added µs (p50) | ratio (mean) | p99 µs | calls > 1 ms | sampled inputs compared | skipped (queue full) | agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| off | {off['mean_us']} | — | — | 1.0 | {off['p99_us']} | {off['over_1ms']} | — | — | — |",
    ]
    for name, v in r["on"].items():
        frac = "—" if v["compared_fraction"] is None else f"{v['compared_fraction']:.0%}"
        agree = "—" if v["agreement"] is None else f"{v['agreement']:.3f}"
        lines.append(f"| {name.split()[-1]} | {v['mean_us']} | {v['added_mean_us']} | {v['added_p50_us']} | {v['ratio']} | {v['p99_us']} | "
                     f"{v['over_1ms']} | {frac} | {v['skipped']:,} | {agree} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import json

    res = run()
    print(json.dumps(res, indent=2))
    print(markdown(res))
