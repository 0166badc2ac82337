"""Signed agent releases (``.ewr``): the agent's own code as one file a device can verify.

A release is built on a workstation, like a bundle, and uses the same container
(:mod:`edgewise.bundle.format`): a stored ZIP whose last 86 bytes are an Ed25519
signature block over sha256 of every byte before it. Members::

    release.json                       the manifest (below), first member
    wheel/edgewise-X.Y.Z-py3-none-any.whl   the agent package, exactly as pip built it

The manifest lists every file the installed package will contain (the wheel's
members: installing a pure-Python wheel is unpacking it) with its sha256 and
size, so a device can check its installed files against it at every start
(:mod:`edgewise.agent.integrity`). The signed message starts with its own
domain string, so a *bundle* signature can never be replayed as a *release*
signature (and the other way round), even though the same keys sign both.

As a TUF target, a release is the ``.ewr`` file (length + sha256) with
``custom = {"kind": "agent-release", "version": ...}`` (:meth:`ReleaseManifest.tuf_custom`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from email.parser import HeaderParser
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..security.keys import Signer, TrustedKeys
from . import format as fmt
from .errors import BundleFormatError, BundleManifestError, BundleMemberError, BundleSignatureError
from .manifest import check_semver

RELEASE_FORMAT = "edgewise-agent-release/1"
RELEASE_DOMAIN = b"edgewise-agent-release/1\n"  # never equal to fmt.DOMAIN: a bundle signature is not a release signature
MANIFEST_MEMBER = "release.json"
WHEEL_DIR = "wheel/"
PACKAGE = "edgewise"
MAX_MANIFEST_BYTES = 4 * 2**20  # a hostile file must not make the device parse gigabytes of JSON
MAX_RELEASE_BYTES = 256 * 2**20
_SHA256_RE = r"^[0-9a-f]{64}$"


class ReleaseError(ValueError):
    """A release that must not be installed or run. The message names what failed and what to do."""


class ReleaseSignatureError(ReleaseError, BundleSignatureError):
    """Unsigned, signed by an untrusted key, or altered after signing."""


class ReleaseContentError(ReleaseError, BundleMemberError):
    """The manifest or the wheel does not match what was signed or is not a usable agent release."""


class ReleaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=_SHA256_RE)
    size: int = Field(ge=0)


class ReleaseManifest(BaseModel):
    """What a signed agent release holds; ``files`` is what the installed env must contain, exactly."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal["edgewise-agent-release/1"] = RELEASE_FORMAT
    kind: Literal["agent-release"] = "agent-release"
    name: Literal["edgewise"] = PACKAGE
    version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))
    requires_python: str | None = None
    requires: list[str] = Field(default_factory=list, description="Requires-Dist of the wheel (base extras only): the base environment must provide them.")
    wheel: str = Field(description="Member name of the wheel inside the release.")
    wheel_sha256: str = Field(pattern=_SHA256_RE)
    wheel_size: int = Field(ge=0)
    files: dict[str, ReleaseFile] = Field(description="Path relative to the env's site dir -> sha256/size; every installed file.")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return check_semver(v)

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, ReleaseFile]) -> dict[str, ReleaseFile]:
        for name in v:
            safe_relpath(name)
        if not any(n.startswith(f"{PACKAGE}/") for n in v):
            raise ValueError(f"the release holds no {PACKAGE}/ package files")
        return v

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True).encode() + b"\n"

    def tuf_custom(self) -> dict[str, str]:
        """The ``custom`` field of this release as a TUF target."""
        return {"kind": self.kind, "version": self.version}


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose signature, manifest and wheel checked out (``sha256``/``size`` are the whole file's)."""

    path: Path
    manifest: ReleaseManifest
    key_id: str
    sha256: str
    size: int

    @property
    def version(self) -> str:
        return self.manifest.version

    def tuf_target(self) -> dict[str, object]:
        """``length``/``hashes``/``custom`` as a TUF targets entry would carry them."""
        return {"length": self.size, "hashes": {"sha256": self.sha256}, "custom": self.manifest.tuf_custom()}


def safe_relpath(name: str) -> str:
    """Refuse absolute paths, ``..`` and backslashes: an archive must not write outside its env."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise ValueError(f"unsafe file name {name!r} in the release (absolute, '..', empty part or backslash)")
    return name


# -- building (workstation) ----------------------------------------------------------------------

def build_wheel(source: Path, out_dir: Path) -> Path:
    """Build the edgewise wheel from a source tree, offline (no build isolation, no dependency download).

    The tree is copied first (pyproject.toml, README, src/) so the build writes its
    ``build/`` and ``*.egg-info`` leftovers into a temporary folder, never the checkout.
    """
    source = Path(source)
    if not (source / "pyproject.toml").is_file() or not (source / "src" / PACKAGE / "__init__.py").is_file():
        raise ReleaseError(f"{source} is not an edgewise source tree (needs pyproject.toml and src/{PACKAGE}/); pass --source DIR or --wheel FILE")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgewise-release-src-") as tmp:
        tree = Path(tmp) / "src-tree"
        tree.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (source / name).is_file():
                shutil.copy2(source / name, tree / name)
        shutil.copytree(source / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        wheels = Path(tmp) / "dist"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(tree)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise ReleaseError(f"building the wheel failed (pip exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        built = sorted(wheels.glob(f"{PACKAGE}-*.whl"))
        if len(built) != 1:
            raise ReleaseError(f"expected one {PACKAGE} wheel from pip, found {[p.name for p in built]}")
        dest = out_dir / built[0].name
        shutil.copy2(built[0], dest)
    return dest


def _requirements(metadata: str) -> list[str]:
    """Requires-Dist lines that apply without extras (the device installs the base package only)."""
    msg = HeaderParser().parsestr(metadata)
    return [r.strip() for r in msg.get_all("Requires-Dist") or [] if "extra ==" not in r.replace('"', "").replace("'", "")]


def describe_wheel(wheel: Path | bytes) -> tuple[str, str | None, list[str], dict[str, ReleaseFile]]:
    """(version, requires_python, requires, files) of an edgewise wheel, checked against its own RECORD."""
    data = Path(wheel).read_bytes() if isinstance(wheel, (str, Path)) else bytes(wheel)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ReleaseError(f"not a wheel: {exc}") from None
    with zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        dist_infos = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        if len(dist_infos) != 1:
            raise ReleaseError(f"a wheel has exactly one .dist-info folder; this one has {sorted(dist_infos)}")
        dist_info = dist_infos.pop()
        meta = zf.read(f"{dist_info}/METADATA").decode("utf-8")
        msg = HeaderParser().parsestr(meta)
        if (msg.get("Name") or "").lower() != PACKAGE:
            raise ReleaseError(f"the wheel is {msg.get('Name')!r}, not {PACKAGE!r}: an agent release carries the edgewise package")
        version = check_semver(str(msg.get("Version")))
        wheel_info = zf.read(f"{dist_info}/WHEEL").decode("utf-8")
        if "Root-Is-Purelib: true" not in wheel_info:
            raise ReleaseError("the wheel is not pure Python (Root-Is-Purelib is not true); agent releases carry Python code only")
        files: dict[str, ReleaseFile] = {}
        for name in sorted(names):
            try:
                safe_relpath(name)
            except ValueError as exc:
                raise ReleaseError(str(exc)) from None
            if ".data/" in name.split("/", 1)[0] + "/":
                raise ReleaseError(f"the wheel has a .data member {name!r} (scripts/headers); agent releases carry the package only")
            content = zf.read(name)
            files[name] = ReleaseFile(sha256=hashlib.sha256(content).hexdigest(), size=len(content))
        # RECORD is pip's own list; a wheel whose RECORD disagrees with its members was tampered with or broken.
        for line in zf.read(f"{dist_info}/RECORD").decode("utf-8").splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) != 3 or not parts[1]:
                continue
            algo, _, b64 = parts[1].partition("=")
            got = files.get(parts[0])
            if algo == "sha256" and got is not None:
                if base64.urlsafe_b64encode(bytes.fromhex(got.sha256)).rstrip(b"=").decode() != b64:
                    raise ReleaseError(f"wheel member {parts[0]} does not match the wheel's RECORD")
    return version, msg.get("Requires-Python"), _requirements(meta), files


def build_release(wheel: Path, *, signer: Signer, out: Path, created_at: datetime | None = None) -> ReleaseManifest:
    """Write a signed ``.ewr`` holding ``wheel`` and its manifest to ``out`` (atomically); return the manifest."""
    wheel = Path(wheel)
    data = wheel.read_bytes()
    version, requires_python, requires, files = describe_wheel(data)
    fields: dict[str, object] = dict(
        version=version, requires_python=requires_python, requires=requires, wheel=WHEEL_DIR + wheel.name,
        wheel_sha256=hashlib.sha256(data).hexdigest(), wheel_size=len(data), files=files,
    )
    if created_at is not None:
        fields["created_at"] = created_at
    manifest = ReleaseManifest.model_validate(fields)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(fmt.zipinfo(MANIFEST_MEMBER), manifest.to_bytes())
                zf.writestr(fmt.zipinfo(manifest.wheel), data)
                zf.comment = b"\0" * fmt.BLOCK_LEN
            size = f.seek(0, os.SEEK_END)
            digest = fmt.hash_prefix(f, size - fmt.BLOCK_LEN)
            f.seek(size - fmt.BLOCK_LEN)
            f.write(fmt.pack_block(signer.key_id, signer.sign(RELEASE_DOMAIN + digest)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


# -- verifying (device and workstation) ------------------------------------------------------------

def _check_signature(path: Path, trusted: TrustedKeys) -> tuple[str, str, int]:
    """(key id, sha256 of the whole file, size); raises unless a trusted key signed every byte."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ReleaseError(f"cannot open release {path}: {exc.strerror}") from None
    with f:
        size = f.seek(0, os.SEEK_END)
        if size > MAX_RELEASE_BYTES:
            raise ReleaseContentError(f"{path.name}: {size} bytes is more than a release may be ({MAX_RELEASE_BYTES}); refusing to read it")
        if size < fmt.BLOCK_LEN + fmt.EOCD_LEN:
            raise BundleFormatError(f"{path.name}: {size} bytes is too short to be an agent release")
        f.seek(size - fmt.BLOCK_LEN)
        parsed = fmt.unpack_block(f.read(fmt.BLOCK_LEN))
        if parsed is None or fmt.comment_length_field(f, size) != fmt.BLOCK_LEN:
            raise ReleaseSignatureError(f"{path.name}: no edgewise signature block at the end (unsigned or truncated); build it with `edgewise agent-release build --key`")
        digest = fmt.hash_prefix(f, size - fmt.BLOCK_LEN)
        whole = hashlib.sha256()
        f.seek(0)
        while chunk := f.read(fmt.CHUNK):
            whole.update(chunk)
    kid, sig = parsed
    if kid not in trusted:
        raise ReleaseSignatureError(
            f"{path.name}: signed by key {kid}, which is not trusted (trusted: {', '.join(trusted.ids) or 'none'}); "
            "put the release signing key's .pub in the device's trust directory"
        )
    if not trusted.verify(kid, sig, RELEASE_DOMAIN + digest):
        raise ReleaseSignatureError(f"{path.name}: the signature of key {kid} does not match: the file was altered after signing (or it is a bundle, not a release)")
    return kid, whole.hexdigest(), size


def verify_release(path: Path | str, trusted: TrustedKeys) -> VerifiedRelease:
    """Check signature, manifest and wheel (every member against the manifest); nothing is unpacked."""
    path = Path(path)
    kid, sha, size = _check_signature(path, trusted)
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:
        raise BundleFormatError(f"{path.name}: not a readable release archive ({exc})") from None
    with zf:
        try:
            info = zf.getinfo(MANIFEST_MEMBER)
        except KeyError:
            raise ReleaseContentError(f"{path.name}: {MANIFEST_MEMBER} is missing") from None
        if info.file_size > MAX_MANIFEST_BYTES:
            raise ReleaseContentError(f"{path.name}: {MANIFEST_MEMBER} is {info.file_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            manifest = ReleaseManifest.model_validate(json.loads(zf.read(MANIFEST_MEMBER)))
        except (ValidationError, ValueError) as exc:
            raise BundleManifestError(f"{path.name}: {MANIFEST_MEMBER} is not a valid release manifest: {exc}") from None
        members = {i.filename for i in zf.infolist()}
        if members != {MANIFEST_MEMBER, manifest.wheel}:
            raise ReleaseContentError(f"{path.name}: members {sorted(members)} differ from {MANIFEST_MEMBER} and {manifest.wheel}")
        wheel = zf.read(manifest.wheel)
    if hashlib.sha256(wheel).hexdigest() != manifest.wheel_sha256 or len(wheel) != manifest.wheel_size:
        raise ReleaseContentError(f"{path.name}: {manifest.wheel} does not match the sha256/size in {MANIFEST_MEMBER}")
    try:
        version, _, _, files = describe_wheel(wheel)
    except ReleaseError as exc:
        raise ReleaseContentError(f"{path.name}: {exc}") from None
    if version != manifest.version:
        raise ReleaseContentError(f"{path.name}: the wheel is version {version} but {MANIFEST_MEMBER} says {manifest.version}")
    if files != manifest.files:
        diff = sorted(set(files) ^ set(manifest.files)) or sorted(n for n in files if files[n] != manifest.files.get(n))
        raise ReleaseContentError(f"{path.name}: the wheel's files differ from {MANIFEST_MEMBER} (first: {diff[:3]})")
    return VerifiedRelease(path=path, manifest=manifest, key_id=kid, sha256=sha, size=size)


def read_wheel(release: VerifiedRelease) -> bytes:
    """The wheel bytes, re-checked against the verified manifest (the file may have changed since)."""
    with zipfile.ZipFile(release.path) as zf:
        data = zf.read(release.manifest.wheel)
    if hashlib.sha256(data).hexdigest() != release.manifest.wheel_sha256:
        raise ReleaseContentError(f"{release.path.name}: the wheel changed after verification; fetch the release again")
    return data


_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_names(requires: list[str]) -> list[str]:
    """Distribution names of Requires-Dist lines (``onnxruntime==1.32.0`` -> ``onnxruntime``)."""
    return [m.group(1) for r in requires if (m := _NAME_RE.match(r))]
