"""The device agent: serve a verified model offline, converge to the desired state, report through a durable outbox.

Public names are loaded on first use (PEP 562), so ``import edgewise.agent``
costs nothing until one is touched: the CLI can list its commands without
pulling in ONNX Runtime or paho.

    from edgewise.agent import Agent, load_config
    agent = Agent(load_config("/var/lib/edgewise", server_url="http://control:8000"))
    agent.start()
    agent.predict(x)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Agent": "service",
    "AgentError": "service",
    "NoModelError": "service",
    "run_agent": "service",
    "AgentConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "LoadedModel": "runtime",
    "InputError": "runtime",
    "InferenceError": "runtime",
    "ModelLoadError": "runtime",
    "Outbox": "outbox",
    "Slots": "slots",
    "Updater": "updater",
    "Fetcher": "updater",
    "HttpFetcher": "updater",
    "FetchError": "updater",
    "Monitor": "monitor",
    "backoff": "link",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import AgentConfig, ConfigError, load_config
    from .link import backoff
    from .monitor import Monitor
    from .outbox import Outbox
    from .runtime import InferenceError, InputError, LoadedModel, ModelLoadError
    from .service import Agent, AgentError, NoModelError, run_agent
    from .slots import Slots
    from .updater import Fetcher, FetchError, HttpFetcher, Updater


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgewise.agent' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
