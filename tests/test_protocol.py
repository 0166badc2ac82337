"""The wire contract: topics, schemas and codec behave the same for both sides."""

import msgpack
import pytest
import zstandard

from edgewise import protocol as p
from edgewise.protocol import topics


def test_topics_put_every_device_channel_under_its_own_id():
    assert topics.desired("dev-1") == "edgewise/devices/dev-1/desired"
    assert topics.state("dev-1") == "edgewise/devices/dev-1/state"
    assert topics.telemetry("dev-1").startswith("edgewise/devices/dev-1/telemetry/")
    assert topics.events("dev-1").startswith("edgewise/devices/dev-1/events/")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev+1", "x" * 65, "-lead"])
def test_device_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(p.ProtocolError, match="invalid device id"):
        topics.desired(bad)


def test_parse_returns_device_and_channel():
    t = topics.parse("edgewise/devices/d7/telemetry/batch")
    assert (t.device_id, t.channel, t.rest) == ("d7", "telemetry", "batch")


def test_parse_refuses_topics_outside_the_namespace():
    with pytest.raises(p.ProtocolError, match="not under"):
        topics.parse("other/devices/d7/state")
    with pytest.raises(p.ProtocolError, match="unknown channel"):
        topics.parse("edgewise/devices/d7/secret")


def test_every_message_type_round_trips():
    msgs = [
        p.DesiredState(device_id="d", generation=3, model="m", version="1.0.0",
                       artifact=p.ArtifactRef(url="/x", sha256="0" * 64, size=10)),
        p.DeviceState(device_id="d", status="online", model="m", version="1.0.0", tags=["lab"]),
        p.Telemetry(device_id="d", seq=1, ts=1.5, inferences=10, latency_p95_ms=0.3),
        p.Event(device_id="d", seq=2, ts=2.0, kind="update", severity="error", detail={"why": "x"}),
        p.Batch(device_id="d", items=[p.Telemetry(device_id="d", seq=1, ts=1.0), p.Event(device_id="d", seq=2, ts=1, kind="k")]),
    ]
    for m in msgs:
        assert p.decode(p.encode(m)) == m


def test_large_batches_are_zstd_compressed_and_still_decode():
    batch = p.Batch(device_id="d", items=[p.Telemetry(device_id="d", seq=i, ts=float(i)) for i in range(200)])
    payload = p.encode(batch)
    assert payload[:4] == b"\x28\xb5\x2f\xfd"
    assert len(payload) < len(p.encode(batch, compress=False)) / 3
    assert p.decode(payload) == batch


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty"),
        (b"\xc1\xc1\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"type": "telemetry", "device_id": "d"}), "seq"),
        (msgpack.packb({"type": "nope", "device_id": "d"}), "invalid"),
        (msgpack.packb({"v": 99, "type": "state", "device_id": "d"}), "newer"),
        (b"\x28\xb5\x2f\xfd" + b"garbage", "zstd"),
    ],
)
def test_malformed_payloads_raise_protocol_error_naming_the_problem(payload, reason):
    with pytest.raises(p.ProtocolError, match=reason):
        p.decode(payload)


def test_decompression_bombs_are_refused():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (p.codec.MAX_PAYLOAD + 10))
    with pytest.raises(p.ProtocolError):
        p.decode(bomb)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    raw = msgpack.packb({"type": "telemetry", "device_id": "d", "seq": 1, "ts": 0.0, "new_field": 5})
    assert p.decode(raw).seq == 1


def test_a_device_cannot_speak_for_another_device():
    payload = p.encode(p.DeviceState(device_id="mallory"))
    with pytest.raises(p.ProtocolError, match="claims device"):
        p.decode_for_topic(topics.state("alice"), payload)


def test_a_batch_cannot_smuggle_records_of_another_device():
    payload = p.encode(p.Batch(device_id="alice", items=[p.Telemetry(device_id="bob", seq=1, ts=0)]))
    with pytest.raises(p.ProtocolError, match="another device"):
        p.decode_for_topic(topics.telemetry("alice"), payload)


def test_message_types_are_bound_to_their_channel():
    payload = p.encode(p.DesiredState(device_id="d", generation=1))
    with pytest.raises(p.ProtocolError, match="does not belong"):
        p.decode_for_topic(topics.state("d"), payload)
