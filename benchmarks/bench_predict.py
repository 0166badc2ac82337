"""Agent Python-API predict vs bare onnxruntime.InferenceSession.run, same model, same input, same process.

Batch 1, one intra-op thread. The baseline gets the already-preprocessed input (the agent does
the preprocessing itself), so the overhead figure includes preprocessing, validation and metrics.
The local HTTP endpoint is measured beside it (stdlib client, one connection per request).
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import onnxruntime as ort

from _common import build_demo_bundles, interleaved, med, pct, per_call_latencies, tempdir


def run() -> dict:
    from edgewise.agent.config import AgentConfig
    from edgewise.agent.service import Agent
    from edgewise.lab.demo_model import PREPROCESSING, load_digits_split

    root = tempdir("ew-bench-predict-")
    bundles, pub = build_demo_bundles(root)
    (root / "state" / "trust").mkdir(parents=True)
    (root / "state" / "trust" / "signing.pub").write_bytes(pub.read_bytes())
    agent = Agent(AgentConfig(device_id="bench", state_dir=root / "state", api_port=0, threads=1))
    agent.install(bundles["1.0.0"])
    agent.start()
    try:
        from edgewise.bundle import verify_bundle
        from edgewise.security import TrustedKeys

        model = verify_bundle(bundles["1.0.0"], TrustedKeys.from_paths([pub])).read_model()
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        x_raw = load_digits_split().x_test[:1]
        x_pre = PREPROCESSING.apply(x_raw)
        np.testing.assert_array_equal(sess.run(None, {"x": x_pre})[0], agent.predict(x_raw)["label"])

        rounds = interleaved({
            "ort": lambda: sess.run(None, {"x": x_pre}),
            "agent": lambda: agent.predict(x_raw),
        })
        ort_us, agent_us = med(rounds["ort"]), med(rounds["agent"])

        body = json.dumps({"inputs": {"x": x_raw.tolist()}}).encode()

        def http_call() -> None:
            c = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=5)
            c.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            assert r.status == 200
            c.close()

        for _ in range(50):
            http_call()
        http_lat = per_call_latencies(http_call, 1000)
        agent_lat = per_call_latencies(lambda: agent.predict(x_raw), 3000)
        ort_lat = per_call_latencies(lambda: sess.run(None, {"x": x_pre}), 3000)
    finally:
        agent.stop()
    added = agent_us - ort_us
    ratio = agent_us / ort_us
    return {
        "ort_us_median": round(ort_us, 2),
        "agent_us_median": round(agent_us, 2),
        "ratio": round(ratio, 3),
        "added_us": round(added, 2),
        "limit": "ratio <= 1.10 or added <= 20 us",
        "pass": bool(ratio <= 1.10 or added <= 20.0),
        "ort_p95_us": round(pct(ort_lat, 95), 2),
        "agent_p95_us": round(pct(agent_lat, 95), 2),
        "http_p50_us": round(pct(http_lat, 50), 1),
        "http_p95_us": round(pct(http_lat, 95), 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
