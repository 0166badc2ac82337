"""Site gateway (issue 9): what storing every message before its PUBACK costs, and how fast a backlog drains.

Protocol: one MQTT client (paho, QoS 1, 100 in flight) publishes N telemetry-sized messages (300 bytes) on a
device's telemetry topic and waits for every PUBACK.

- **baseline**: the plain embedded broker (amqtt) of the same run, no hook: what the broker itself costs;
- **gateway NORMAL / FULL**: the site broker of a gateway whose uplink is down, so every message is committed to
  ``gateway.db`` before its PUBACK (``synchronous`` NORMAL: WAL commit; FULL: fsync per message);
- **drain**: then an upstream broker appears (embedded amqtt on loopback) and the time until the gateway's queue
  is empty (every message PUBACKed upstream and deleted) gives the forwarding rate.

Figures are messages per second on this machine; compare rows of one run (the machine is shared and noisy).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

N = 5_000
PAYLOAD = b"x" * 300
TOPIC = "edgewise/devices/bench-gw-dev/telemetry/batch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _publish_all(port: int, n: int = N) -> float:
    """Seconds for ``n`` QoS 1 publishes to be acknowledged by the broker on ``port``."""
    import paho.mqtt.client as mqtt

    done = threading.Event()
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] >= n:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-gw-dev", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    for _ in range(n):
        c.publish(TOPIC, PAYLOAD, qos=1)
    if not done.wait(300):
        raise RuntimeError(f"only {acked[0]} of {n} publishes acknowledged")
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return elapsed


def run() -> dict[str, Any]:
    from edgewise.agent.gateway import Gateway, GatewayConfig
    from edgewise.broker import EmbeddedBroker

    out: dict[str, Any] = {"n": N, "payload_bytes": len(PAYLOAD)}
    with EmbeddedBroker(port=0) as plain:
        out["baseline_msgs_s"] = N / _publish_all(plain.port)
    for sync in ("NORMAL", "FULL"):
        upstream_port = _free_port()
        with tempfile.TemporaryDirectory() as d:
            cfg = GatewayConfig(state_dir=Path(d), upstream_server="http://127.0.0.1:9",
                                upstream_broker=f"mqtt://127.0.0.1:{upstream_port}", listen_host="127.0.0.1",
                                mqtt_port=0, http_port=0, require_auth=False, synchronous=sync,
                                reconnect_min_s=0.05, reconnect_max_s=0.1)
            gw = Gateway(cfg).start()
            try:
                out[f"gateway_{sync.lower()}_msgs_s"] = N / _publish_all(gw.mqtt_port or 0)
                assert gw.store is not None and gw.store.pending == N, gw.store.pending if gw.store else None
                if sync == "NORMAL":
                    with EmbeddedBroker(port=upstream_port):
                        t0 = time.perf_counter()
                        while gw.store.pending and time.perf_counter() - t0 < 300:
                            time.sleep(0.01)
                        out["drain_msgs_s"] = N / (time.perf_counter() - t0)
            finally:
                gw.stop()
    out["normal_vs_baseline"] = out["gateway_normal_msgs_s"] / out["baseline_msgs_s"]
    out["full_vs_baseline"] = out["gateway_full_msgs_s"] / out["baseline_msgs_s"]
    return out


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        "### Site gateway: store before PUBACK, drain after the uplink returns",
        "",
        f"{r['n']:,} QoS 1 messages of {r['payload_bytes']} bytes from one client (100 in flight).",
        "",
        "| | messages/s | vs. plain broker |",
        "|---|---|---|",
        f"| plain embedded broker (amqtt), no store | {r['baseline_msgs_s']:,.0f} | 1.00 |",
        f"| gateway, stored before PUBACK, synchronous=NORMAL | {r['gateway_normal_msgs_s']:,.0f} | {r['normal_vs_baseline']:.2f} |",
        f"| gateway, stored before PUBACK, synchronous=FULL | {r['gateway_full_msgs_s']:,.0f} | {r['full_vs_baseline']:.2f} |",
        f"| drain of the held backlog to an upstream broker | {r['drain_msgs_s']:,.0f} | |",
    ])


if __name__ == "__main__":
    print(markdown(run()))
