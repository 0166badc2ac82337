"""The durable outbox (issue 4): enqueue and drain rates, catch-up time after a link outage, bytes per event.

- enqueue: ``Outbox.enqueue`` one record per transaction, and ``enqueue_many`` in batches, with the
  default durability (WAL, ``synchronous=NORMAL``, fsync at most every second / for alerts) and, for
  comparison, ``synchronous=FULL`` (fsync every commit).
- drain: 100,000 buffered telemetry records, a real Mosquitto on loopback, a real paho client; the
  agent's own ``drain_once`` publishes ``Batch`` messages (msgpack, zstd) with QoS 1 and deletes each
  batch only after its PUBACK. "Catch-up" is the time from the ``connect()`` call (link restored) to an
  empty outbox. A subscriber receives everything and every record is decoded and counted afterwards.
- bytes on the wire per telemetry event: the Batch encoding vs one JSON message per event.
- bytes on the wire per inference event by bandwidth mode: 10,000 predictions over 10 telemetry
  intervals, each interval flushed as its own Batch (as a connected agent does), against the naive
  baseline of one JSON message per prediction. The issue's target: ``summary`` <= 1/20 of the baseline.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from _common import tempdir

TARGET_PER_S = 20_000
BUFFERED = 100_000
DEVICE = "bench-dev-0001"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(n: int, start: int = 0):
    from edgewise.protocol import Telemetry

    rnd = random.Random(start)
    t0 = 1_790_000_000.0
    return [
        Telemetry(
            device_id=DEVICE, seq=0, ts=t0 + 10 * i, mono=1000.0 + 10 * i, model="digits", version="1.1.0",
            uptime_s=10.0 * i, inferences=500 * i + rnd.randrange(500), errors=i // 1000, window_s=10.0,
            window_inferences=480 + rnd.randrange(40), latency_p50_ms=round(rnd.uniform(0.8, 1.2), 3),
            latency_p95_ms=round(rnd.uniform(1.5, 3.0), 3), cpu_percent=round(rnd.uniform(5, 40), 1),
            rss_bytes=90_000_000 + rnd.randrange(4_000_000), mem_percent=round(rnd.uniform(10, 12), 2),
            outbox_pending=rnd.randrange(100), dropped=0,
        )
        for i in range(start, start + n)
    ]


def _enqueue_rates(root: Path) -> dict:
    from edgewise.agent.outbox import Outbox

    out = {}
    recs = _samples(20_000)
    with Outbox(root / "single.db", max_bytes=256 * 2**20) as ob:
        t = time.perf_counter()
        for r in recs[:10_000]:
            ob.enqueue(r)
        out["enqueue_single_per_s"] = round(10_000 / (time.perf_counter() - t))
    import os

    from edgewise.security.encryption import RowSealer

    # what the agent runs by default: every row sealed with AES-256-GCM, bound to (device id, seq)
    with Outbox(root / "sealed.db", max_bytes=256 * 2**20, sealer=RowSealer(os.urandom(32), DEVICE)) as ob:
        t = time.perf_counter()
        for r in recs[:10_000]:
            ob.enqueue(r)
        out["enqueue_single_sealed_per_s"] = round(10_000 / (time.perf_counter() - t))
    for batch in (100, 1000):
        with Outbox(root / f"batch{batch}.db", max_bytes=256 * 2**20) as ob:
            t = time.perf_counter()
            for i in range(0, len(recs), batch):
                ob.enqueue_many(recs[i : i + batch])
            out[f"enqueue_batch{batch}_per_s"] = round(len(recs) / (time.perf_counter() - t))
    with Outbox(root / "full.db", max_bytes=256 * 2**20, synchronous="FULL") as ob:
        t = time.perf_counter()
        for r in recs[:1000]:
            ob.enqueue(r)
        out["enqueue_single_full_per_s"] = round(1000 / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(0, 20_000, 100):
            ob.enqueue_many(recs[i : i + 100])
        out["enqueue_batch100_full_per_s"] = round(20_000 / (time.perf_counter() - t))
    return out


def _drain(root: Path) -> dict:
    import paho.mqtt.client as mqtt

    from edgewise.agent.outbox import Outbox, drain_once
    from edgewise.protocol import decode

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = root / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\n")
    broker = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    received: list[bytes] = []
    got_all = threading.Event()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub")
        sub_ready = threading.Event()
        sub.on_subscribe = lambda *a, **k: sub_ready.set()
        sub.on_connect = lambda c, *a, **k: c.subscribe(f"edgewise/devices/{DEVICE}/#", qos=1)
        sub.on_message = lambda c, u, m: received.append(m.payload)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        sub_ready.wait(10)

        ob = Outbox(root / "drain.db", max_bytes=256 * 2**20)
        recs = _samples(BUFFERED)
        for i in range(0, BUFFERED, 1000):
            ob.enqueue_many(recs[i : i + 1000])
        assert ob.pending() == BUFFERED

        cli = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE)
        cli.max_inflight_messages_set(20)
        connected = threading.Event()
        cli.on_connect = lambda *a, **k: connected.set()
        wire = {"payload_bytes": 0, "messages": 0}

        def publish(topic: str, payload: bytes) -> bool:
            info = cli.publish(topic, payload, qos=1)
            info.wait_for_publish(10)
            ok = info.is_published()
            if ok:
                wire["payload_bytes"] += len(payload)
                wire["messages"] += 1
                wire["topic_len"] = len(topic)
            return ok

        t0 = time.perf_counter()  # the link comes back
        cli.connect("127.0.0.1", port)
        cli.loop_start()
        connected.wait(10)
        t1 = time.perf_counter()
        while ob.pending():
            drain_once(ob, DEVICE, publish)
        t2 = time.perf_counter()
        deadline = time.monotonic() + 30
        while len(received) < wire["messages"] and time.monotonic() < deadline:
            time.sleep(0.05)
        items = [i for p in received for i in decode(p).items]
        seqs = {i.seq for i in items}
        cli.loop_stop()
        cli.disconnect()
        sub.loop_stop()
        sub.disconnect()
        ob.close()
        return {
            "buffered": BUFFERED,
            "drain_per_s": round(BUFFERED / (t2 - t1)),
            "catch_up_s": round(t2 - t0, 2),
            "connect_s": round(t1 - t0, 3),
            "batches": wire["messages"],
            "records_per_batch": round(BUFFERED / wire["messages"]),
            "received_records": len(items),
            "received_unique_seq": len(seqs),
            "batch_payload_bytes_per_event": round(wire["payload_bytes"] / BUFFERED, 1),
            # MQTT PUBLISH framing: fixed header (<= 5 B) + topic (2 + len) + packet id (2), and a 4-byte PUBACK
            "batch_wire_bytes_per_event": round((wire["payload_bytes"] + wire["messages"] * (5 + 2 + wire["topic_len"] + 2 + 4)) / BUFFERED, 1),
        }
    finally:
        broker.terminate()
        broker.wait(5)


def _json_baseline() -> dict:
    from edgewise.protocol import encode, topics

    recs = _samples(1000)
    topic = topics.telemetry(DEVICE)
    js = [json.dumps(r.model_dump(mode="json"), separators=(",", ":")).encode() for r in recs]
    mp = [encode(r) for r in recs]
    frame = 5 + 2 + len(topic) + 2 + 4  # PUBLISH framing + PUBACK, QoS 1, one message per event
    return {
        "json_payload_bytes_per_event": round(sum(map(len, js)) / len(js), 1),
        "json_wire_bytes_per_event": round(sum(map(len, js)) / len(js) + frame, 1),
        "msgpack_single_wire_bytes_per_event": round(sum(map(len, mp)) / len(mp) + frame, 1),
    }


MODE_PREDICTIONS = 10_000
MODE_INTERVALS = 10


def _bandwidth_modes() -> dict:
    """Bytes per inference event in each bandwidth mode (payload + MQTT framing + PUBACK)."""
    import msgpack
    import numpy as np

    from edgewise.agent.monitor import Monitor
    from edgewise.agent.outbox import batch_payload
    from edgewise.protocol import Summary, Telemetry, topics

    topic = topics.telemetry(DEVICE)
    frame = 5 + 2 + len(topic) + 2 + 4
    rng = np.random.default_rng(0)
    per = MODE_PREDICTIONS // MODE_INTERVALS
    t0 = 1_790_000_000.0
    wire = {"full": 0, "summary": 0, "alerts-only": 0}
    baseline = 0
    mon_full, mon_sum = Monitor(), Monitor()
    seq = 0
    for k in range(MODE_INTERVALS):
        for i in range(per):
            lat = int(rng.uniform(0.8e6, 3e6))
            probs = rng.dirichlet(np.full(10, 0.3))[None, :].astype(np.float32)
            mon_full.record(lat)
            mon_sum.record(lat)
            mon_sum.record_predictions(probs.argmax(axis=1), probs.max(axis=1))
            ev = {"device_id": DEVICE, "seq": seq, "ts": t0 + k * 10 + i * 0.01, "model": "digits", "version": "1.1.0",
                  "label": int(probs.argmax()), "confidence": round(float(probs.max()), 4), "latency_ms": round(lat / 1e6, 3)}
            baseline += len(json.dumps(ev, separators=(",", ":"))) + frame
            seq += 1
        ts = t0 + (k + 1) * 10
        tel = Telemetry(device_id=DEVICE, seq=seq + k, ts=ts, model="digits", version="1.1.0", **mon_full.sample())
        summ = Summary(device_id=DEVICE, seq=seq + k, ts=ts, model="digits", version="1.1.0", **mon_sum.summary_sample())
        for mode, rec in (("full", tel), ("summary", summ)):
            item = msgpack.packb(rec.model_dump(mode="json"), use_bin_type=True)
            wire[mode] += len(batch_payload(DEVICE, [item])) + frame
        # alerts-only: no periodic record at all (only warning+ events, none in this run)
    out = {f"mode_{m.replace('-', '_')}_bytes_per_event": round(b / MODE_PREDICTIONS, 3) for m, b in wire.items()}
    out["mode_baseline_json_bytes_per_event"] = round(baseline / MODE_PREDICTIONS, 1)
    out["mode_summary_fraction_of_baseline"] = round(wire["summary"] / baseline, 5)
    out["mode_summary_target_met"] = wire["summary"] * 20 <= baseline
    return out


def run() -> dict:
    root = tempdir("ew-bench-outbox-")
    try:
        res = {**_enqueue_rates(root), **_drain(root), **_json_baseline(), **_bandwidth_modes()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["wire_ratio_vs_json"] = round(res["json_wire_bytes_per_event"] / res["batch_wire_bytes_per_event"], 1)
    res["limit"] = f"enqueue (one record per transaction, sealed, and batched) and drain >= {TARGET_PER_S}/s"
    res["pass"] = (
        min(res["enqueue_single_sealed_per_s"], res["enqueue_batch100_per_s"]) >= TARGET_PER_S
        and res["drain_per_s"] >= TARGET_PER_S
        and res["received_unique_seq"] == BUFFERED
    )
    return res


def markdown(r: dict) -> str:
    ok = lambda b: "yes" if b else "**NO**"  # noqa: E731
    return f"""
| what | figure |
|---|---:|
| `enqueue` one record per transaction (WAL, NORMAL) | {r['enqueue_single_per_s']:,}/s |
| `enqueue` one record per transaction, row sealed (AES-256-GCM; the agent's default) | {r['enqueue_single_sealed_per_s']:,}/s |
| `enqueue_many`, 100 per transaction | {r['enqueue_batch100_per_s']:,}/s |
| `enqueue_many`, 1,000 per transaction | {r['enqueue_batch1000_per_s']:,}/s |
| `enqueue`, `synchronous=FULL` (fsync every commit) | {r['enqueue_single_full_per_s']:,}/s |
| `enqueue_many` 100, `synchronous=FULL` | {r['enqueue_batch100_full_per_s']:,}/s |
| drain to Mosquitto (Batch, zstd, QoS 1, delete on PUBACK) | {r['drain_per_s']:,}/s ({r['batches']} batches of ~{r['records_per_batch']}) |
| link restored → outbox empty, {r['buffered']:,} buffered | {r['catch_up_s']} s (connect {r['connect_s']} s) |
| received by a subscriber / unique seq | {r['received_records']:,} / {r['received_unique_seq']:,} |

Target ≥ {TARGET_PER_S:,}/s enqueued (one durable record per transaction, sealed as the agent stores it, and
batched) and drained — met: {ok(r['pass'])}.

Bytes on the wire per telemetry event (payload + MQTT PUBLISH framing + PUBACK):

| encoding | bytes/event |
|---|---:|
| Batch of ~{r['records_per_batch']} (msgpack + zstd), as the agent sends | {r['batch_wire_bytes_per_event']} (payload {r['batch_payload_bytes_per_event']}) |
| one msgpack message per event | {r['msgpack_single_wire_bytes_per_event']} |
| naive baseline: one JSON message per event | {r['json_wire_bytes_per_event']} (payload {r['json_payload_bytes_per_event']}) |

The batch encoding is {r['wire_ratio_vs_json']}× smaller than one JSON message per event.

Bytes on the wire per inference event by bandwidth mode ({MODE_PREDICTIONS:,} predictions over {MODE_INTERVALS}
telemetry intervals, one Batch per interval, framing included):

| mode | bytes/event |
|---|---:|
| `full` (one Telemetry sample per interval) | {r['mode_full_bytes_per_event']} |
| `summary` (one Summary per interval: percentiles, class and confidence histograms) | {r['mode_summary_bytes_per_event']} |
| `alerts-only` (no periodic telemetry) | {r['mode_alerts_only_bytes_per_event']} |
| naive baseline: one JSON message per prediction | {r['mode_baseline_json_bytes_per_event']} |

`summary` is {r['mode_summary_fraction_of_baseline']} of the baseline (target ≤ 1/20: {ok(r['mode_summary_target_met'])}).
"""


if __name__ == "__main__":
    res = run()
    print(json.dumps(res, indent=2))
    print(markdown(res))
