"""The embedded MQTT broker (amqtt) for zero-setup, single-machine use, and for a site gateway.

Neutral ground (``edgewise.broker``): the control plane runs it as its zero-setup broker
(``edgewise.control.broker`` re-exports these names), and a site gateway (``edgewise.agent.gateway``)
runs it as the broker of a factory floor. It imports only ``protocol``.

amqtt is asyncio; the control plane's web server runs its own loop and the MQTT
client is threaded, so the broker gets a thread and a loop of its own and nothing
else shares them. It keeps retained messages in memory only: after a restart the
control plane republishes every recorded desired state as soon as its bus connects
(see ``deployments.republish_all``), so devices still find theirs.

Access (:class:`BrokerAccess`, see :class:`EdgewiseAccessPlugin`): the control plane's own
client logs in as ``edgewise-control`` with a password generated at every start and may do
everything; a device logs in with username = its device id and password = its device token
(from enrollment), must use its device id as client id, and may publish only to
``edgewise/devices/<id>/{state,telemetry/#,events/#}`` and subscribe only to
``edgewise/devices/<id>/{desired,cmd/#}`` and ``edgewise/fleet/#`` (the same rules as the
Mosquitto ACL, ``mosquitto.acl_text``). With ``require_auth`` false (mode ``open``, the
default until every agent is enrolled) clients without credentials are still let in,
unfenced: that mode is for a laptop, not a network. amqtt speaks MQTT 3.1.1 only, so a
denied publish is dropped silently (no reason code); Mosquitto (MQTT v5) reports it.

For production use Mosquitto (``edgewise server --mosquitto``, mTLS) or EMQX.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from ..protocol import topics

__all__ = ["BrokerAccess", "BrokerStartError", "EdgewiseAccessPlugin", "EmbeddedBroker", "PublishHook", "device_may"]

# (username or None, topic, payload, retain) -> None: called for every PUBLISH a client sends (and every will the
# broker fires) *before* the broker acknowledges it; raising refuses the message (no PUBACK, the client resends).
PublishHook = Callable[[str | None, str, bytes, bool], None]

log = logging.getLogger(__name__)

# amqtt logs every connection at INFO and its state machine library every transition: keep them
# at WARNING unless the application configured these loggers itself.
QUIET_LOGGERS = ("amqtt", "transitions")


def _quiet_unless_configured(names: tuple[str, ...]) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (typically: its port is taken)."""


# -- per-device access ---------------------------------------------------------------------------

CONTROL_USERNAME = "edgewise-control"
DEVICE_PUBLISH = ("state", "telemetry/#", "events/#")
DEVICE_SUBSCRIBE = ("desired", "cmd/#")


def _covers(allowed: str, requested: str) -> bool:
    """True if every topic ``requested`` (a name or a filter) can match lies within filter ``allowed``.

    Wildcards in ``requested`` only pass where ``allowed`` has ``#``: ``edgewise/devices/+/desired``
    is not within ``edgewise/devices/dev1/desired``.
    """
    a, r = allowed.split("/"), requested.split("/")
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(r) or r[i] != level:
            return False
    return len(r) == len(a)


def device_may(device_id: str, action: str, topic: str) -> bool:
    """The per-device rule, shared by the embedded broker and (as text) the Mosquitto ACL.

    ``action``: ``publish`` (a topic name), ``subscribe`` (a filter) or ``receive`` (a topic name).
    """
    base = f"{topics.DEVICES}/{device_id}"
    if action == "publish":
        allowed = [f"{base}/{c}" for c in DEVICE_PUBLISH]
    else:
        allowed = [f"{base}/{c}" for c in DEVICE_SUBSCRIBE] + [f"{topics.FLEET}/#"]
    return any(_covers(a, topic) for a in allowed)


@dataclass
class BrokerAccess:
    """Who may connect to the embedded broker and what they may touch.

    ``check_device(device_id, token)`` says whether ``token`` is a live device token of
    ``device_id`` (it runs in a worker thread: it may query the database).
    """

    check_device: Callable[[str, str], bool]
    require_auth: bool = False
    control_username: str = CONTROL_USERNAME
    control_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    denied: int = 0  # publishes and subscriptions refused so far (for tests and logs)


_ACCESS: dict[str, BrokerAccess] = {}  # amqtt builds plugins from config dicts: objects are passed by key


class EdgewiseAccessPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt plugin: authenticates devices by device token and fences their topics (see module doc)."""

    @dataclass
    class Config:
        access_key: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.access = _ACCESS[self.config.access_key]

    async def authenticate(self, *, session: Any) -> bool | None:
        access = self.access
        username, password = session.username, session.password or ""
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if username is None:
            if access.require_auth:
                log.warning("refused MQTT client %r: no credentials (devices log in with their id and device token)",
                            session.client_id)
                return False
            return True
        if username == access.control_username:
            return hmac.compare_digest(password.encode(), access.control_password.encode())
        if session.client_id != username:
            log.warning("refused MQTT client %r: a device must use its device id %r as client id", session.client_id, username)
            return False
        if not topics.DEVICE_ID_RE.match(username):
            return False
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(None, access.check_device, username, password)
        except Exception:  # noqa: BLE001 - a failing check refuses, it does not crash the broker
            log.exception("checking the device token of %r failed; refusing it", username)
            ok = False
        if not ok:
            log.warning("refused MQTT device %r: unknown, revoked or wrong device token", username)
        return bool(ok)

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None, action: Any = None) -> bool | None:
        if session is None or topic is None:
            return False
        username = session.username
        if username is None:
            return True  # open mode only: anonymous clients were refused at CONNECT otherwise
        if username == self.access.control_username:
            return True
        name = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe"}.get(action, "receive")
        if device_may(username, name, topic):
            return True
        if action != Action.RECEIVE:
            self.access.denied += 1
            log.warning("denied MQTT %s of device %r on %s (devices may use only their own topics)", name, username, topic)
        return False


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (port 0 = any free port) in a background thread.

    >>> with EmbeddedBroker(port=0) as broker:   # doctest: +SKIP
    ...     broker.url
    'mqtt://127.0.0.1:40123'
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 1883, *, access: BrokerAccess | None = None,
        on_publish: PublishHook | None = None,
    ) -> None:
        self.host = host
        self.access = access
        self.on_publish = on_publish  # see PublishHook: a site gateway stores before the device gets its PUBACK
        self._access_key = secrets.token_hex(8)
        self.requested_port = port
        self.port: int | None = None  # the bound port, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded broker is not running; call start() first")
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.port is not None

    def config(self) -> dict[str, Any]:
        """amqtt 0.12 configuration: one TCP listener, no $SYS chatter; per-device access with ``access``,
        otherwise anonymous clients and no ACL (only for tests of the broker itself)."""
        listeners = {"default": {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"}}
        if self.access is None:
            return {"listeners": listeners,
                    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        _ACCESS[self._access_key] = self.access
        return {"listeners": listeners,
                "plugins": {f"{__name__}.EdgewiseAccessPlugin": {"access_key": self._access_key}}}

    def start(self, timeout: float = 10.0) -> str:
        """Start listening; return the broker URL. Raises :class:`BrokerStartError`."""
        if self.running:
            return self.url
        _quiet_unless_configured(QUIET_LOGGERS)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="edgewise-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerStartError(f"embedded MQTT broker did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise BrokerStartError(
                f"embedded MQTT broker cannot listen on {self.host}:{self.requested_port} ({self._error}); "
                f"if another broker runs there, use it with broker_url=mqtt://{self.host}:{self.requested_port}, "
                "otherwise choose another embedded_broker_port (0 = any free port)"
            ) from self._error
        log.info("embedded MQTT broker listening on %s", self.url)
        return self.url

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._start_broker())
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                self._error = exc.__cause__ or exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            _drain_and_close(loop)

    async def _start_broker(self) -> None:
        self._broker = _fenced_broker_class(self.on_publish)(self.config(), loop=asyncio.get_running_loop())
        await self._broker.start()
        # amqtt has no public accessor for the bound socket; needed to support port 0.
        server = self._broker._servers["default"]  # noqa: SLF001
        self.port = server.instance.sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client and stop listening. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            self.port = None
            return
        if self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                fut.result(timeout)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("embedded MQTT broker did not shut down cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self.port = None
        self._broker = None
        _ACCESS.pop(self._access_key, None)
        log.info("embedded MQTT broker stopped")

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop()


def _fenced_broker_class(on_publish: PublishHook | None = None) -> type:
    """amqtt's Broker, with retained messages sent only for the connecting client's own subscriptions.

    amqtt 0.12.1, on every connect, replays the retained messages matching *every* client's subscription
    filters to the new client (``Broker.client_connected``: ``for topic in self._subscriptions``), without
    topic filtering: a device would receive every other device's retained desired state. Mosquitto does not do
    this; the override makes the embedded broker agree (tests/test_security_identity.py).

    With ``on_publish``, every incoming PUBLISH is handed to it before amqtt queues it and sends the PUBACK
    (amqtt acknowledges QoS 1 on receipt, before delivery: a hook on delivery would be too late to promise
    "stored before acknowledged"). It runs synchronously on the broker's loop, at the start of the task amqtt
    creates per packet, so messages reach it in the order the client sent them. Wills fired on an abnormal
    disconnect go through it too."""
    from amqtt.broker import Broker
    from amqtt.session import INCOMING

    class FencedBroker(Broker):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
            holders = self._subscriptions.get(subscription[0], ())  # noqa: SLF001 - amqtt's own table
            if not any(s.client_id == session.client_id for s, _ in holders):
                return  # another client's filter: none of this session's business
            await super()._publish_retained_messages_for_subscription(subscription, session)

        if on_publish is not None:
            async def _handle_client_session(self, reader: Any, writer: Any, client_session: Any, handler: Any,
                                             *args: Any, **kwargs: Any) -> None:
                flow = handler._handle_message_flow  # noqa: SLF001 - amqtt has no hook before its PUBACK

                async def stored_first(app_message: Any) -> None:
                    if app_message.direction == INCOMING and app_message.topic:
                        packet = app_message.publish_packet
                        on_publish(client_session.username, app_message.topic, bytes(app_message.data or b""),
                                   bool(packet is not None and packet.retain_flag))
                    await flow(app_message)

                handler._handle_message_flow = stored_first  # noqa: SLF001
                await super()._handle_client_session(reader, writer, client_session, handler, *args, **kwargs)

            async def _handle_disconnect(self, client_session: Any, handler: Any, disconnect_waiter: Any) -> None:
                from amqtt.mqtt.disconnect import DisconnectPacket

                result = disconnect_waiter.result()
                if (result is None or not isinstance(result, DisconnectPacket)) and client_session.will_flag:
                    try:
                        on_publish(client_session.username, client_session.will_topic,
                                   bytes(client_session.will_message or b""), bool(client_session.will_retain))
                    except Exception:  # noqa: BLE001 - the will is best effort; the disconnect must complete
                        log.exception("storing the will of %r failed", client_session.client_id)
                await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    return FencedBroker


def _drain_and_close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel whatever amqtt left running so the loop closes without 'task destroyed' noise."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
