"""The model registry as a TUF repository: the server side of signed updates.

A device trusts a bundle only when TUF metadata, signed by keys the device's
root metadata names, says so. Four roles (python-tuf ``tuf.api.metadata``):

- **root** (offline keys, threshold): names the keys of every role. Its private
  keys are written once to a folder the operator moves off the server
  (``root-keys-OFFLINE``); they are needed only to rotate keys.
- **targets** (online): lists every bundle as a target
  ``<model>/<version>[/<variant>].ewb`` with its length, sha256 and ``custom``
  = {model, version, variant, hardware_class, rollback}. ``rollback: true``
  appears only on the separate ``….rollback.ewb`` target the control plane signs
  for an operator's deliberate downgrade.
- **snapshot** / **timestamp** (online): pin the current versions (freshness).

Consistent snapshots: metadata is published as ``{version}.{role}.json`` (and
the timestamp as ``timestamp.json``), targets as ``{dir}/{sha256}.{name}``,
so a client never mixes files from two repository states.

Online keys live in a :class:`~edgewise.security.keystore.Keystore` (files
0600 under ``<repo>/keys`` by default, or a PKCS#11 token); root keys in a
``FileKeystore`` folder per key set. Every change takes an exclusive file lock
and re-reads the metadata from disk, so ``edgewise tuf rotate`` can run while
the control plane serves and adds targets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signature, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from ..fsutil import atomic_write
from .keystore import FileKeystore, Keystore, KeystoreError

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
ROLES = ("root", *ONLINE_ROLES)
ROLLBACK_SUFFIX = ".rollback"
KEEP_VERSIONS = 20  # old consistent snapshot/targets files kept for clients mid-update
METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?(root|timestamp|snapshot|targets)\.json$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class TufRepoError(RuntimeError):
    """The repository cannot do what was asked; the message says what is missing and what to do."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid. The control plane renews online roles at half-life."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        return getattr(self, role)


def target_name(model: str, version: str, variant: str | None = None, *, rollback: bool = False) -> str:
    """The TUF target path of a bundle: ``<model>/<version>[/<variant>].ewb`` (``.rollback.ewb`` for a signed downgrade)."""
    for what, part in (("model", model), ("version", version), ("variant", variant)):
        if part is not None and not _PART.match(part):
            raise TufRepoError(f"{what} {part!r} cannot be part of a TUF target name (letters, digits, . _ + -)")
    base = f"{model}/{version}" + (f"/{variant}" if variant else "")
    return base + (ROLLBACK_SUFFIX if rollback else "") + ".ewb"


class KeystoreSigner(Signer):
    """A securesystemslib ``Signer`` over an edgewise keystore label (files or PKCS#11): ed25519 only."""

    def __init__(self, keystore: Keystore, label: str, public_key: SSlibKey) -> None:
        self._keystore = keystore
        self._label = label
        self._public_key = public_key

    @property
    def public_key(self) -> SSlibKey:
        return self._public_key

    @classmethod
    def from_priv_key_uri(cls, priv_key_uri: str, public_key: Any, secrets_handler: Any = None) -> "KeystoreSigner":  # pragma: no cover
        raise NotImplementedError("open the keystore with edgewise.security.keystore.open_keystore instead")

    def sign(self, payload: bytes) -> Signature:
        return Signature(self._public_key.keyid, self._keystore.sign(self._label, payload).hex())


def _new_key(keystore: Keystore, role: str) -> SSlibKey:
    """Create an ed25519 key for ``role`` in ``keystore``; its label is ``<role>-<keyid[:16]>``."""
    tmp = f"{role}-new-{os.urandom(4).hex()}"
    keystore.create_key(tmp, "ed25519")
    key = SSlibKey.from_crypto(keystore.public_key(tmp))  # type: ignore[arg-type]
    label = _label(role, key.keyid)
    if isinstance(keystore, FileKeystore):
        os.replace(keystore._path(tmp), keystore._path(label))
    else:  # backends without rename: create under the final label (key id is only known afterwards)
        raise TufRepoError(f"{keystore.url}: TUF keys are created in file keystores only; create {label} by hand")
    return key


def _label(role: str, keyid: str) -> str:
    return f"{role}-{keyid[:16]}"


class TufRepository:
    """One TUF repository in a directory: ``metadata/`` (published), ``targets/`` (published), ``keys/`` (online keys)."""

    def __init__(
        self,
        path: Path | str,
        *,
        online_keys: Keystore | None = None,
        expiry: Expiry | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.online_keys: Keystore = online_keys or FileKeystore(self.path / "keys")
        self.expiry = expiry or Expiry()
        self.clock = clock
        self._thread_lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return (self.metadata_dir / "1.root.json").is_file()

    def init(self, root_keys_dir: Path | str, *, root_keys: int = 1, threshold: int = 1) -> Path:
        """Create keys and version 1 of every role. Root private keys go to ``root_keys_dir`` (move it offline)."""
        if not 1 <= threshold <= root_keys:
            raise TufRepoError(f"root threshold {threshold} must be between 1 and the number of root keys ({root_keys})")
        with self._locked():
            if self.initialized:
                raise TufRepoError(f"{self.path} already holds a TUF repository; use `edgewise tuf status` or rotate keys")
            now = self.clock()
            offline = FileKeystore(Path(root_keys_dir))
            root = Root(expires=now + self.expiry.root, consistent_snapshot=True)
            root_signers = []
            for _ in range(root_keys):
                key = _new_key(offline, "root")
                root.add_key(key, "root")
                root_signers.append(KeystoreSigner(offline, _label("root", key.keyid), key))
            root.roles["root"].threshold = threshold
            for role in ONLINE_ROLES:
                root.add_key(_new_key(self.online_keys, role), role)
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            self.targets_dir.mkdir(parents=True, exist_ok=True)
            root_md = Metadata(root)
            for s in root_signers:
                root_md.sign(s, append=True)
            self._write(root_md)
            targets = Metadata(Targets(expires=now + self.expiry.targets))
            self._sign_online(targets, root)
            self._write(targets)
            self._publish_snapshot(root, now, new=True)
            return Path(root_keys_dir)

    # -- reading ---------------------------------------------------------------------------------

    def load(self, role: str) -> Metadata:
        path = self.metadata_dir / f"{role}.json"
        try:
            return Metadata.from_file(str(path))
        except FileNotFoundError:
            raise TufRepoError(f"{path} is missing: no TUF repository at {self.path}; run `edgewise tuf init`") from None

    def root_bytes(self, version: int = 1) -> bytes:
        """The root metadata devices are provisioned with (version 1 by default: they walk forward from it)."""
        return (self.metadata_dir / f"{version}.root.json").read_bytes()

    def metadata_file(self, name: str) -> Path:
        """The published file for a metadata request (``timestamp.json``, ``3.snapshot.json``, ``2.root.json``)."""
        if not METADATA_NAME.match(name):
            raise FileNotFoundError(f"{name!r} is not a TUF metadata file name")
        path = self.metadata_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"no metadata {name}")
        return path

    def target_file(self, url_path: str) -> Path:
        """The published file for a consistent target URL path ``<dir>/<sha256>.<name>``."""
        parts = url_path.split("/")
        if not url_path or any(p in ("", ".", "..") for p in parts):
            raise FileNotFoundError(f"{url_path!r} is not a target path")
        path = self.targets_dir / url_path
        if not path.is_file():
            raise FileNotFoundError(f"no target file {url_path}")
        return path

    def target_info(self, name: str) -> TargetFile | None:
        return self.load("targets").signed.targets.get(name)

    def target_url_path(self, info: TargetFile) -> str:
        """Where a target is published under ``targets/`` (consistent snapshot naming)."""
        dirname, sep, base = info.path.rpartition("/")
        return f"{dirname}{sep}{info.hashes['sha256']}.{base}"

    def status(self) -> dict[str, Any]:
        """Version, expiry, key ids and threshold of each role; the number of targets."""
        root: Root = self.load("root").signed
        out: dict[str, Any] = {"path": str(self.path), "consistent_snapshot": root.consistent_snapshot, "roles": {}}
        for role in ROLES:
            md = self.load(role)
            out["roles"][role] = {
                "version": md.signed.version,
                "expires": md.signed.expires.isoformat(),
                "keyids": list(root.roles[role].keyids),
                "threshold": root.roles[role].threshold,
                "online": role != "root",
            }
        out["targets"] = len(self.load("targets").signed.targets)
        return out

    # -- targets ---------------------------------------------------------------------------------

    def add_targets(self, entries: Iterable[tuple[str, Path, dict[str, Any]]]) -> int:
        """Publish bundle files as targets (name, file, custom) in one new targets version; return how many changed."""
        entries = list(entries)
        if not entries:
            return 0
        with self._locked():
            root: Root = self.load("root").signed
            targets_md = self.load("targets")
            targets: Targets = targets_md.signed
            changed = 0
            for name, file, custom in entries:
                info = TargetFile.from_file(name, str(file), ["sha256"])
                info.unrecognized_fields["custom"] = dict(custom)
                if targets.targets.get(name) == info:
                    continue
                self._link(Path(file), self.targets_dir / self.target_url_path(info))
                targets.targets[name] = info
                changed += 1
            if changed:
                now = self.clock()
                self._bump(targets_md, now)
                self._sign_online(targets_md, root)
                self._write(targets_md)
                self._publish_snapshot(root, now)
            return changed

    def remove_targets(self, names: Iterable[str]) -> int:
        """Stop listing targets (their files stay for clients mid-download); return how many were removed."""
        with self._locked():
            root: Root = self.load("root").signed
            targets_md = self.load("targets")
            removed = [n for n in names if targets_md.signed.targets.pop(n, None) is not None]
            if removed:
                now = self.clock()
                self._bump(targets_md, now)
                self._sign_online(targets_md, root)
                self._write(targets_md)
                self._publish_snapshot(root, now)
            return len(removed)

    # -- freshness ---------------------------------------------------------------------------------

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign online roles that passed half their lifetime (targets → snapshot → timestamp); return those renewed.

        Run by the control plane's background task, often enough (minutes) that a
        one-day timestamp never lapses while the server runs.
        """
        with self._locked():
            now = now or self.clock()
            root: Root = self.load("root").signed
            renewed: list[str] = []
            targets_md = self.load("targets")
            if self._due(targets_md, "targets", now):
                self._bump(targets_md, now)
                self._sign_online(targets_md, root)
                self._write(targets_md)
                renewed.append("targets")
            snapshot_due = bool(renewed) or self._due(self.load("snapshot"), "snapshot", now)
            timestamp_due = snapshot_due or self._due(self.load("timestamp"), "timestamp", now)
            if snapshot_due:
                self._publish_snapshot(root, now)
                renewed += ["snapshot", "timestamp"]
            elif timestamp_due:
                self._publish_timestamp(root, now)
                renewed.append("timestamp")
            return renewed

    def _due(self, md: Metadata, role: str, now: datetime) -> bool:
        return md.signed.expires - now < self.expiry.of(role) / 2

    # -- key rotation ------------------------------------------------------------------------------

    def rotate(
        self,
        role: str,
        root_keys_dirs: Iterable[Path | str],
        *,
        new_root_keys_dir: Path | str | None = None,
        root_keys: int | None = None,
        threshold: int | None = None,
    ) -> dict[str, Any]:
        """Replace ``role``'s key(s): a new root version signed by the old root threshold (and, for root, the new one).

        Online roles get a fresh key in the online keystore and are re-signed at
        once. ``root`` gets ``root_keys`` fresh keys (default: as many as now) in
        ``new_root_keys_dir`` with ``threshold`` (default: unchanged). Devices
        follow the chain of root versions on their next update check.
        """
        if role not in ROLES:
            raise TufRepoError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        dirs = [Path(d) for d in root_keys_dirs]
        with self._locked():
            now = self.clock()
            old_md = self.load("root")
            old: Root = old_md.signed
            new_md = Metadata.from_bytes(old_md.to_bytes())
            new: Root = new_md.signed
            new.version += 1
            new.expires = now + self.expiry.root
            new_signers: list[Signer] = []
            if role == "root":
                if new_root_keys_dir is None:
                    raise TufRepoError("rotating root needs a folder for the new root keys (--new-root-keys DIR)")
                count = root_keys or len(old.roles["root"].keyids)
                want = threshold or old.roles["root"].threshold
                if not 1 <= want <= count:
                    raise TufRepoError(f"root threshold {want} must be between 1 and the number of root keys ({count})")
                for kid in list(new.roles["root"].keyids):
                    new.revoke_key(kid, "root")
                offline = FileKeystore(Path(new_root_keys_dir))
                for _ in range(count):
                    key = _new_key(offline, "root")
                    new.add_key(key, "root")
                    new_signers.append(KeystoreSigner(offline, _label("root", key.keyid), key))
                new.roles["root"].threshold = want
            else:
                if threshold is not None:
                    new.roles[role].threshold = threshold
                for kid in list(new.roles[role].keyids):
                    new.revoke_key(kid, role)
                for _ in range(new.roles[role].threshold):
                    new.add_key(_new_key(self.online_keys, role), role)
            old_signers = self._root_signers(old, dirs)
            for s in old_signers:
                new_md.sign(s, append=True)
            if role != "root":
                new_signers = self._root_signers(new, dirs)
            for s in new_signers:
                if s.public_key.keyid not in new_md.signatures:
                    new_md.sign(s, append=True)
            old.verify_delegate("root", new_md.signed_bytes, new_md.signatures)
            new.verify_delegate("root", new_md.signed_bytes, new_md.signatures)
            self._write(new_md)
            if role in ("root", "targets"):
                targets_md = self.load("targets")
                self._bump(targets_md, now)
                self._sign_online(targets_md, new)
                self._write(targets_md)
            self._publish_snapshot(new, now)
            if role != "root" and isinstance(self.online_keys, FileKeystore):
                for kid in old.roles[role].keyids:  # a retired (maybe compromised) key must not sign again
                    if kid not in new.roles[role].keyids:
                        self.online_keys._path(_label(role, kid)).unlink(missing_ok=True)
            return {"role": role, "root_version": new.version, "keyids": list(new.roles[role].keyids)}

    def _root_signers(self, root: Root, dirs: list[Path]) -> list[Signer]:
        """Signers for at least the root threshold of ``root``'s keys, found in ``dirs``."""
        signers: list[Signer] = []
        for kid in root.roles["root"].keyids:
            for d in dirs:
                ks = FileKeystore(d)
                if ks.has_key(_label("root", kid)):
                    signers.append(KeystoreSigner(ks, _label("root", kid), root.get_key(kid)))  # type: ignore[arg-type]
                    break
        need = root.roles["root"].threshold
        if len(signers) < need:
            where = ", ".join(str(d) for d in dirs) or "(none given)"
            raise TufRepoError(
                f"signing root version {root.version} needs {need} of its {len(root.roles['root'].keyids)} root keys; "
                f"found {len(signers)} in {where}. Bring the offline root key folder(s) back and pass them with --root-keys"
            )
        return signers

    # -- internals ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _bump(self, md: Metadata, now: datetime) -> None:
        md.signed.version += 1
        md.signed.expires = now + self.expiry.of(md.signed.type)

    def _sign_online(self, md: Metadata, root: Root) -> None:
        """Sign with every online key the root names for this role (threshold of them must be in the keystore)."""
        role = md.signed.type
        md.signatures.clear()
        for kid in root.roles[role].keyids:
            label = _label(role, kid)
            if not self.online_keys.has_key(label):
                continue
            md.sign(KeystoreSigner(self.online_keys, label, root.get_key(kid)), append=True)  # type: ignore[arg-type]
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            raise TufRepoError(
                f"the online keystore {self.online_keys.url} lacks the {role} key(s) root version {root.version} names; "
                f"restore them or rotate the role: edgewise tuf rotate --role {role}"
            ) from None

    def _publish_snapshot(self, root: Root, now: datetime, *, new: bool = False) -> None:
        targets_md = self.load("targets")
        targets_bytes = (self.metadata_dir / f"{targets_md.signed.version}.targets.json").read_bytes()
        if new:
            snapshot_md = Metadata(Snapshot(expires=now + self.expiry.snapshot))
        else:
            snapshot_md = self.load("snapshot")
            self._bump(snapshot_md, now)
        snapshot_md.signed.meta["targets.json"] = MetaFile(version=targets_md.signed.version, length=len(targets_bytes))
        self._sign_online(snapshot_md, root)
        self._write(snapshot_md)
        self._publish_timestamp(root, now, new=new)

    def _publish_timestamp(self, root: Root, now: datetime, *, new: bool = False) -> None:
        snapshot_md = self.load("snapshot")
        snapshot_bytes = (self.metadata_dir / f"{snapshot_md.signed.version}.snapshot.json").read_bytes()
        meta = MetaFile(version=snapshot_md.signed.version, length=len(snapshot_bytes))
        if new:
            ts_md = Metadata(Timestamp(expires=now + self.expiry.timestamp, snapshot_meta=meta))
        else:
            ts_md = self.load("timestamp")
            self._bump(ts_md, now)
            ts_md.signed.snapshot_meta = meta
        self._sign_online(ts_md, root)
        self._write(ts_md)

    def _write(self, md: Metadata) -> None:
        role = md.signed.type
        data = md.to_bytes(JSONSerializer(compact=False))
        if role != "timestamp":
            atomic_write(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        atomic_write(self.metadata_dir / f"{role}.json", data)
        if role in ("snapshot", "targets"):
            old = md.signed.version - KEEP_VERSIONS
            if old > 0:
                (self.metadata_dir / f"{old}.{role}.json").unlink(missing_ok=True)

    @staticmethod
    def _link(src: Path, dest: Path) -> None:
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # same filesystem: no copy of a large bundle
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)


def open_repository(path: Path | str, *, online_keys: str | None = None, **kwargs: Any) -> TufRepository:
    """A repository at ``path`` whose online keys are in the keystore URL ``online_keys`` (default ``<path>/keys``)."""
    keystore = None
    if online_keys:
        from .keystore import open_keystore

        keystore = open_keystore(online_keys)
    return TufRepository(path, online_keys=keystore, **kwargs)


__all__ = [
    "Expiry", "KeystoreError", "KeystoreSigner", "TufRepoError", "TufRepository", "ROLES", "ONLINE_ROLES",
    "open_repository", "target_name", "utcnow",
]
