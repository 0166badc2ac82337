"""Fetch and update: resumable downloads, and refusals that leave the old model serving."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgewise.agent import FetchError, HttpFetcher
from edgewise.bundle import build_bundle
from edgewise.lab.demo_model import LABELS, PREPROCESSING
from edgewise.protocol import ArtifactRef, DesiredState
from edgewise.security import load_signer
from test_agent_support import BundleServer, artifact_for, make_agent


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


@pytest.fixture
def agent(tmp_path, keys_dir, bundles, server):
    a = make_agent(tmp_path / "dev", keys_dir, device_id="upd-1", server_url=server.base_url)
    assert a.install(bundles["1.0.0"]).result == "ok"
    yield a
    a.stop()


def _flip_a_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 3] ^= 0x01
    return bytes(b)


def desired_for(artifact: ArtifactRef, version: str = "1.1.0", generation: int = 1) -> DesiredState:
    return DesiredState(device_id="upd-1", generation=generation, model="digits", version=version, artifact=artifact)


def test_fetch_resumes_with_a_range_request_after_a_dropped_connection(tmp_path, server, bundles):
    data = bundles["1.1.0"].read_bytes()
    url = server.add("/b.ewb", data)
    server.cut_after["/b.ewb"] = len(data) // 2
    fetcher = HttpFetcher(timeout=5)
    dest = tmp_path / "dl" / "b.ewb"
    with pytest.raises(FetchError, match="resumes on the next attempt"):
        fetcher.fetch(artifact_for(bundles["1.1.0"], url), dest)
    assert (tmp_path / "dl" / "b.ewb.part").stat().st_size == len(data) // 2
    assert fetcher.fetch(artifact_for(bundles["1.1.0"], url), dest) == dest
    assert dest.read_bytes() == data
    assert server.requests[-1] == ("/b.ewb", f"bytes={len(data) // 2}-")


def test_fetch_refuses_more_bytes_than_the_desired_state_announced(tmp_path, server, bundles):
    data = bundles["1.1.0"].read_bytes()
    url = server.add("/big.ewb", data + b"x" * 1000)
    art = ArtifactRef(url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    with pytest.raises(FetchError, match="refusing"):
        HttpFetcher(timeout=5).fetch(art, tmp_path / "big.ewb")
    assert not (tmp_path / "big.ewb").exists() and not (tmp_path / "big.ewb.part").exists()


def test_fetch_rejects_bytes_whose_sha256_differs_and_starts_over_next_time(tmp_path, server, bundles):
    data = bundles["1.1.0"].read_bytes()
    url = server.add("/b.ewb", _flip_a_byte(data))
    with pytest.raises(FetchError, match="sha256"):
        HttpFetcher(timeout=5).fetch(ArtifactRef(url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data)), tmp_path / "b.ewb")
    assert not (tmp_path / "b.ewb.part").exists()


def test_relative_artifact_urls_are_joined_to_the_server_url():
    f = HttpFetcher("http://control:8000/api")
    assert f.resolve("artifacts/x.ewb") == "http://control:8000/api/artifacts/x.ewb"
    assert f.resolve("/artifacts/x.ewb") == "http://control:8000/artifacts/x.ewb"
    assert f.resolve("https://mirror/x.ewb") == "https://mirror/x.ewb"
    with pytest.raises(FetchError, match="--server"):
        HttpFetcher(None).resolve("artifacts/x.ewb")


def test_update_fetches_verifies_and_switches_to_the_new_version(agent, server, bundles, digits_data):
    server.add("/artifacts/digits-1.1.0.ewb", bundles["1.1.0"].read_bytes())
    result, retryable = agent.updater.attempt(desired_for(artifact_for(bundles["1.1.0"], "artifacts/digits-1.1.0.ewb")))
    assert (result.result, result.version, result.generation, retryable) == ("ok", "1.1.0", 1, False)
    assert agent.model_version == "1.1.0"
    assert agent.slots.record().version == "1.1.0"
    assert agent.predict(digits_data.x_test[:3])["label"].shape == (3,)
    assert not list((agent.state_dir / "downloads").glob("*"))  # the download does not linger


def test_a_corrupted_bundle_is_refused_with_the_reason_and_the_old_model_keeps_serving(agent, server, bundles, digits_data):
    bad = _flip_a_byte(bundles["1.1.0"].read_bytes())
    url = server.add("/bad.ewb", bad)
    art = ArtifactRef(url=url, sha256=hashlib.sha256(bad).hexdigest(), size=len(bad))  # the registry hashed the bad bytes
    result, retryable = agent.updater.attempt(desired_for(art))
    assert result.result == "failed" and not retryable
    assert result.reason.startswith("verification failed:")
    assert agent.model_version == "1.0.0"
    assert agent.slots.record().version == "1.0.0"
    assert agent.predict(digits_data.x_test[:1])["label"].shape == (1,)


def test_a_bundle_signed_by_an_unknown_key_is_refused_naming_the_key(agent, server, keys_dir, digits_models, tmp_path):
    other = load_signer(keys_dir / "other.key")
    path = tmp_path / "rogue.ewb"
    build_bundle(digits_models["mlp"], name="digits", version="1.1.0", signer=other, out=path, labels=LABELS, preprocessing=PREPROCESSING)
    url = server.add("/rogue.ewb", path.read_bytes())
    result, _ = agent.updater.attempt(desired_for(artifact_for(path, url)))
    assert result.result == "failed"
    assert other.key_id in result.reason and "not trusted" in result.reason
    assert agent.model_version == "1.0.0"
    assert agent.install(path).result == "failed"  # the offline path refuses it too


def test_a_bundle_that_is_not_the_desired_version_is_refused(agent, server, bundles):
    url = server.add("/b.ewb", bundles["1.1.0"].read_bytes())
    result, _ = agent.updater.attempt(desired_for(artifact_for(bundles["1.1.0"], url), version="2.0.0"))
    assert result.result == "failed"
    assert "holds digits 1.1.0 but the desired state asks for digits 2.0.0" in result.reason
    assert agent.model_version == "1.0.0"


def test_an_unreachable_server_is_a_retryable_failure(agent, bundles):
    from conftest import free_port

    art = artifact_for(bundles["1.1.0"], f"http://127.0.0.1:{free_port()}/b.ewb")
    result, retryable = agent.updater.attempt(desired_for(art))
    assert result.result == "failed" and retryable
    assert result.reason.startswith("download failed: cannot download")
    assert agent.model_version == "1.0.0"


def test_a_model_that_fails_its_smoke_test_is_rolled_back(agent, keys_dir, tmp_path):
    """A correctly signed bundle whose model gives -inf on zeros loads, but its trial fails."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [x], [y])  # log(0) = -inf
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "log.ewb"
    build_bundle(model.SerializeToString(), name="digits", version="9.0.0", signer=load_signer(keys_dir / "signing.key"), out=path)
    result = agent.install(path)
    assert result.result == "rolled_back"
    assert "not finite" in result.reason
    assert agent.model_version == "1.0.0" and agent.slots.record().version == "1.0.0"
    assert agent.predict(np.zeros((1, 64), np.float32))["label"].shape == (1,)
