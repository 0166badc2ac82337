"""Several models on one device (issue 7, orchestration): a real agent hosts placed models in their own worker
processes, each with its own intra-op threads and memory limit, against a real broker and real ONNX Runtime."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgewise.bundle import build_bundle
from edgewise.protocol import DesiredState, encode, topics
from edgewise.protocol.messages import ModelPlacement
from test_agent_support import BundleServer, ControlPlane, artifact_for, make_agent, wait_for


@pytest.fixture(scope="module")
def placed(tmp_path_factory, digits_models, signer) -> dict[str, Path]:
    """Bundles to place beside the primary digits model: two classifiers and a model that needs 256 MB at run time."""
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    d = tmp_path_factory.mktemp("placed")
    out = {}
    for name, kind in (("digits-a", "logreg"), ("digits-b", "mlp")):
        out[name] = d / f"{name}.ewb"
        build_bundle(digits_models[kind], name=name, version="1.0.0", signer=signer, out=out[name], labels=LABELS, preprocessing=PREPROCESSING)
    out["hog"] = d / "hog.ewb"
    build_bundle(_hog_model(), name="hog", version="1.0.0", signer=signer, out=out["hog"])
    out["grow"] = d / "grow.ewb"
    build_bundle(_grow_model(), name="grow", version="1.0.0", signer=signer, out=out["grow"])
    return out


def _grow_model() -> bytes:
    """y = sum(ones(n)): allocates as much as the request asks for (n = [8192, 8192] is 256 MB)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ConstantOfShape", ["n"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "grow", [helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _hog_model() -> bytes:
    """y = sum(x) * sum(ones(8192, 8192)): a tiny file that allocates 256 MB every time it runs."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1),
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("ReduceSum", ["xs", "axes"], ["y"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes, "hog", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [8192, 8192]), helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


@pytest.fixture
def cp(mosquitto):
    c = ControlPlane(mosquitto)
    yield c
    c.close()


@pytest.fixture
def agent_of(tmp_path, keys_dir, bundles, server, mosquitto):
    started = []

    def make(device_id: str):
        agent = make_agent(tmp_path / device_id, keys_dir, device_id=device_id, server_url=server.base_url, broker_url=mosquitto)
        assert agent.install(bundles["1.0.0"]).result == "ok"
        agent.start()
        assert agent.link.wait_subscribed(10)
        started.append(agent)
        return agent

    yield make
    for a in started:
        a.stop()


def place(server: BundleServer, path: Path, *, threads: int = 1, memory_mb: int = 128, data: bytes | None = None) -> ModelPlacement:
    data = path.read_bytes() if data is None else data
    url_path = f"/placed/{path.name}"
    server.add(url_path, data)
    tmp = path.with_suffix(".served")
    tmp.write_bytes(data)
    name = path.stem
    return ModelPlacement(model=name, version="1.0.0", artifact=artifact_for(tmp, url_path.lstrip("/")), threads=threads, memory_mb=memory_mb)


def desire(cp: ControlPlane, device_id: str, generation: int, placements: list[ModelPlacement]) -> None:
    msg = DesiredState(device_id=device_id, generation=generation, model="digits", version="1.0.0", placements=placements, issued_at=time.time())
    cp.publish(topics.desired(device_id), encode(msg))


def hosted(cp: ControlPlane, device_id: str) -> dict[str, object]:
    state = cp.last_state(device_id)
    return {h.model: h for h in state.hosted} if state is not None else {}


def wait_status(cp: ControlPlane, device_id: str, want: dict[str, str], timeout: float = 60.0) -> dict[str, object]:
    def check():
        h = hosted(cp, device_id)
        return h if all(m in h and h[m].status == s for m, s in want.items()) else None

    return wait_for(check, timeout=timeout, what=f"hosted models {want} (last: {hosted(cp, device_id)})")


def post(agent, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{agent.api_port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:
        return False


def test_two_placed_models_serve_side_by_side_each_with_its_own_threads(agent_of, placed, server, cp, digits_data):
    agent = agent_of("place-two")
    desire(cp, "place-two", 1, [place(server, placed["digits-a"], threads=1), place(server, placed["digits-b"], threads=2)])
    h = wait_status(cp, "place-two", {"digits-a": "serving", "digits-b": "serving"})
    assert (h["digits-a"].threads, h["digits-b"].threads) == (1, 2)
    x = digits_data.x_test[:4].tolist()
    want = digits_data.y_test[:4].tolist()
    for name in ("digits-a", "digits-b"):
        status, answer = post(agent, f"/v1/models/{name}/predict", {"inputs": {"x": x}})
        assert status == 200, answer
        assert answer["model"] == name and sum(int(a) == b for a, b in zip(answer["outputs"]["label"], want)) >= 3
    status, answer = post(agent, "/v1/predict", {"inputs": {"x": x}})
    assert status == 200 and answer["model"] == "digits"
    a, b = agent.hosting.worker_info("digits-a"), agent.hosting.worker_info("digits-b")
    assert (a["intra_op_threads"], a["inter_op_threads"], b["intra_op_threads"], b["inter_op_threads"]) == (1, 1, 2, 1)
    assert b["os_threads"] == a["os_threads"] + 1  # ONNX Runtime's intra-op pool: threads - 1 extra OS threads
    assert len({a["pid"], b["pid"], os.getpid()}) == 3 and a["limit_mb"] and b["limit_mb"]
    h = wait_for(lambda: (h := hosted(cp, "place-two")) and all(m.rss_mb for m in h.values()) and h, what="rss reported")
    assert all(m.rss_mb > 1 for m in h.values())
    out = agent.hosting.predict("digits-b", np.asarray(digits_data.x_test[:2]))
    assert out["outputs"]["label"].shape == (2,)


def test_a_model_over_its_memory_limit_fails_alone_and_is_reported_with_the_reason(agent_of, placed, server, cp, digits_data):
    agent = agent_of("place-hog")
    desire(cp, "place-hog", 1, [place(server, placed["digits-a"]), place(server, placed["hog"], memory_mb=32)])
    h = wait_status(cp, "place-hog", {"digits-a": "serving", "hog": "failed"})
    assert "memory limit of 32 MB" in h["hog"].reason and "bad_alloc" in h["hog"].reason
    status, answer = post(agent, "/v1/models/hog/predict", {"inputs": {"x": [[1, 2, 3, 4]]}})
    assert status == 503 and "memory limit" in answer["error"]
    assert post(agent, "/v1/models/digits-a/predict", {"inputs": {"x": digits_data.x_test[:1].tolist()}})[0] == 200
    assert post(agent, "/v1/predict", {"inputs": {"x": digits_data.x_test[:1].tolist()}})[0] == 200
    events = wait_for(lambda: [e for e in cp.of("place-hog", "event") if e.kind == "placement.failed"], what="placement.failed event")
    assert events[0].detail["model"] == "hog" and events[0].severity == "error"


def test_a_request_over_the_memory_limit_fails_cleanly_and_the_worker_keeps_serving(agent_of, placed, server, cp):
    agent = agent_of("place-grow")
    desire(cp, "place-grow", 1, [place(server, placed["grow"], memory_mb=32)])
    wait_status(cp, "place-grow", {"grow": "serving"})
    pid = agent.hosting.get("grow").pid
    status, answer = post(agent, "/v1/models/grow/predict", {"inputs": {"n": [1000, 10]}})
    assert status == 200 and np.ravel(answer["outputs"]["y"])[0] == 10000
    status, answer = post(agent, "/v1/models/grow/predict", {"inputs": {"n": [8192, 8192]}})
    assert status == 507 and "exceeded its memory limit of 32 MB" in answer["error"]
    status, answer = post(agent, "/v1/models/grow/predict", {"inputs": {"n": [10, 10]}})
    assert status == 200 and np.ravel(answer["outputs"]["y"])[0] == 100
    assert agent.hosting.get("grow").pid == pid and agent.hosting.get("grow").status == "serving"  # no OOM kill, no restart


def test_a_killed_worker_is_restarted_and_the_crash_reported(agent_of, placed, server, cp, digits_data):
    agent = agent_of("place-kill")
    desire(cp, "place-kill", 1, [place(server, placed["digits-a"]), place(server, placed["digits-b"])])
    wait_status(cp, "place-kill", {"digits-a": "serving", "digits-b": "serving"})
    pid = agent.hosting.get("digits-a").pid
    other = agent.hosting.get("digits-b").pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (p := agent.hosting.get("digits-a").pid) and p != pid and agent.hosting.get("digits-a").status == "serving",
             timeout=60, what="digits-a restarted")
    crash = wait_for(lambda: [e for e in cp.of("place-kill", "event") if e.kind == "placement.crash"], what="crash event")
    assert "SIGKILL" in crash[0].message and crash[0].detail["model"] == "digits-a"
    assert agent.hosting.get("digits-b").pid == other  # the other placement never noticed
    assert post(agent, "/v1/models/digits-a/predict", {"inputs": {"x": digits_data.x_test[:1].tolist()}})[0] == 200


def test_removing_a_placement_stops_its_worker(agent_of, placed, server, cp, digits_data):
    agent = agent_of("place-rm")
    pa, pb = place(server, placed["digits-a"]), place(server, placed["digits-b"])
    desire(cp, "place-rm", 1, [pa, pb])
    wait_status(cp, "place-rm", {"digits-a": "serving", "digits-b": "serving"})
    pid = agent.hosting.get("digits-a").pid
    desire(cp, "place-rm", 2, [pb])
    wait_for(lambda: "digits-a" not in hosted(cp, "place-rm") and (s := cp.last_state("place-rm")) and s.generation == 2, what="digits-a gone")
    assert not alive(pid)
    assert not (agent.state_dir / "placed" / "digits-a").exists()
    status, answer = post(agent, "/v1/models/digits-a/predict", {"inputs": {"x": digits_data.x_test[:1].tolist()}})
    assert status == 404 and "digits-b" in answer["error"]
    assert post(agent, "/v1/models/digits-b/predict", {"inputs": {"x": digits_data.x_test[:1].tolist()}})[0] == 200


def test_a_tampered_placed_bundle_is_refused_and_so_is_a_stored_copy_changed_on_disk(agent_of, placed, server, cp):
    agent = agent_of("place-tamper")
    bad = bytearray(placed["digits-b"].read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    tampered = place(server, placed["digits-b"], data=bytes(bad))  # sha256 in the desired state matches the bad bytes
    desire(cp, "place-tamper", 1, [tampered, place(server, placed["digits-a"])])
    h = wait_status(cp, "place-tamper", {"digits-b": "failed", "digits-a": "serving"})
    assert "verification failed" in h["digits-b"].reason
    assert agent.hosting.get("digits-b").pid is None and not list((agent.state_dir / "placed" / "digits-b").glob("*.ewb"))
    # Now the stored copy of a verified, serving model changes on disk: the worker refuses it on its next start.
    stored = next((agent.state_dir / "placed" / "digits-a").glob("*.ewb"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    os.kill(agent.hosting.get("digits-a").pid, signal.SIGKILL)
    h = wait_status(cp, "place-tamper", {"digits-a": "failed"})
    assert "verification failed" in h["digits-a"].reason


def test_a_changed_placement_restarts_its_worker_with_the_new_threads(agent_of, placed, server, cp):
    agent = agent_of("place-change")
    desire(cp, "place-change", 1, [place(server, placed["digits-a"], threads=1)])
    wait_status(cp, "place-change", {"digits-a": "serving"})
    pid = agent.hosting.get("digits-a").pid
    desire(cp, "place-change", 2, [place(server, placed["digits-a"], threads=2)])
    wait_for(lambda: (pm := agent.hosting.get("digits-a")) and pm.status == "serving" and pm.pid not in (None, pid), what="a new worker")
    assert agent.hosting.worker_info("digits-a")["intra_op_threads"] == 2 and not alive(pid)


def test_an_agent_restarted_without_a_network_serves_its_placements_again(tmp_path, keys_dir, agent_of, placed, server, cp, digits_data):
    agent = agent_of("place-offline")
    desire(cp, "place-offline", 1, [place(server, placed["digits-a"])])
    wait_status(cp, "place-offline", {"digits-a": "serving"})
    agent.stop()
    server.files.clear()  # nothing to download from any more
    again = make_agent(agent.state_dir, keys_dir, device_id="place-offline")  # no broker, no server
    again.start()
    try:
        wait_for(lambda: (pm := again.hosting.get("digits-a")) and pm.status == "serving", timeout=60, what="digits-a serving offline")
        assert again.hosting.predict("digits-a", np.asarray(digits_data.x_test[:2]))["outputs"]["label"].shape == (2,)
    finally:
        again.stop()
