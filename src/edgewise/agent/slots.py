"""A/B model slots: the device never runs a bundle that was not fully written and committed.

Layout under ``state_dir/slots``::

    a/bundle.ewb    b/bundle.ewb    state.json

``state.json`` is the only thing that says which slot is live; it is replaced
atomically (tmp, fsync, rename, fsync dir), so after a power cut at any point it
names either the old committed slot or the new one. A new bundle is always
staged into the slot that is *not* committed, so staging cannot damage the
running model. A slot is only ever loaded if ``state.json`` records it as
committed (now or previously) with the sha256 it had then, so a half-written or
staged-but-never-committed slot is never run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import atomic_write, fsync_dir

if TYPE_CHECKING:
    from ..bundle import Manifest

log = logging.getLogger("edgewise.agent.slots")

SLOT_NAMES = ("a", "b")
BUNDLE_FILE = "bundle.ewb"
STATE_FILE = "state.json"


class SlotError(RuntimeError):
    """The slot store cannot do what was asked (disk full, unknown slot); the message says which."""


@dataclass(frozen=True)
class SlotRecord:
    """What a committed slot held: enough to check, before loading, that it is still the same bytes."""

    slot: str
    model: str
    version: str
    sha256: str
    committed_at: float = 0.0

    @classmethod
    def from_json(cls, obj: Any) -> "SlotRecord | None":
        if not isinstance(obj, dict):
            return None
        try:
            rec = cls(str(obj["slot"]), str(obj["model"]), str(obj["version"]), str(obj["sha256"]), float(obj.get("committed_at", 0.0)))
        except (KeyError, TypeError, ValueError):
            return None
        return rec if rec.slot in SLOT_NAMES else None


class Slots:
    """The two model slots of a device and the record of which one is committed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for name in SLOT_NAMES:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._state_path = self.root / STATE_FILE

    # -- reading ------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            # Atomic replace means this cannot happen through our own writes; a disk error can.
            log.error("%s is unreadable; treating the device as having no committed model", self._state_path)
            return {}
        return obj if isinstance(obj, dict) else {}

    def record(self) -> SlotRecord | None:
        """The committed slot's record, or None on a fresh device."""
        return SlotRecord.from_json(self._read_state().get("committed"))

    def previous(self) -> SlotRecord | None:
        """The slot committed before the current one (the rollback target), if it is still intact on disk."""
        return SlotRecord.from_json(self._read_state().get("previous"))

    def slot_dir(self, slot: str) -> Path:
        """The directory of slot ``"a"`` or ``"b"``."""
        if slot not in SLOT_NAMES:
            raise SlotError(f"unknown slot {slot!r}; slots are {SLOT_NAMES}")
        return self.root / slot

    def bundle(self, slot: str | Path) -> Path:
        """The bundle file inside a slot (given by name or directory)."""
        return self.slot_dir(self._slot_name(slot)) / BUNDLE_FILE

    def committed(self) -> Path | None:
        """Directory of the committed slot, or None if nothing was ever committed (or its bundle is gone)."""
        rec = self.record()
        if rec is None:
            return None
        return self.slot_dir(rec.slot) if self.bundle(rec.slot).exists() else None

    def inactive(self) -> str:
        """The slot a new bundle goes into: the one not committed."""
        rec = self.record()
        if rec is None:
            return SLOT_NAMES[0]
        return SLOT_NAMES[1] if rec.slot == SLOT_NAMES[0] else SLOT_NAMES[0]

    # -- writing ------------------------------------------------------------------------------

    def stage(self, bundle_file: Path) -> Path:
        """Copy ``bundle_file`` into the inactive slot (durably) and return that slot's directory.

        Staging overwrites the rollback target, so the previous record is dropped
        first: from then on only the committed slot counts as loadable.
        """
        slot = self.inactive()
        state = self._read_state()
        prev = SlotRecord.from_json(state.get("previous"))
        if prev is not None and prev.slot == slot:
            state["previous"] = None
            self._write_state(state)
        dest = self.bundle(slot)
        part = dest.with_name(BUNDLE_FILE + ".part")
        try:
            dest.unlink(missing_ok=True)
            with open(bundle_file, "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(part, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise SlotError(f"cannot stage {bundle_file} into slot {slot}: {exc.strerror or exc}; free some disk space") from None
        return dest.parent

    def commit(self, slot_or_path: str | Path, manifest: "Manifest", sha256: str = "") -> SlotRecord:
        """Make ``slot`` the committed one; the old committed slot becomes the rollback target.

        ``sha256`` is the staged file's hash (computed here when not given); it is
        checked again before the slot is ever loaded.
        """
        slot = self._slot_name(slot_or_path)
        if not sha256:
            from ..bundle import sha256_file

            sha256 = sha256_file(self.bundle(slot))
        state = self._read_state()
        old = SlotRecord.from_json(state.get("committed"))
        rec = SlotRecord(slot, manifest.name, manifest.version, sha256, time.time())
        state = {
            "format": 1,
            "committed": asdict(rec),
            "previous": asdict(old) if old is not None and old.slot != slot else None,
        }
        self._write_state(state)
        return rec

    def rollback(self) -> SlotRecord | None:
        """Make the previous slot the committed one again (after the committed one failed to load)."""
        state = self._read_state()
        prev = SlotRecord.from_json(state.get("previous"))
        if prev is None:
            return None
        self._write_state({"format": 1, "committed": asdict(prev), "previous": None})
        return prev

    def _slot_name(self, slot_or_path: str | Path) -> str:
        if isinstance(slot_or_path, str) and slot_or_path in SLOT_NAMES:
            return slot_or_path
        p = Path(slot_or_path)
        for name in SLOT_NAMES:
            if p in (self.root / name, self.root / name / BUNDLE_FILE):
                return name
        raise SlotError(f"{slot_or_path} is not one of the slots under {self.root}")

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self._state_path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
