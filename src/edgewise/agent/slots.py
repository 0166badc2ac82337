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

Encryption at rest (``SlotSealer``): with a sealer, ``stage`` writes the bundle
encrypted (``security.encryption``: chunked AES-256-GCM, bound to the device,
the slot and the purpose) and ``bundle()`` returns a path that decrypts itself
into memory for ``verify_bundle``; the plaintext never touches the disk. The
recorded sha256 stays the one of the *plaintext* bundle (what TUF and the
registry name). Plaintext slots written before encryption was turned on stay
readable and are sealed in place when a sealer that encrypts is attached
(``seal_plaintext_slots``), so an upgraded device keeps its model and loses the
plaintext copy.
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
    from ..security.keystore import Keystore

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


@dataclass(frozen=True)
class TrialRecord:
    """A staged slot on trial: loaded ``starts`` times (each written down *before* loading), ``passed`` of them fully.

    ``starts > passed`` means an attempt never finished: the agent died while trying the model.
    """

    slot: str
    model: str
    version: str
    sha256: str
    starts: int = 0
    passed: int = 0
    generation: int | None = None  # the desired state that asked for it (None: a local install)

    @classmethod
    def from_json(cls, obj: Any) -> "TrialRecord | None":
        if not isinstance(obj, dict):
            return None
        try:
            gen = obj.get("generation")
            rec = cls(str(obj["slot"]), str(obj["model"]), str(obj["version"]), str(obj["sha256"]), int(obj.get("starts", 0)),
                      int(obj.get("passed", 0)), int(gen) if gen is not None else None)
        except (KeyError, TypeError, ValueError):
            return None
        return rec if rec.slot in SLOT_NAMES else None

    def as_record(self) -> SlotRecord:
        return SlotRecord(self.slot, self.model, self.version, self.sha256)


@dataclass(frozen=True)
class SlotSealer:
    """How slot bundles are encrypted: the keystore and storage key label, the device they are bound to.

    ``encrypt`` false still opens sealed slots (turning encryption off must not
    strand the committed model) but stages new bundles in plaintext.
    """

    keystore: "Keystore"
    device_id: str
    key_label: str = "storage"
    encrypt: bool = True
    chunk_size: int = 1 << 20

    def context(self, slot: str) -> str:
        return f"edgewise-model/1;device={self.device_id};slot={slot}"

    def open(self, path: Path, slot: str, digest_tail: int | None = None) -> tuple[bytearray, Any]:
        """Decrypt into memory; with ``digest_tail``, also the sha256 of all but the last ``digest_tail`` bytes."""
        from ..security.encryption import open_sealed_digest

        return open_sealed_digest(path, keystore=self.keystore, context=self.context(slot), name=f"slot {slot} ({path.name})",
                                  digest_tail=digest_tail)

    def seal(self, src: Path, dest: Path, slot: str) -> None:
        from ..security.encryption import seal_file

        seal_file(src, dest, keystore=self.keystore, key_label=self.key_label, context=self.context(slot), chunk_size=self.chunk_size)


class SealedSlotBundle(type(Path())):  # type: ignore[misc]
    """An encrypted slot bundle: still a Path (exists, stat, compare), plus ``read_plaintext`` for ``verify_bundle``."""

    _opener: Any = None

    def __new__(cls, path: Path, opener: Any = None) -> "SealedSlotBundle":
        self = super().__new__(cls, path)
        self._opener = opener
        return self

    def read_plaintext(self) -> bytes | bytearray:
        """Decrypt into memory (raises ``EncryptionError`` naming what was wrong)."""
        return self.read_plaintext_digest(None)[0]

    def read_plaintext_digest(self, digest_tail: int | None) -> tuple[bytes | bytearray, Any]:
        """Decrypt into memory and hash all but the last ``digest_tail`` bytes on the way (what a bundle signature covers)."""
        if self._opener is None:  # a path derived from this one (parent, with_name): nothing to decrypt with
            return Path(self).read_bytes(), None
        return self._opener(Path(self), digest_tail)


def _agent_sealer(slots_root: Path) -> SlotSealer:
    """Read-only sealer for ``state_dir/slots`` from the agent's ``state_dir/config.toml`` (device id, keystore URL)."""
    import tomllib

    from ..security.encryption import EncryptionError
    from ..security.keystore import KeystoreError, open_keystore

    state = Path(slots_root).parent
    try:
        values = tomllib.loads((state / "config.toml").read_text(encoding="utf-8"))
        device_id = str(values["device_id"])
        keystore = open_keystore(values.get("keystore_url") or f"file:{state / 'keys'}")
    except (OSError, ValueError, KeyError, KeystoreError) as exc:
        raise EncryptionError(
            f"{slots_root}: the slot is encrypted and no keystore is known for it ({type(exc).__name__}: {exc}); "
            "open it through the agent (Slots(..., sealer=SlotSealer(keystore, device_id)))"
        ) from None
    return SlotSealer(keystore, device_id, encrypt=False)


class Slots:
    """The two model slots of a device and the record of which one is committed."""

    def __init__(self, root: Path, sealer: SlotSealer | None = None) -> None:
        self.root = Path(root)
        for name in SLOT_NAMES:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._state_path = self.root / STATE_FILE
        self.sealer = sealer
        if sealer is not None and sealer.encrypt:
            self.seal_plaintext_slots()

    def seal_plaintext_slots(self) -> list[str]:
        """Encrypt, in place and durably, slot bundles stored in plaintext (before encryption was on); return the slots sealed.

        A slot that cannot be sealed (disk full, keystore down) is left as it is and stays readable.
        """
        from ..security.encryption import EncryptionError, is_sealed

        done: list[str] = []
        if self.sealer is None or not self.sealer.encrypt:
            return done
        for name in SLOT_NAMES:
            path = self._bundle_file(name)
            if not path.exists() or is_sealed(path):
                continue
            try:
                self.sealer.seal(path, path, name)
                done.append(name)
                log.info("slot %s: sealed the plaintext bundle in place (encryption at rest)", name)
            except (OSError, EncryptionError) as exc:
                log.error("slot %s: cannot seal the plaintext bundle, it stays readable in plaintext: %s", name, exc)
        return done

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

    def trial(self) -> TrialRecord | None:
        """The staged slot on trial (loaded, not yet committed), if any."""
        trial = TrialRecord.from_json(self._read_state().get("trial"))
        rec = self.record()
        return None if trial is None or (rec is not None and rec.slot == trial.slot) else trial

    def highest_committed(self, model: str) -> str | None:
        """The highest version of ``model`` this device ever committed (rollback protection)."""
        highest = self._read_state().get("highest_committed")
        value = highest.get(model) if isinstance(highest, dict) else None
        return value if isinstance(value, str) else None

    def slot_dir(self, slot: str) -> Path:
        """The directory of slot ``"a"`` or ``"b"``."""
        if slot not in SLOT_NAMES:
            raise SlotError(f"unknown slot {slot!r}; slots are {SLOT_NAMES}")
        return self.root / slot

    def _bundle_file(self, slot: str) -> Path:
        return self.slot_dir(slot) / BUNDLE_FILE

    def bundle(self, slot: str | Path) -> Path:
        """The bundle file inside a slot (given by name or directory).

        An encrypted one comes back as a :class:`SealedSlotBundle`, which ``verify_bundle`` decrypts into memory.
        """
        name = self._slot_name(slot)
        path = self._bundle_file(name)
        from ..security.encryption import is_sealed

        if is_sealed(path):
            return SealedSlotBundle(path, lambda p, tail: self._reader().open(p, name, tail))
        return path

    def _reader(self) -> SlotSealer:
        """The sealer that opens sealed slots: ours, or (Slots opened by a tool on an agent's state dir) the agent's."""
        if self.sealer is None:
            self.sealer = _agent_sealer(self.root)
        return self.sealer

    def committed(self) -> Path | None:
        """Directory of the committed slot, or None if nothing was ever committed (or its bundle is gone)."""
        rec = self.record()
        if rec is None:
            return None
        return self.slot_dir(rec.slot) if self._bundle_file(rec.slot).exists() else None

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
        trial = TrialRecord.from_json(state.get("trial"))
        if (prev is not None and prev.slot == slot) or (trial is not None and trial.slot == slot):
            if prev is not None and prev.slot == slot:
                state["previous"] = None
            if trial is not None and trial.slot == slot:
                state["trial"] = None  # a new bundle replaces the one on trial
            self._write_state(state)
        dest = self._bundle_file(slot)
        part = dest.with_name(BUNDLE_FILE + ".part")
        if self.sealer is not None and self.sealer.encrypt:
            from ..security.encryption import EncryptionError

            try:
                dest.unlink(missing_ok=True)
                self.sealer.seal(Path(bundle_file), dest, slot)  # via bundle.ewb.part, fsynced, renamed
            except OSError as exc:
                part.unlink(missing_ok=True)
                raise SlotError(f"cannot stage {bundle_file} into slot {slot}: {exc.strerror or exc}; free some disk space") from None
            except EncryptionError as exc:
                raise SlotError(f"cannot stage {bundle_file} into slot {slot}: encryption failed: {exc}") from None
            return dest.parent
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
            import hashlib

            from ..bundle import sha256_file

            path = self.bundle(slot)
            read = getattr(path, "read_plaintext", None)
            sha256 = hashlib.sha256(read()).hexdigest() if read is not None else sha256_file(path)
        return self._commit(slot, manifest.name, manifest.version, sha256)

    def _commit(self, slot: str, model: str, version: str, sha256: str) -> SlotRecord:
        state = self._read_state()
        old = SlotRecord.from_json(state.get("committed"))
        rec = SlotRecord(slot, model, version, sha256, time.time())
        highest = dict(state.get("highest_committed") or {})
        try:
            from ..bundle import semver_key

            if model not in highest or semver_key(version) > semver_key(highest[model]):
                highest[model] = version
        except ValueError:  # an unparsable recorded version: the new, valid one replaces it
            highest[model] = version
        self._write_state({
            "format": 1,
            "committed": asdict(rec),
            "previous": asdict(old) if old is not None and old.slot != slot else None,
            "trial": None,
            "highest_committed": highest,
        })
        return rec

    # -- trials -------------------------------------------------------------------------------

    def begin_trial(self, slot_or_path: str | Path, manifest: "Manifest", sha256: str, generation: int | None = None) -> TrialRecord:
        """Record the staged slot as on trial, counting this load as its first start (written before loading)."""
        slot = self._slot_name(slot_or_path)
        rec = self.record()
        if rec is not None and rec.slot == slot:
            raise SlotError(f"slot {slot} is the committed slot; it cannot go on trial")
        trial = TrialRecord(slot, manifest.name, manifest.version, sha256, starts=1, passed=0, generation=generation)
        self._update(trial=asdict(trial))
        return trial

    def trial_started(self) -> TrialRecord | None:
        """Count one more start of the trial slot (persisted before the model is loaded)."""
        trial = self.trial()
        if trial is None:
            return None
        trial = TrialRecord(**{**asdict(trial), "starts": trial.starts + 1})
        self._update(trial=asdict(trial))
        return trial

    def trial_passed(self) -> TrialRecord | None:
        """Count one successful load (smoke test and golden check passed) of the trial slot."""
        trial = self.trial()
        if trial is None:
            return None
        trial = TrialRecord(**{**asdict(trial), "passed": trial.passed + 1})
        self._update(trial=asdict(trial))
        return trial

    def commit_trial(self) -> SlotRecord | None:
        """Commit the slot on trial (the committed one becomes the rollback target)."""
        trial = self.trial()
        if trial is None:
            return None
        return self._commit(trial.slot, trial.model, trial.version, trial.sha256)

    def abandon_trial(self) -> TrialRecord | None:
        """Forget the trial: the committed slot stays what the device runs."""
        trial = self.trial()
        if trial is not None:
            self._update(trial=None)
        return trial

    def cleanup(self, *extra_dirs: Path) -> list[Path]:
        """Remove leftovers (stale ``.part`` files, old bundles, temp files) beside the two slots and in ``extra_dirs``.

        Call only when no stage or state write is in progress (the updater holds its lock).
        """
        removed: list[Path] = []
        keep_root = set(SLOT_NAMES) | {STATE_FILE}
        candidates = [p for p in self.root.iterdir() if p.name not in keep_root]
        for name in SLOT_NAMES:
            candidates += [p for p in self.slot_dir(name).iterdir() if p.name != BUNDLE_FILE]
        for d in extra_dirs:
            if Path(d).is_dir():
                candidates += list(Path(d).iterdir())
        for p in candidates:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            except OSError as exc:
                log.warning("cannot remove leftover %s: %s", p, exc)
        return removed

    def rollback(self) -> SlotRecord | None:
        """Make the previous slot the committed one again (after the committed one failed to load)."""
        state = self._read_state()
        prev = SlotRecord.from_json(state.get("previous"))
        if prev is None:
            return None
        self._update(committed=asdict(prev), previous=None, trial=None)
        return prev

    def _slot_name(self, slot_or_path: str | Path) -> str:
        if isinstance(slot_or_path, str) and slot_or_path in SLOT_NAMES:
            return slot_or_path
        p = Path(slot_or_path)
        for name in SLOT_NAMES:
            if p in (self.root / name, self.root / name / BUNDLE_FILE):
                return name
        raise SlotError(f"{slot_or_path} is not one of the slots under {self.root}")

    def _update(self, **changes: Any) -> None:
        state = self._read_state()
        state.setdefault("format", 1)
        state.update(changes)
        self._write_state(state)

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self._state_path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
