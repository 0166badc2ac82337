"""One-off commands to a device (``cmd/{name}``): what an operator asks a device to do now.

Desired state is for what a device should *be*; a command is for something it should *do* once (adapt its model
to recent inputs, restart its drift detectors). Commands go out QoS 1, not retained: a device that is offline
gets them from its persistent session when it reconnects, unless they expired first. The device answers with an
Event of kind ``command.result`` carrying the command's id (see the device's events).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from sqlalchemy.orm import Session

from ..protocol import Command, encode, topics
from ..protocol.messages import COMMANDS
from .deployments import Publisher
from .devices import get_device
from .errors import InvalidRequestError, UnavailableError

log = logging.getLogger(__name__)


def send_command(session: Session, publisher: Publisher | None, device_id: str, name: str, args: dict[str, Any] | None = None,
                 *, ttl_s: float | None = 3600.0) -> Command:
    """Publish ``name`` to a registered device; raises when the name is unknown or the bus is down."""
    if name not in COMMANDS:
        raise InvalidRequestError(f"unknown command {name!r}: use one of {', '.join(COMMANDS)}")
    device = get_device(session, device_id)
    now = time.time()
    command = Command(device_id=device.id, id=secrets.token_hex(8), name=name, args=dict(args or {}), issued_at=now,
                      expires_at=now + ttl_s if ttl_s else None)
    if publisher is None or not publisher.publish(topics.cmd(device.id, name), encode(command), qos=1, retain=False):
        raise UnavailableError("the MQTT bus is not connected; the command was not sent (try again when the broker is up)")
    log.info("command %s (%s) sent to %s", name, command.id, device.id)
    return command
