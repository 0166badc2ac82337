"""The control plane's MQTT session: subscribe to what devices say, publish what they should do.

A paho-mqtt client (callback API v2) whose network thread connects, reconnects with
backoff forever, and re-subscribes after every reconnect. Each reconnect also calls
``on_connected`` (the app republishes desired states there), because the broker may
have lost them.

On mqtts:// (Mosquitto or EMQX with mutual TLS) it speaks MQTT v5, so a refused publish
or subscription comes back with a reason code, which is logged; it falls back to 3.1.1
when a broker answers "unsupported protocol version". On plain mqtt:// it speaks 3.1.1
unless told otherwise (the embedded amqtt broker speaks only that). With Mosquitto and mTLS it
presents the control plane's client certificate (``tls_files``).
"""

from __future__ import annotations

import logging
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ..protocol import topics

log = logging.getLogger(__name__)

SUBSCRIBE_QOS = 1
MAX_QUEUED = 10_000  # messages held while disconnected; beyond it publish() reports False
SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT v5 persistent session: the broker keeps it (and queues) for a week
UNSUPPORTED_PROTOCOL = 132  # MQTT v5 CONNACK reason "Unsupported Protocol Version" (3.1.1 brokers say 1)
MAX_BATCH = 500  # messages stored per ingest transaction at most
STORE_RETRIES = 6  # a batch the database refuses is retried (1, 2, 4, ... s) before it is given up


def parse_broker_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """``mqtt://[user[:pass]@]host[:port]`` (mqtts:// for TLS) -> host, port, tls, user, password."""
    u = urlsplit(url)
    tls = u.scheme in ("mqtts", "ssl")
    if u.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not u.hostname:
        raise ValueError(f"broker URL {url!r}: use mqtt://host:port (or mqtts://host:port for TLS)")
    port = u.port or (8883 if tls else 1883)
    user = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password else None
    return u.hostname, port, tls, user, password


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and the health endpoint."""
    u = urlsplit(url)
    if not u.password:
        return url
    netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit(u._replace(netloc=netloc))


class MqttBus:
    """Connects to ``url``, feeds every message on ``subscriptions`` to ``on_message(topic, payload)``.

    ``on_message`` runs on the network thread, one message at a time; the QoS 1
    acknowledgement goes out after it returns, so a message is acked only once stored.

    With ``on_batch(messages) -> stored`` instead, the network thread only queues what arrives and
    an ingest worker thread hands it over in batches (whatever arrived meanwhile, up to
    ``MAX_BATCH``): one database transaction per batch rather than per message, and the network
    thread stays free for publishing desired states while a backlog is stored. Acknowledgements
    are manual: a message is acked only after its batch was stored (a batch the database refuses
    is retried with backoff first), so a control plane killed mid-batch loses nothing; the broker
    redelivers, and ingest de-duplicates on (device, seq). Messages received before a reconnect
    are not acked on the new connection (their packet ids belong to the old one): the broker
    redelivers them too.
    """

    def __init__(
        self,
        url: str,
        on_message: Callable[[str, bytes], None],
        *,
        on_connected: Callable[[], None] | None = None,
        subscriptions: Iterable[str] = topics.CONTROL_SUBSCRIPTIONS,
        client_id: str | None = None,
        persistent: bool = False,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        tls_files: tuple[str, str, str] | None = None,
        protocol: int | None = None,
        on_batch: Callable[[list[tuple[str, bytes]]], bool] | None = None,
    ) -> None:
        """``tls_files`` = (CA certificate, client certificate, client key) for mutual TLS (mqtts:// URLs).

        ``protocol`` (paho's ``MQTTv5``/``MQTTv311``): default v5 on mqtts://, 3.1.1 on mqtt:// (amqtt drops
        a v5 CONNECT with properties without answering, so probing it costs a timeout).
        """
        self.url = url
        self.display_url = redact_url(url)
        self.host, self.port, tls, user, password_from_url = parse_broker_url(url)
        self.client_id = client_id or f"edgewise-control-{secrets.token_hex(4)}"
        self.subscriptions = tuple(subscriptions)
        self.keepalive = keepalive
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._ready = threading.Event()  # connected and subscribed
        self._sub_mid: int | None = None
        self._started = False
        self.persistent = persistent
        self.protocol = protocol if protocol is not None else (mqtt.MQTTv5 if tls else mqtt.MQTTv311)
        self._user = username if username is not None else user
        self._password = password if password is not None else password_from_url
        self._tls = tls
        self._tls_files = tls_files
        self.denied = 0  # publishes the broker refused (MQTT v5 reason code >= 0x80)
        self._on_batch = on_batch
        self._queue: queue.Queue[tuple[str, bytes, int, int, int] | None] = queue.Queue()
        self._generation = 0  # connections so far: a message is acked only on the connection it came on
        self._worker: threading.Thread | None = None
        self.batches = 0
        self.lost = 0  # messages given up after the database refused them STORE_RETRIES times
        self._client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        v5 = self.protocol == mqtt.MQTTv5
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            manual_ack=self._on_batch is not None,
            # A persistent session (fixed client id) makes the broker queue QoS 1 messages that
            # devices publish while the control plane is down; they arrive on reconnect.
            **({} if v5 else {"clean_session": not self.persistent}),
        )
        if self._user is not None:
            c.username_pw_set(self._user, self._password)
        if self._tls:
            if self._tls_files is not None:
                ca, cert, key = self._tls_files
                c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
            else:
                c.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_queued_messages_set(MAX_QUEUED)
        c.enable_logger(logging.getLogger(__name__ + ".paho"))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        return c

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; never blocks or fails on a broker that is down."""
        if self._started:
            return
        self._started = True
        if self._on_batch is not None:
            self._worker = threading.Thread(target=self._ingest_loop, name="edgewise-ingest", daemon=True)
            self._worker.start()
        self._connect_async()
        self._client.loop_start()
        log.info("MQTT bus connecting to %s as %s", self.display_url, self.client_id)

    def _connect_async(self) -> None:
        if self.protocol == mqtt.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S if self.persistent else 0
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive,
                                       clean_start=not self.persistent, properties=props)
        else:
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive)

    def _fall_back_to_311(self) -> None:
        """The broker does not speak MQTT v5 (amqtt): start over with 3.1.1 (from a thread of our own)."""
        def restart() -> None:
            old = self._client
            old.disconnect()
            old.loop_stop()
            if not self._started:
                return
            self.protocol = mqtt.MQTTv311
            self._client = self._new_client()
            self._connect_async()
            self._client.loop_start()

        threading.Thread(target=restart, name="edgewise-bus-reconnect", daemon=True).start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed (and ``on_connected`` has run)."""
        return self._ready.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        # paho's network thread may run one more loop after disconnect() and log a spurious
        # "Client is not connected" error; nothing worth hearing is said from here on.
        self._client.disable_logger()
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=30)
            self._worker = None
        log.info("MQTT bus disconnected from %s", self.display_url)

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Publish, or queue until reconnected (QoS >= 1). False if it could not even be queued."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            log.debug("broker unreachable; %s queued until the bus reconnects", topic)
            return True
        log.warning("could not publish to %s: %s", topic, mqtt.error_string(info.rc))
        return False

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: object, _flags: object, reason: object, _props: object) -> None:
        if getattr(reason, "is_failure", False):
            if self.protocol == mqtt.MQTTv5 and getattr(reason, "value", None) == UNSUPPORTED_PROTOCOL:
                log.info("MQTT broker %s does not speak MQTT v5; using 3.1.1", self.display_url)
                self._fall_back_to_311()
                return
            log.error("MQTT broker %s refused the connection: %s (check credentials/ACL); retrying", self.display_url, reason)
            return
        self._generation += 1
        if not self.subscriptions:
            self._connected()
            return
        rc, mid = client.subscribe([(t, SUBSCRIBE_QOS) for t in self.subscriptions])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("MQTT subscribe failed: %s", mqtt.error_string(rc))
            return
        self._sub_mid = mid

    def _on_subscribe(self, _client: mqtt.Client, _userdata: object, mid: int, reasons: list, _props: object) -> None:
        if mid != self._sub_mid:
            return
        for topic, reason in zip(self.subscriptions, reasons):
            if getattr(reason, "is_failure", False):
                log.error("MQTT broker refused subscription to %s: %s; device messages there are not ingested", topic, reason)
        self._connected()

    def _connected(self) -> None:
        if self._on_connected_cb is not None:
            try:
                self._on_connected_cb()
            except Exception:
                log.exception("on_connected hook failed")
        self._ready.set()
        log.info("MQTT bus connected to %s", self.display_url)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: object, _flags: object, reason: object, _props: object) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        if self._started and was_ready:
            log.warning("MQTT bus lost the broker at %s (%s); reconnecting", self.display_url, reason)

    def _on_publish(self, _client: mqtt.Client, _userdata: object, mid: int, reason: object, _props: object) -> None:
        if getattr(reason, "is_failure", False):
            self.denied += 1
            log.error("MQTT broker %s refused a publish (mid %d): %s; check the broker's ACL for %s",
                      self.display_url, mid, reason, self._user or self.client_id)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._on_batch is not None:
            self._queue.put((msg.topic, msg.payload, msg.mid, msg.qos, self._generation))
            return
        try:
            self._on_message_cb(msg.topic, msg.payload)
        except Exception:  # an exception here would kill paho's network thread
            log.exception("message handler failed on %s", msg.topic)

    # -- the ingest worker (with on_batch) --------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Messages received and not yet stored."""
        return self._queue.qsize()

    def _ingest_loop(self) -> None:
        assert self._on_batch is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._store_and_ack(batch)
            if stop:
                return

    def _store_and_ack(self, batch: list[tuple[str, bytes, int, int, int]]) -> None:
        assert self._on_batch is not None
        messages = [(t, p) for t, p, _, _, _ in batch]
        stored = False
        for attempt in range(STORE_RETRIES):
            try:
                stored = self._on_batch(messages)
            except Exception:  # the handler promises not to raise; a bug must not end the worker
                log.exception("ingest handler failed on a batch of %d", len(batch))
                stored = False
            if stored or not self._started:
                break
            time.sleep(min(2.0**attempt, 30.0))
        if not stored:
            self.lost += len(batch)
            log.error("gave up storing %d messages after %d attempts; acknowledging them so the session goes on",
                      len(batch), STORE_RETRIES)
        self.batches += 1
        for _t, _p, mid, qos, generation in batch:
            if qos > 0 and generation == self._generation:
                try:
                    self._client.ack(mid, qos)
                except Exception:  # noqa: BLE001 - a closed connection: the broker redelivers on the next one
                    log.debug("ack of mid %d failed", mid, exc_info=True)
