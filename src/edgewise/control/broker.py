"""The control plane's embedded MQTT broker (amqtt) for zero-setup, single-machine use.

The broker wrapper and its per-device access rules live in :mod:`edgewise.broker.embedded` (neutral ground, so
a site gateway on the agent side runs the same broker without importing the control plane); this module keeps
the names the control plane has always imported from here. See that module for how access works.

For production use Mosquitto (``edgewise server --mosquitto``, mTLS) or EMQX.
"""

from __future__ import annotations

from ..broker.embedded import (
    CONTROL_USERNAME,
    DEVICE_PUBLISH,
    DEVICE_SUBSCRIBE,
    QUIET_LOGGERS,
    BrokerAccess,
    BrokerStartError,
    EdgewiseAccessPlugin,
    EmbeddedBroker,
    device_may,
)
from .bus import MqttBus

__all__ = ["BrokerAccess", "BrokerStartError", "EdgewiseAccessPlugin", "EmbeddedBroker", "MqttBus", "device_may",
           "CONTROL_USERNAME", "DEVICE_PUBLISH", "DEVICE_SUBSCRIBE", "QUIET_LOGGERS"]
