"""Shadow candidates go through the same TUF gate as updates: a real TUF repository over real HTTP."""

from __future__ import annotations

import shutil

import pytest

from edgewise.protocol import ArtifactRef, Event, decode
from edgewise.protocol.messages import ShadowTarget
from edgewise.security.tuf_repo import TufRepository, target_name
from test_agent_support import make_agent, wait_for
from test_security_tuf_attacks import HostileServer, _custom, _url


@pytest.fixture
def world(tmp_path, keys_dir, bundles):
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "root-keys", root_keys=1, threshold=1)
    repo.add_targets([(target_name("digits", v), bundles[v], _custom(v)) for v in ("1.0.0", "1.1.0")])
    server = HostileServer(repo)
    state = tmp_path / "dev"
    (state / "trust").mkdir(parents=True)
    shutil.copy(repo.metadata_dir / "1.root.json", state / "trust" / "root.json")
    agent = make_agent(state, keys_dir, device_id=f"shadow-tuf-{tmp_path.name[-10:]}", server_url=server.base_url, update_trust="tuf")
    assert agent.install(bundles["1.0.0"]).result == "ok"
    yield repo, server, agent
    agent.stop()
    server.close()


def _target(server, repo, version, target=None):
    # The desired state's sha256 and size are unsigned hints: TUF's signed values are what the download must match.
    url = server.base_url + _url(repo, target_name("digits", version))
    return ShadowTarget(model="digits", version=version, target=target or target_name("digits", version),
                        artifact=ArtifactRef(url=url, sha256="0" * 64, size=1))


def _refusals(agent):
    return [r for r in (decode(rec.payload) for rec in agent.outbox.peek(10000)) if isinstance(r, Event) and r.kind == "shadow.refused"]


def test_a_candidate_listed_by_tuf_is_loaded_with_the_signed_length_and_hash(world, digits_data):
    repo, server, agent = world
    agent.shadow.want(_target(server, repo, "1.1.0"))
    wait_for(lambda: agent.shadow.active or _refusals(agent), what="candidate loaded")
    assert agent.shadow.active, _refusals(agent)
    agent.predict(digits_data.x_test[:10])
    wait_for(lambda: agent.shadow._compared == 10, what="compared")
    assert agent.shadow.take_interval().version == "1.1.0"


def test_a_candidate_tampered_with_under_its_tuf_target_name_is_refused(world, bundles):
    repo, server, agent = world
    data = bytearray(bundles["1.1.0"].read_bytes())
    data[len(data) // 2] ^= 1
    server.override[_url(repo, target_name("digits", "1.1.0"))] = bytes(data)
    agent.shadow.want(_target(server, repo, "1.1.0"))
    wait_for(lambda: _refusals(agent), what="refusal")
    assert "sha256" in _refusals(agent)[0].message and not agent.shadow.active and agent.shadow.take_interval() is None


def test_a_tuf_target_that_is_another_version_than_the_candidate_is_refused(world):
    repo, server, agent = world
    agent.shadow.want(_target(server, repo, "1.1.0", target=target_name("digits", "1.0.0")))
    wait_for(lambda: _refusals(agent), what="refusal")
    ev = _refusals(agent)[0]
    assert "TUF refused the candidate (target-mismatch)" in ev.message and ev.detail["retrying"] is False
    assert agent.shadow.take_interval() is None
