"""The MQTT session: one supervised connection to the broker, for as long as the agent runs.

A supervisor thread connects, and when the broker is down or the connection
drops it waits ``backoff(attempt)`` (exponential growth with full jitter, so a
thousand devices rebooting together do not reconnect in lockstep) and tries
again, forever. Each session uses a fresh paho client with
``reconnect_on_failure=False``: paho moves bytes, this module decides when to
reconnect.

On every connect the link subscribes to the device's desired-state topic (the
broker re-delivers the retained message) and publishes the current state
retained. The last will is the same state with ``status="offline"``.

Whatever arrives is decoded with ``protocol.decode_for_topic``; a message that
does not follow the protocol is handed to ``on_bad_message`` and never raises
into paho, so garbage on the wire cannot take the session down.

With ``protocol`` 5 (the default on mqtts://, i.e. Mosquitto or EMQX with mutual TLS)
a broker that refuses a publish (Mosquitto's ACL: a device may write only under its
own topics) says so with a reason code in the PUBACK: the link logs it, counts it
(``publish_denied``) and reports the publish as not delivered. A broker that answers
"unsupported protocol version" gets 3.1.1 from the next attempt on. Plain mqtt://
defaults to 3.1.1, because the embedded amqtt broker does not even answer a v5
CONNECT that carries a will (it drops it as malformed). With
``tls_files`` the link does mutual TLS (the fleet CA, the device's certificate and
key from enrollment); with ``credentials`` it logs in with its device id and
device token (the embedded broker's per-device access).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt

from ..protocol import Command, DesiredState, DeviceState, ProtocolError, decode_for_topic, encode, topics

log = logging.getLogger("edgewise.agent.link")

KEEPALIVE_S = 30
UNSUPPORTED_PROTOCOL = 132  # MQTT v5 CONNACK reason "Unsupported Protocol Version"
DENIAL_LOG_EVERY_S = 60.0  # a refused topic is logged at WARNING at most this often
CONNECT_TIMEOUT_S = 5.0  # TCP connect
CONNACK_TIMEOUT_S = 10.0  # a broker that accepts TCP but never answers CONNECT is as good as down


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0, rand: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): uniform in [0, min(cap, base * 2**attempt)].

    "Full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter",
    2015): the bound grows exponentially, the actual delay is spread over the
    whole range, which de-synchronizes a fleet reconnecting after an outage.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    bound = min(cap, base * (2.0 ** min(attempt, 64)))
    return rand() * bound


class Link:
    """A device's MQTT session, kept alive by its own supervisor thread."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        *,
        on_desired: Callable[[DesiredState], None],
        on_bad_message: Callable[[str, str], None],
        state: Callable[[], DeviceState],
        on_connect: Callable[[], None] | None = None,
        on_command: Callable[[Command], None] | None = None,
        tls: bool = False,
        tls_files: tuple[str, str, str] | None = None,
        credentials: tuple[str, str] | None = None,
        protocol: int | None = None,
        keepalive: int = KEEPALIVE_S,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.device_id = topics.check_device_id(device_id)
        self.host, self.port, self.tls = host, port, tls
        self.keepalive = keepalive
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._on_desired = on_desired
        self._on_bad_message = on_bad_message
        self._on_connect_hook = on_connect
        self._on_command = on_command
        self._state = state
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._session_over = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self.bad_messages = 0
        self.connects = 0
        self.last_error: str | None = None
        self.tls_files = tls_files  # (fleet CA certificate, device certificate, device key)
        self.credentials = credentials  # (device id, device token)
        self.protocol = protocol if protocol is not None else (mqtt.MQTTv5 if tls else mqtt.MQTTv311)
        self.publish_denied = 0  # publishes the broker refused with a reason code (MQTT v5)
        self.last_denial: str | None = None
        self._pub_reasons: dict[int, Any] = {}
        self._denial_logged: dict[str, float] = {}
        self._retry_now = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until the broker acknowledged the desired-state subscription of the current session."""
        return self._subscribed.wait(timeout)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._supervise, name=f"edgewise-link-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self, *, offline_state: DeviceState | None = None, timeout: float = 5.0) -> None:
        """End the session; publish ``offline_state`` first (a clean disconnect does not fire the will)."""
        if offline_state is not None and self.connected:
            self.publish(topics.state(self.device_id), encode(offline_state), retain=True, timeout=min(timeout, 2.0))
        self._stop.set()
        client = self._client
        if client is not None:
            try:
                client.disconnect()
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- supervisor -----------------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        v5 = self.protocol == mqtt.MQTTv5
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=self.protocol,
            reconnect_on_failure=False,
            **({} if v5 else {"clean_session": True}),
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.enable_logger(logging.getLogger("edgewise.agent.link.mqtt"))  # packet trace at DEBUG
        if self.tls:
            if self.tls_files is not None:
                ca, cert, key = self.tls_files
                client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
            else:
                client.tls_set()
        if self.credentials is not None:
            client.username_pw_set(*self.credentials)
        self._pub_reasons.clear()
        client.on_publish = self._handle_publish
        offline = self._state().model_copy(update={"status": "offline", "ts": time.time()})
        client.will_set(topics.state(self.device_id), encode(offline), qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        return client

    def _supervise(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            client = self._new_client()
            self._session_over.clear()
            try:
                if self.protocol == mqtt.MQTTv5:
                    client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=True)
                else:
                    client.connect(self.host, self.port, keepalive=self.keepalive)
            except Exception as exc:  # OSError mostly; paho raises a few others on odd sockets
                self.last_error = f"cannot connect to {self.host}:{self.port}: {exc}"
                # The first failure of a streak is news; the next hundred are not.
                log.log(logging.INFO if attempt == 0 else logging.DEBUG, "%s; retrying with backoff", self.last_error)
            else:
                before = self.connects
                self._client = client
                client.loop_start()
                started = time.monotonic()
                while not self._stop.is_set() and not self._session_over.wait(0.25):
                    if not self._connected.is_set() and self.connects == before and time.monotonic() - started > CONNACK_TIMEOUT_S:
                        self.last_error = f"{self.host}:{self.port} accepted the connection but never answered CONNECT"
                        log.warning("%s", self.last_error)
                        break
                self._connected.clear()
                self._subscribed.clear()
                try:
                    client.disconnect()
                except Exception:
                    pass
                client.loop_stop()
                self._client = None
                if self.connects > before:
                    attempt = 0  # a session that got through resets the backoff
            if self._stop.is_set():
                break
            if self._retry_now:  # protocol fallback: not a failure, try again at once
                self._retry_now = False
                continue
            delay = backoff(attempt, base=self.backoff_base, cap=self.backoff_cap)
            attempt += 1
            log.debug("reconnecting in %.2fs (attempt %d)", delay, attempt)
            self._stop.wait(delay)
        self._connected.clear()

    # -- paho callbacks (paho's network thread; never raise) ------------------------------------

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            if self.protocol == mqtt.MQTTv5 and getattr(reason, "value", None) == UNSUPPORTED_PROTOCOL:
                log.info("broker %s:%d does not speak MQTT v5; using 3.1.1 (no reason codes for refused publishes)",
                         self.host, self.port)
                self.protocol = mqtt.MQTTv311
                self._retry_now = True
                self._session_over.set()
                return
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("%s", self.last_error)
            self._session_over.set()
            return
        try:
            subs = [(topics.desired(self.device_id), 1)]
            if self._on_command is not None:
                subs.append((topics.cmd(self.device_id), 1))
            client.subscribe(subs)
            client.publish(topics.state(self.device_id), encode(self._state()), qos=1, retain=True)
        except Exception as exc:
            log.error("after connect: %s", exc)
        self.connects += 1
        self.last_error = None
        self._connected.set()
        log.info("connected to %s:%d", self.host, self.port)
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook()
            except Exception:
                log.exception("on_connect hook failed")

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        for reason in reasons or ():
            if getattr(reason, "is_failure", False):
                log.error("broker refused the subscription to %s: %s", topics.desired(self.device_id), reason)
        self._subscribed.set()

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._pub_reasons[mid] = reason

    def _denied(self, topic: str, reason: Any) -> None:
        """Count and log a publish the broker refused (rate-limited per topic)."""
        self.publish_denied += 1
        code = getattr(reason, "value", reason)
        self.last_denial = f"{topic}: {reason} (reason code {code:#04x})" if isinstance(code, int) else f"{topic}: {reason}"
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._denial_logged.get(topic, -DENIAL_LOG_EVERY_S) >= DENIAL_LOG_EVERY_S:
            self._denial_logged[topic] = now
            level = logging.WARNING
        log.log(level, "broker refused publish on %s (%d refused so far; check the broker ACL)",
                self.last_denial, self.publish_denied)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected.is_set():
            log.info("disconnected from %s:%d (%s)", self.host, self.port, reason)
        self._connected.clear()
        self._subscribed.clear()
        self._session_over.set()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        try:
            if topic == topics.desired(self.device_id) and not msg.payload:
                log.info("desired state cleared on %s; keeping the current model", topic)
                return
            try:
                _, message = decode_for_topic(topic, msg.payload)
            except ProtocolError as exc:
                self.bad_messages += 1
                log.warning("refused message on %s: %s", topic, exc)
                self._on_bad_message(topic, str(exc))
                return
            if isinstance(message, DesiredState):
                self._on_desired(message)
            elif isinstance(message, Command) and self._on_command is not None:
                if message.device_id != self.device_id:
                    self.bad_messages += 1
                    self._on_bad_message(topic, f"command for {message.device_id!r} on this device's topic")
                    return
                self._on_command(message)
            else:
                log.debug("ignoring %s message on %s", getattr(message, "type", "?"), topic)
        except Exception:
            log.exception("handling a message on %s failed; the session goes on", topic)

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> bool:
        """Publish and wait for the broker's acknowledgement: True only after PUBACK (or the send, for QoS 0)."""
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except Exception as exc:  # ValueError for oversize payloads, etc.
            log.error("cannot publish on %s: %s", topic, exc)
            return False
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        deadline = time.monotonic() + timeout
        while not info.is_published():
            remaining = deadline - time.monotonic()
            # A new session means this publish's connection is gone, even if `_session_over` was
            # already cleared by a fast reconnect: give up now, the outbox resends it.
            if remaining <= 0 or self._session_over.is_set() or self._stop.is_set() or self._client is not client:
                return info.is_published()
            try:
                info.wait_for_publish(min(0.1, remaining))
            except (RuntimeError, ValueError):
                return False
        reason = self._pub_reasons.pop(info.mid, None)
        if reason is not None:
            self._denied(topic, reason)
            return False
        return True
