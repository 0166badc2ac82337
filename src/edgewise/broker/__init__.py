"""MQTT broker code shared by the control plane and the site gateway (imports only ``protocol``).

The control plane's zero-setup broker and a site gateway's site broker are the same amqtt wrapper
(:class:`EmbeddedBroker`) with the same per-device access rules (:func:`device_may`); the agent and the
control plane may both import this package without importing each other.
"""

from __future__ import annotations

from .embedded import (
    CONTROL_USERNAME,
    DEVICE_PUBLISH,
    DEVICE_SUBSCRIBE,
    BrokerAccess,
    BrokerStartError,
    EdgewiseAccessPlugin,
    EmbeddedBroker,
    PublishHook,
    device_may,
)

__all__ = [
    "CONTROL_USERNAME", "DEVICE_PUBLISH", "DEVICE_SUBSCRIBE", "BrokerAccess", "BrokerStartError",
    "EdgewiseAccessPlugin", "EmbeddedBroker", "PublishHook", "device_may",
]
