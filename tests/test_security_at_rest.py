"""The agent keeps its models and its unsent data encrypted on disk (a stolen SD card gives neither away)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import msgpack
import pytest

from edgewise.agent.outbox import Outbox, drain_once
from edgewise.protocol import Event
from edgewise.security.encryption import EncryptionError, RowSealer, is_sealed
from edgewise.security.keystore import FileKeystore
from test_agent_support import make_agent


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _holding(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in _files(root) if needle in p.read_bytes()]


def _event(agent, kind: str) -> Event | None:
    for r in agent.outbox.peek(200):
        obj = msgpack.unpackb(r.payload, raw=False) if r.payload else {}
        if obj.get("type") == "event" and obj.get("kind") == kind:
            return Event.model_validate(obj)
    return None


def test_after_an_install_no_file_under_the_state_dir_holds_the_model_or_a_telemetry_payload(tmp_path, keys_dir, bundles, digits_models, digits_data):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="rest-1")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        assert agent.predict(digits_data.x_test[:3])["label"].shape == (3,)  # served from the decrypted-in-memory bundle
        agent.telemetry_tick()
        payloads = [r.payload for r in agent.outbox.peek(100)]  # opened (plaintext) by the outbox
    finally:
        agent.stop()
    onnx = digits_models["logreg"]
    slices = [onnx[i : i + 48] for i in (len(onnx) // 3, len(onnx) // 2, len(onnx) - 64)]
    assert all(onnx.count(s) == 1 for s in slices)  # distinctive slices of the model
    for s in slices:
        assert _holding(state, s) == [], "plaintext model bytes on disk"
    assert is_sealed(state / "slots" / "a" / "bundle.ewb")
    assert len(payloads) >= 2 and any(msgpack.unpackb(p)["type"] == "telemetry" for p in payloads)
    for p in payloads:
        assert _holding(state, p[len(p) // 4 : len(p) // 4 + 24]) == [], "a plaintext outbox payload on disk"
    assert _holding(state, b"now running digits 1.0.0") == []  # the update event's message


def test_a_device_whose_storage_key_is_replaced_reports_why_serves_nothing_and_does_not_crash_loop(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="rest-2")
    agent.install(bundles["1.0.0"])
    agent.install(bundles["1.1.0"])
    agent.stop()
    (state / "keys" / "storage.key").unlink()
    FileKeystore(state / "keys").create_key("storage", "aes-256")  # e.g. a re-provisioned or swapped keystore
    for _ in range(2):  # two starts in a row: each comes up, degraded, with the reason
        again = make_agent(state, keys_dir)
        try:
            again.start()
            assert again.model_version is None and again.health()["status"] == "degraded"
            failed = _event(again, "load_failed")
            assert failed is not None and failed.severity == "error"
            assert "wrong key: the storage key 'storage'" in failed.message
            assert "previous slot a does not load either" in failed.message
        finally:
            again.stop()
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.install(bundles["1.1.0"]).result == "ok"  # a fresh install is sealed with the new key
        assert again.model_version == "1.1.0"
    finally:
        again.stop()


def test_a_replaced_storage_key_makes_the_agent_replace_its_outbox_key_and_say_so(tmp_path, keys_dir):
    state = tmp_path / "dev"
    make_agent(state, keys_dir, device_id="rest-3").stop()
    (state / "keys" / "storage.key").unlink()
    FileKeystore(state / "keys").create_key("storage", "aes-256")
    again = make_agent(state, keys_dir)
    try:
        ev = _event(again, "outbox_key_replaced")
        assert ev is not None and ev.severity == "critical" and "outbox.key.unreadable-" in ev.message
    finally:
        again.stop()


def test_a_slot_copied_into_the_other_slot_is_refused_as_moved(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="rest-4")
    try:
        agent.install(bundles["1.0.0"])
        agent.install(bundles["1.1.0"])
        shutil.copy(state / "slots" / "b" / "bundle.ewb", state / "slots" / "a" / "bundle.ewb")
        with pytest.raises(EncryptionError, match="slot=b.*not .*slot=a.*moved from another device, slot or purpose"):
            agent.slots.bundle("a").read_plaintext()
    finally:
        agent.stop()


def test_a_plaintext_slot_from_before_encryption_still_loads_and_is_sealed_in_place(tmp_path, keys_dir, bundles, digits_models):
    state = tmp_path / "dev"
    old = make_agent(state, keys_dir, device_id="rest-5", encrypt_at_rest=False)
    old.install(bundles["1.0.0"])
    old.stop()
    slot = state / "slots" / "a" / "bundle.ewb"
    assert slot.read_bytes()[:2] == b"PK"  # the pre-encryption format: a plain ZIP
    upgraded = make_agent(state, keys_dir, encrypt_at_rest=True)
    try:
        upgraded.start()
        assert upgraded.model_version == "1.0.0"
        assert is_sealed(slot)
        onnx = digits_models["logreg"]
        assert _holding(state, onnx[len(onnx) // 2 : len(onnx) // 2 + 48]) == []
    finally:
        upgraded.stop()


def test_turning_encryption_off_keeps_sealed_slots_readable_and_stages_new_ones_in_plaintext(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="rest-6")
    agent.install(bundles["1.0.0"])
    agent.stop()
    assert is_sealed(state / "slots" / "a" / "bundle.ewb")
    off = make_agent(state, keys_dir, encrypt_at_rest=False)
    try:
        off.start()
        assert off.model_version == "1.0.0"
        assert off.install(bundles["1.1.0"]).result == "ok"
        assert (state / "slots" / "b" / "bundle.ewb").read_bytes()[:2] == b"PK"
    finally:
        off.stop()


def _record(i: int, device: str = "ob-1") -> Event:
    return Event(device_id=device, seq=0, ts=1.0, mono=1.0, kind="reading", severity="info", message=f"secret reading {i}")


def test_plaintext_outbox_rows_from_before_encryption_are_still_delivered(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path) as plain:
        plain.enqueue(_record(1))
    sealer = RowSealer(b"k" * 32, "ob-1")
    sent: list[bytes] = []
    with Outbox(path, sealer=sealer) as box:
        box.enqueue(_record(2))
        raw = [bytes(r[0]) for r in sqlite3.connect(path).execute("SELECT payload FROM records ORDER BY seq")]
        assert raw[0][:1] != b"\xc1" and raw[1][:1] == b"\xc1"  # both formats side by side
        assert drain_once(box, "ob-1", lambda topic, payload: sent.append(payload) or True) == 2
    from edgewise.protocol import decode

    batch = decode(sent[0])
    assert [i.message for i in batch.items] == ["secret reading 1", "secret reading 2"]


def test_outbox_rows_swapped_between_sequence_numbers_are_dropped_as_unreadable_with_an_error(tmp_path, caplog):
    path = tmp_path / "outbox.db"
    sealer = RowSealer(b"k" * 32, "ob-2")
    with Outbox(path, sealer=sealer) as box:
        box.enqueue_many([_record(i, "ob-2") for i in range(3)])
    db = sqlite3.connect(path)
    (p0,), (p1,) = db.execute("SELECT payload FROM records WHERE seq IN (0, 1) ORDER BY seq").fetchall()
    db.execute("UPDATE records SET payload = ? WHERE seq = 0", (p1,))
    db.execute("UPDATE records SET payload = ? WHERE seq = 1", (p0,))
    db.commit()
    db.close()
    sent: list[bytes] = []
    with caplog.at_level(logging.ERROR, logger="edgewise.agent.outbox"), Outbox(path, sealer=sealer) as box:
        drain_once(box, "ob-2", lambda topic, payload: sent.append(payload) or True)
        assert box.pending() == 0
    assert "outbox row seq 0 of device 'ob-2' failed authentication" in caplog.text
    from edgewise.protocol import decode

    assert [i.seq for b in sent for i in decode(b).items] == [2]  # only the untouched row went out


def test_an_agent_with_its_keys_in_a_pkcs11_token_installs_serves_and_restarts(tmp_path, keys_dir, bundles, softhsm, digits_models, digits_data):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="rest-hsm", keystore_url=softhsm["url"])
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        assert agent.keystore.protection("storage")["extractable"] is False
    finally:
        agent.stop()
    assert not (state / "keys" / "storage.key").exists()  # the storage key lives in the token only
    onnx = digits_models["logreg"]
    assert _holding(state, onnx[len(onnx) // 2 : len(onnx) // 2 + 48]) == []
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.model_version == "1.0.0"
        assert again.predict(digits_data.x_test[:2])["label"].shape == (2,)
    finally:
        again.stop()


def test_slots_opened_by_a_tool_on_the_state_dir_read_sealed_slots_with_the_agents_keystore(tmp_path, keys_dir, bundles):
    from edgewise.agent.slots import Slots
    from edgewise.bundle import sha256_file

    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="rest-7")
    agent.install(bundles["1.0.0"])
    agent.stop()
    slots = Slots(state / "slots")  # no sealer given: found from config.toml (device id, keystore_url)
    rec = slots.record()
    assert is_sealed(state / "slots" / rec.slot / "bundle.ewb")
    assert sha256_file(slots.bundle(rec.slot)) == rec.sha256 == sha256_file(bundles["1.0.0"])


def test_a_large_model_in_a_sealed_slot_verifies_and_loads_to_the_same_outputs_as_the_plain_file(tmp_path):
    """Above 4 MiB the plaintext goes into an anonymous huge-page map and the model into a fresh bytes object."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgewise.agent.runtime import LoadedModel
    from edgewise.agent.slots import SlotSealer, Slots
    from edgewise.bundle import build_bundle
    from edgewise.bundle.verify import verify_bundle
    from edgewise.security import TrustedKeys, generate_keypair, load_signer

    n = 1100  # 1100 x 1100 float32: 4.8 MB
    w = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], initializer=[numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = proto.SerializeToString()
    generate_keypair(tmp_path / "s.key", tmp_path / "s.pub", overwrite=True)
    build_bundle(model, name="big", version="1.0.0", signer=load_signer(tmp_path / "s.key"), out=tmp_path / "big.ewb")
    ks = FileKeystore(tmp_path / "keys")
    ks.create_key("storage", "aes-256")
    slots = Slots(tmp_path / "slots", sealer=SlotSealer(ks, "dev-big"))
    slots.stage(tmp_path / "big.ewb")
    assert is_sealed(tmp_path / "slots" / "a" / "bundle.ewb")
    vb = verify_bundle(slots.bundle("a"), TrustedKeys.from_paths([tmp_path / "s.pub"]))
    assert vb.read_model() == model
    loaded = LoadedModel.from_bundle(vb, threads=1)
    x = np.ones((1, n), dtype=np.float32)
    expected = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(loaded._session.run(None, {"x": x})[0], expected)
