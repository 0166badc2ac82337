"""The agent's side of TUF: which bundle may be installed, by signed metadata (``tuf.ngclient.Updater``).

The device's trust anchor is ``state/trust/root.json`` (installed at
provisioning). Before an install the agent refreshes the TUF metadata
(root → timestamp → snapshot → targets, every check of the TUF client workflow:
signatures and thresholds, versions never going back, expiry, lengths) and
looks up the target the desired state names. The bundle itself is downloaded by
the agent's resumable ``HttpFetcher`` and must match the target's length and
sha256. TUF gates *installs* only: nothing here runs when the committed model
loads, so expired metadata or an unreachable repository never stop serving.

Errors come back as :class:`TufUpdateError` whose ``kind`` names the attack
class the failed check defends against (rollback, freeze, mix-and-match,
signature threshold, endless data, ...), for the update result an operator reads.
"""

from __future__ import annotations

import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from .updater import TufUpdateError

log = logging.getLogger("edgewise.agent.tuf")

ROOT_FILE = "root.json"
METADATA_PATH = "/api/v1/tuf/metadata/"
TARGETS_PATH = "/api/v1/tuf/targets/"
READ_CHUNK = 64 * 1024


class HeaderFetcher(FetcherInterface):
    """ngclient's transport over urllib, sending the agent's headers (user agent, device bearer token).

    ngclient passes the byte limit to ``download_file`` and stops reading past it,
    so an endless response costs at most the limit plus one chunk.
    """

    def __init__(self, headers: Callable[[], dict[str, str]], *, timeout: float = 30.0) -> None:
        self._headers = headers
        self.timeout = timeout

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=self._headers()), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {exc.code} {exc.reason}", exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            raise tuf_exc.DownloadError(f"cannot reach {url}: {getattr(exc, 'reason', None) or exc}") from None
        return self._chunks(url, resp)

    def _chunks(self, url: str, resp: "http.client.HTTPResponse") -> Iterator[bytes]:
        with resp:
            while True:
                try:
                    chunk = resp.read(READ_CHUNK)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise tuf_exc.DownloadError(f"{url}: download interrupted ({type(exc).__name__})") from None
                if not chunk:
                    return
                yield chunk


def classify(exc: BaseException) -> TufUpdateError:
    """Map a python-tuf error to the attack class its check defends against (for a clear update result)."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return TufUpdateError("freeze", f"expired TUF metadata ({msg}): freeze attack, or the repository stopped refreshing; "
                              "the control plane re-signs timestamp/snapshot in the background, check that it runs and the device clock")
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        if "must be >=" in msg:
            return TufUpdateError("rollback", f"rollback attack: the repository served older metadata than this device trusts ({msg})")
        return TufUpdateError("mix-and-match", f"mix-and-match or replayed metadata: versions that do not belong together ({msg})")
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return TufUpdateError("mix-and-match", f"mix-and-match or replayed metadata: a file does not match what its signed parent records ({msg})")
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return TufUpdateError("signature", f"TUF signature threshold not met: metadata signed by an unknown/foreign key or by too few keys ({msg})")
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return TufUpdateError("endless-data", f"endless data: the repository sent more than the allowed length; stopped at the limit ({msg})")
    if isinstance(exc, tuf_exc.DownloadError):
        return TufUpdateError("unreachable", f"TUF repository unreachable ({msg}); the committed model keeps serving, retrying later")
    if isinstance(exc, tuf_exc.RepositoryError):
        return TufUpdateError("invalid", f"invalid TUF metadata ({type(exc).__name__}: {msg})")
    if isinstance(exc, OSError):
        return TufUpdateError("local", f"cannot write the TUF metadata cache: {exc}")
    return TufUpdateError("invalid", f"TUF metadata check failed ({type(exc).__name__}: {msg})")


class TufClient:
    """Looks up and checks targets against the repository at ``server_url``, anchored in ``root_path``.

    ``cache_dir`` holds the metadata already trusted (ngclient's local cache:
    what makes a replayed older version detectable). ``clock`` fakes "now" for
    expiry checks (tests); default: the system clock.
    """

    def __init__(
        self,
        root_path: Path,
        cache_dir: Path,
        server_url: str,
        *,
        headers: Callable[[], dict[str, str]] = dict,
        timeout: float = 30.0,
        clock: Callable[[], datetime] | None = None,
        config: UpdaterConfig | None = None,
        metadata_path: str = METADATA_PATH,
        targets_path: str = TARGETS_PATH,
    ) -> None:
        self.root_path = Path(root_path)
        self.cache_dir = Path(cache_dir)
        base = server_url.rstrip("/")
        self.metadata_url = base + metadata_path
        self.targets_url = base + targets_path
        self.targets_path = targets_path
        self.fetcher = HeaderFetcher(headers, timeout=timeout)
        self.clock = clock
        self.config = config or UpdaterConfig(timestamp_max_length=16 * 1024, root_max_length=256 * 1024)

    def _updater(self) -> Updater:
        try:
            bootstrap = self.root_path.read_bytes()
        except OSError as exc:
            raise TufUpdateError("no-root", f"cannot read the trusted TUF root {self.root_path}: {exc.strerror or exc}; "
                                 "install it (edgewise agent --tuf-root FILE)", retryable=False) from None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            updater = Updater(str(self.cache_dir), self.metadata_url, fetcher=self.fetcher, config=self.config, bootstrap=bootstrap)
        except (tuf_exc.RepositoryError, ValueError) as exc:
            raise TufUpdateError("no-root", f"the trusted TUF root {self.root_path} is not valid root metadata: {exc}", retryable=False) from None
        if self.clock is not None:
            # ngclient fixes "now" when it builds its trusted set; expiry checks happen in refresh(), after this.
            updater._trusted_set.reference_time = self.clock()
        return updater

    def target_info(self, name: str) -> TargetFile:
        """Refresh the metadata and return the signed info of target ``name``; raise :class:`TufUpdateError`."""
        updater = self._updater()
        try:
            updater.refresh()
            info = updater.get_targetinfo(name)
        except TufUpdateError:
            raise
        except Exception as exc:  # python-tuf raises its own types; each means "do not install"
            err = classify(exc)
            log.warning("TUF refused target %s: %s", name, err)
            raise err from None
        if info is None:
            raise TufUpdateError("unknown-target", f"the signed TUF targets list has no target {name!r}; "
                                 "upload the bundle to the control plane (it registers the target) and deploy again", retryable=False)
        if "sha256" not in info.hashes:
            raise TufUpdateError("invalid", f"TUF target {name} carries no sha256; the repository must list sha256 hashes", retryable=False)
        return info

    def target_url(self, info: TargetFile) -> str:
        """The target's download URL on the control plane (consistent snapshot name: ``dir/<sha256>.<file>``)."""
        dirname, sep, base = info.path.rpartition("/")
        return self.targets_url + quote(f"{dirname}{sep}{info.hashes['sha256']}.{base}")



def verify_target_file(info: TargetFile, path: Path) -> None:
    """The downloaded file has exactly the target's length and hashes; raise :class:`TufUpdateError` otherwise."""
    try:
        with open(path, "rb") as f:
            info.verify_length_and_hashes(f)
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise TufUpdateError("target-mismatch", f"the downloaded file is not TUF target {info.path}: {exc}; "
                             "a mirror or peer served other bytes under its name") from None


def install_root(source: Path | str, dest: Path) -> None:
    """Install ``source`` as the device's trusted TUF root (provisioning). Refuses a file that is not root metadata.

    The root is self-signed: it is checked against its own keys and threshold, so a
    truncated or edited file is caught here rather than at the first update.
    """
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    install_root_bytes(data, dest)


def install_root_bytes(data: bytes, dest: Path) -> None:
    """``install_root`` for root metadata already in memory (e.g. received at enrollment)."""
    from tuf.api.metadata import Metadata, Root

    try:
        md = Metadata[Root].from_bytes(data)
        if md.signed.type != "root":
            raise ValueError(f"it holds {md.signed.type} metadata, not root")
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    except Exception as exc:  # deserialization or signature errors from python-tuf
        raise ValueError(f"not valid, self-signed TUF root metadata ({type(exc).__name__}: {exc}); copy "
                         "<data-dir>/tuf/metadata/1.root.json from the control plane") from None
    from ..fsutil import atomic_write

    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, data)


__all__ = ["install_root", "install_root_bytes", "HeaderFetcher", "TufClient", "TufUpdateError", "classify", "verify_target_file"]
