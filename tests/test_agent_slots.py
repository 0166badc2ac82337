"""A/B slots: staging never touches the live slot, the commit record survives restarts, half-written slots never run."""

from __future__ import annotations

import json

from edgewise.agent import Slots
from edgewise.bundle import read_manifest, sha256_file
from edgewise.protocol import decode
from test_agent_support import make_agent


def test_stage_goes_to_the_inactive_slot_and_commit_flips_with_the_old_one_as_previous(tmp_path, bundles):
    slots = Slots(tmp_path / "slots")
    assert slots.committed() is None and slots.inactive() == "a"
    staged = slots.stage(bundles["1.0.0"])
    assert staged == tmp_path / "slots" / "a"
    assert slots.bundle(staged).read_bytes() == bundles["1.0.0"].read_bytes()
    assert slots.committed() is None  # staged is not committed
    slots.commit("a", read_manifest(slots.bundle("a"))[0])
    assert slots.committed() == staged and slots.inactive() == "b"
    staged_b = slots.stage(bundles["1.1.0"])
    assert staged_b.name == "b"
    assert slots.committed() == staged  # staging B left A committed
    rec = slots.commit(staged_b, read_manifest(slots.bundle(staged_b))[0])
    assert (rec.slot, rec.version, rec.sha256) == ("b", "1.1.0", sha256_file(bundles["1.1.0"]))
    assert slots.previous().slot == "a" and slots.previous().version == "1.0.0"


def test_state_json_is_replaced_whole_with_no_temp_files_left(tmp_path, bundles):
    slots = Slots(tmp_path / "slots")
    slots.commit(slots.stage(bundles["1.0.0"]), read_manifest(bundles["1.0.0"])[0])
    state = json.loads((tmp_path / "slots" / "state.json").read_text())
    assert state["committed"]["version"] == "1.0.0" and state["previous"] is None
    leftovers = [p.name for p in (tmp_path / "slots").rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert leftovers == []


def test_staging_over_the_rollback_target_forgets_it(tmp_path, bundles):
    slots = Slots(tmp_path / "slots")
    slots.commit(slots.stage(bundles["1.0.0"]), read_manifest(bundles["1.0.0"])[0])
    slots.commit(slots.stage(bundles["1.1.0"]), read_manifest(bundles["1.1.0"])[0])
    assert slots.previous().slot == "a"
    slots.stage(bundles["1.0.0"])  # overwrites slot a: it is no longer a known-good rollback target
    assert slots.previous() is None
    assert slots.record().slot == "b"


def test_agent_comes_back_on_the_committed_version_after_a_restart(tmp_path, keys_dir, bundles, digits_data):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="slot-1")
    assert agent.install(bundles["1.0.0"]).result == "ok"
    assert agent.install(bundles["1.1.0"]).result == "ok"
    agent.stop()
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.model_version == "1.1.0"
        assert again.predict(digits_data.x_test[:2])["label"].shape == (2,)
    finally:
        again.stop()


def test_a_staged_but_uncommitted_slot_is_never_loaded(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="slot-2")
    assert agent.install(bundles["1.0.0"]).result == "ok"
    agent.slots.stage(bundles["1.1.0"])  # power cut after staging, before commit
    agent.stop()
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.model_version == "1.0.0"
    finally:
        again.stop()


def test_a_damaged_committed_slot_falls_back_to_the_previous_one_and_says_so(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="slot-3")
    agent.install(bundles["1.0.0"])
    agent.install(bundles["1.1.0"])
    agent.stop()
    committed = state / "slots" / "b" / "bundle.ewb"
    data = bytearray(committed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    committed.write_bytes(bytes(data))
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.model_version == "1.0.0"
        assert again.slots.record().slot == "a"
        kinds = {decode(r.payload).kind: decode(r.payload) for r in again.outbox.peek(50) if r.kind == "event"}
        assert "slot_fallback" in kinds and kinds["slot_fallback"].severity == "error"
        assert "rolled back to slot a" in kinds["slot_fallback"].message
    finally:
        again.stop()


def test_a_device_with_no_loadable_slot_starts_without_a_model(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="slot-4")
    agent.install(bundles["1.0.0"])
    agent.stop()
    (state / "slots" / "a" / "bundle.ewb").write_bytes(b"garbage")
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.model_version is None
        assert again.health()["status"] == "degraded"
    finally:
        again.stop()
