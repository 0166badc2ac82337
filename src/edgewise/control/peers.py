"""Which devices hold which bundles, for the desired state's ``peers`` hint (peer distribution, issue 9).

Devices that serve bundles to their neighbours report it in their retained DeviceState (``peer_url``,
``holds``: sha256 list). Ingest records that here; :func:`peers_for` picks, for a device about to fetch an
artifact, up to ``limit`` other devices that hold it, are online and look nearby: they share a tag (tags
name sites, lines, shelves) or the hardware class. The hint only changes where bytes come from: the
agent checks them against the signed target as it would the control plane's.

Kept in memory, not in the database: the state messages are retained on the broker, so a restarted
control plane has the directory back as soon as it re-subscribes. With several ingest workers sharing
the state stream, each process knows the devices whose states it saw (docs/peer-distribution.md).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..protocol import DeviceState

DEFAULT_LIMIT = 3
FRESH_S = 600.0  # a device not heard from for this long is not offered as a peer


@dataclass(frozen=True)
class PeerEntry:
    device_id: str
    url: str
    holds: frozenset[str]
    tags: frozenset[str]
    hardware_class: str | None
    seen: float


class PeerDirectory:
    """device id -> where it serves and what it holds; thread-safe (ingest writes, deployments read)."""

    def __init__(self, *, limit: int = DEFAULT_LIMIT, fresh_s: float = FRESH_S) -> None:
        self.limit = limit
        self.fresh_s = fresh_s
        self._entries: dict[str, PeerEntry] = {}
        self._lock = threading.Lock()

    def record(self, msg: DeviceState, *, tags: list[str] | None = None) -> None:
        """Remember (or forget) what a device's state says it serves. ``tags``: the device's registered tags."""
        with self._lock:
            if msg.status == "offline" or not msg.peer_url or not msg.holds:
                self._entries.pop(msg.device_id, None)
                return
            hw = msg.hardware.hardware_class if msg.hardware is not None else None
            self._entries[msg.device_id] = PeerEntry(
                msg.device_id, msg.peer_url.rstrip("/"), frozenset(msg.holds), frozenset(tags if tags is not None else msg.tags),
                hw, time.monotonic(),
            )

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._entries.pop(device_id, None)

    def peers_for(self, device_id: str, sha256: str | None, *, tags: list[str] | None = None, hardware_class: str | None = None,
                  limit: int | None = None) -> list[str]:
        """Up to ``limit`` peer URLs of other fresh devices that hold ``sha256`` and share a tag or the hardware class.

        Ordered by how much they share (tags in common, then the same class); equal ones in an order that differs per
        asking device, so a wave of devices updating at once spreads over the holders instead of all asking the first.
        """
        if not sha256:
            return []
        limit = self.limit if limit is None else limit
        want_tags = set(tags or ())
        now = time.monotonic()
        with self._lock:
            entries = list(self._entries.values())
        scored = []
        for e in entries:
            if e.device_id == device_id or sha256 not in e.holds or now - e.seen > self.fresh_s:
                continue
            shared = len(want_tags & e.tags)
            same_class = hardware_class is not None and e.hardware_class == hardware_class
            if not shared and not same_class:
                continue
            # Ties are broken by a hash of (asking device, peer): devices asking at once get different holders first.
            spread = hashlib.sha256(f"{device_id} {e.url}".encode()).digest()[:4]
            scored.append((-shared, -int(same_class), spread, e.url))
        scored.sort()
        out: list[str] = []
        for *_, url in scored:
            if url not in out:
                out.append(url)
        return out[:limit]

    def snapshot(self) -> list[dict[str, Any]]:
        """For an operator or a test: every device that serves, what and where."""
        with self._lock:
            return [{"device_id": e.device_id, "url": e.url, "holds": sorted(e.holds), "tags": sorted(e.tags),
                     "hardware_class": e.hardware_class} for e in self._entries.values()]


directory = PeerDirectory()  # the process's directory: ingest records into it, desired_state reads from it


def peers_for_device(device: Any) -> list[str]:
    """The peers hint for a ``control.models.Device`` about to fetch its desired artifact (empty when none)."""
    artifact = device.desired_artifact or {}
    hw = (device.hardware or {}).get("hardware_class") if isinstance(device.hardware, dict) else None
    return directory.peers_for(device.id, artifact.get("sha256"), tags=list(device.tags or []), hardware_class=hw)
