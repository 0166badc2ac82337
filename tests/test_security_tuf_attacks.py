"""The TUF attack suite: a hostile repository or mirror over real HTTP against the real agent update path.

Each test: the device runs digits 1.0.0 (installed through TUF), the repository publishes 1.1.0,
an attacker interferes; the install is refused with a reason naming the attack class and
1.0.0 keeps serving.
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgewise.bundle import build_bundle
from edgewise.lab.demo_model import LABELS, PREPROCESSING
from edgewise.protocol import DesiredState
from edgewise.security import generate_keypair, load_signer
from edgewise.security.tuf_repo import TufRepository, target_name, utcnow
from test_agent_support import make_agent

META = "/api/v1/tuf/metadata/"
TARGETS = "/api/v1/tuf/targets/"


class HostileServer:
    """Serves a TUF repository directory over HTTP; ``override`` replaces any URL path with bytes or an endless stream."""

    def __init__(self, repo: TufRepository) -> None:
        self.repo = repo
        self.override: dict[str, bytes | Callable[[], bytes]] = {}
        self.endless: set[str] = set()
        self.sent: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path in outer.endless:
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: data until the client hangs up
                    sent = 0
                    try:
                        while sent < 200 * 2**20:
                            self.wfile.write(b"\x00" * 65536)
                            sent += 65536
                    except OSError:
                        pass
                    outer.sent[path] = sent
                    return
                data = outer.override.get(path)
                if callable(data):
                    data = data()
                if data is None:
                    file = None
                    if path.startswith(META):
                        file = outer.repo.metadata_dir / path[len(META):]
                    elif path.startswith(TARGETS):
                        file = outer.repo.targets_dir / path[len(TARGETS):]
                    if file is None or not file.is_file():
                        self.send_error(404)
                        return
                    data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _custom(version: str, **extra: Any) -> dict[str, Any]:
    return {"model": "digits", "version": version, "variant": None, "hardware_class": None, **extra}


@pytest.fixture
def world(tmp_path, keys_dir, bundles):
    """A repository with 1.0.0, a device that installed it through TUF, then 1.1.0 published."""
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "root-keys", root_keys=3, threshold=2)
    repo.add_targets([(target_name("digits", "1.0.0"), bundles["1.0.0"], _custom("1.0.0"))])
    server = HostileServer(repo)
    state = tmp_path / "dev"
    (state / "trust").mkdir(parents=True)
    shutil.copy(repo.metadata_dir / "1.root.json", state / "trust" / "root.json")
    agent = make_agent(state, keys_dir, device_id=f"tuf-{tmp_path.name[-12:]}", server_url=server.base_url, update_trust="tuf")
    assert agent.updater.tuf is not None
    result = agent.updater.apply(desired("1.0.0", 1))
    assert result.result == "ok", result.reason
    old_versions = {role: repo.load(role).signed.version for role in ("timestamp", "snapshot", "targets")}
    old_bytes = {role: (repo.metadata_dir / f"{role}.json").read_bytes() for role in ("timestamp", "snapshot", "targets")}
    repo.add_targets([(target_name("digits", "1.1.0"), bundles["1.1.0"], _custom("1.1.0"))])
    w = type("World", (), {})()
    w.repo, w.server, w.agent, w.old_versions, w.old_bytes, w.tmp = repo, server, agent, old_versions, old_bytes, tmp_path
    w.root_keys = tmp_path / "root-keys"
    yield w
    agent.stop()
    server.close()


def desired(version: str, generation: int, *, target: str | None = None, rollback: bool = False, url: str | None = None) -> DesiredState:
    from edgewise.protocol import ArtifactRef

    artifact = ArtifactRef(url=url, sha256="0" * 64, size=1) if url else None  # unsigned hints: TUF's values win
    return DesiredState(
        device_id="x", generation=generation, model="digits", version=version,
        target=target or target_name("digits", version), rollback=rollback, artifact=artifact,
    )


def refused(w, result, *words: str) -> None:
    assert result.result == "failed", result
    for word in words:
        assert word in result.reason, f"{word!r} not in {result.reason!r}"
    assert w.agent.current_model.version == "1.0.0"  # the committed model keeps serving
    assert w.agent.predict(np.zeros((1, 64), np.float32))


def _url(repo: TufRepository, name: str) -> str:
    info = repo.target_info(name)
    return TARGETS + repo.target_url_path(info)


def test_the_unattacked_update_installs_through_tuf(world):
    result = world.agent.updater.apply(desired("1.1.0", 2))
    assert result.result == "ok", result.reason
    assert world.agent.current_model.version == "1.1.0"


def test_a_tampered_bundle_is_refused(world, bundles):
    data = bytearray(bundles["1.1.0"].read_bytes())
    data[len(data) // 2] ^= 1
    world.server.override[_url(world.repo, "digits/1.1.0.ewb")] = bytes(data)
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "TUF target digits/1.1.0.ewb", "sha256", "other bytes")


def test_an_endless_bundle_download_stops_at_the_signed_length(world):
    path = _url(world.repo, "digits/1.1.0.ewb")
    world.server.endless.add(path)
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "more than the", "refusing")


def test_endless_timestamp_metadata_stops_at_the_length_limit(world):
    world.server.endless.add(META + "timestamp.json")
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "endless data")


def test_a_replayed_old_timestamp_is_a_rollback_attack(world):
    world.agent.updater.tuf.target_info("digits/1.1.0.ewb")  # the device has seen the current repository state
    world.server.override[META + "timestamp.json"] = world.old_bytes["timestamp"]  # a hostile mirror replays an older one
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "rollback attack")


def test_a_replayed_old_snapshot_is_refused(world):
    snap_v = world.repo.load("snapshot").signed.version
    world.server.override[META + f"{snap_v}.snapshot.json"] = world.old_bytes["snapshot"]
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "replayed metadata")


def test_replayed_old_targets_are_refused(world):
    targets_v = world.repo.load("targets").signed.version
    world.server.override[META + f"{targets_v}.targets.json"] = world.old_bytes["targets"]
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "replayed metadata")


def test_an_expired_timestamp_under_a_faked_clock_is_a_freeze_attack(world):
    world.agent.updater.tuf.clock = lambda: utcnow() + timedelta(days=2)  # the repository stopped signing 2 days ago
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "freeze attack", "expired")


def test_targets_signed_by_a_foreign_key_are_refused(world, bundles):
    targets_v = world.repo.load("targets").signed.version
    md = Metadata.from_bytes((world.repo.metadata_dir / f"{targets_v}.targets.json").read_bytes())
    evil = world.tmp / "evil.ewb"
    evil.write_bytes(bundles["1.0.0"].read_bytes())
    from tuf.api.metadata import TargetFile

    md.signed.targets["digits/1.1.0.ewb"] = TargetFile.from_file("digits/1.1.0.ewb", str(evil), ["sha256"])
    md.signed.targets["digits/1.1.0.ewb"].unrecognized_fields["custom"] = _custom("1.1.0")
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    forged = md.to_bytes(JSONSerializer(compact=True))
    expected = world.repo.load("snapshot").signed.meta["targets.json"].length
    world.server.override[META + f"{targets_v}.targets.json"] = forged + b" " * (expected - len(forged))  # same length
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "signature threshold", "foreign key")


def test_a_root_signed_below_its_threshold_is_refused(world):
    """An attacker with ONE of the three root keys (threshold 2) tries to install a root with its own timestamp key."""
    from securesystemslib.signer import SSlibKey

    from edgewise.security.keystore import FileKeystore
    from edgewise.security.tuf_repo import KeystoreSigner

    root_md = world.repo.load("root")
    new = Metadata.from_bytes(root_md.to_bytes())
    new.signed.version += 1
    evil = CryptoSigner.generate_ed25519()
    for kid in list(new.signed.roles["timestamp"].keyids):
        new.signed.revoke_key(kid, "timestamp")
    new.signed.add_key(evil.public_key, "timestamp")
    kid = root_md.signed.roles["root"].keyids[0]
    ks = FileKeystore(world.root_keys)
    new.signatures.clear()
    new.sign(KeystoreSigner(ks, f"root-{kid[:16]}", root_md.signed.get_key(kid)))  # 1 of the 2 needed
    assert isinstance(root_md.signed.get_key(kid), SSlibKey)
    world.server.override[META + f"{new.signed.version}.root.json"] = new.to_bytes()
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "signature threshold", "too few")


def test_mixed_and_matched_snapshot_and_timestamp_are_refused(world):
    """A mirror answers the current timestamp's snapshot URL with the snapshot of the previous repository state."""
    snap_v = world.repo.load("snapshot").signed.version
    world.server.override[META + f"{snap_v}.snapshot.json"] = (world.repo.metadata_dir / f"{snap_v - 1}.snapshot.json").read_bytes()
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "mix-and-match")


def test_fast_forward_attack_is_recovered_by_rotating_the_timestamp_and_snapshot_keys(world):
    from edgewise.security.tuf_repo import KeystoreSigner

    # The attacker stole the online timestamp key and serves a far-future timestamp version.
    ts = world.repo.load("timestamp")
    root = world.repo.load("root").signed
    kid = root.roles["timestamp"].keyids[0]
    ts.signed.version = 10**6
    ts.signatures.clear()
    ts.sign(KeystoreSigner(world.repo.online_keys, f"timestamp-{kid[:16]}", root.get_key(kid)))
    world.server.override[META + "timestamp.json"] = ts.to_bytes()
    world.agent.updater.tuf.target_info("digits/1.1.0.ewb")  # the device now trusts timestamp v1000000
    world.server.override.clear()
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "rollback attack")  # the real one looks old now
    # Recovery: the operator rotates the timestamp and snapshot keys with the offline root keys.
    world.repo.rotate("timestamp", [world.root_keys])
    world.repo.rotate("snapshot", [world.root_keys])
    result = world.agent.updater.apply(desired("1.1.0", 3))
    assert result.result == "ok", result.reason
    assert world.agent.current_model.version == "1.1.0"


def test_an_unsigned_bundle_listed_by_tuf_is_still_refused(world, digits_models, tmp_path):
    """TUF and the bundle signature are both required: a target whose bundle no trusted key signed is refused."""
    rogue_key = tmp_path / "rogue.key"
    generate_keypair(rogue_key)
    path = tmp_path / "digits-1.2.0.ewb"
    build_bundle(digits_models["mlp"], name="digits", version="1.2.0", signer=load_signer(rogue_key), out=path,
                 labels=LABELS, preprocessing=PREPROCESSING)
    world.repo.add_targets([(target_name("digits", "1.2.0"), path, _custom("1.2.0"))])
    refused(world, world.agent.updater.apply(desired("1.2.0", 2)), "verification failed")


def test_a_mirror_serving_another_file_under_the_target_name_is_refused(world, bundles):
    """The desired state points at a mirror; the mirror serves the (validly signed!) 1.0.0 bundle as 1.1.0."""
    world.server.override["/mirror/digits-1.1.0.ewb"] = bundles["1.0.0"].read_bytes()
    d = desired("1.1.0", 2, url=world.server.base_url + "/mirror/digits-1.1.0.ewb")
    refused(world, world.agent.updater.apply(d), "TUF target digits/1.1.0.ewb")


def test_the_unsigned_rollback_flag_of_the_desired_state_does_not_allow_a_downgrade(world):
    assert world.agent.updater.apply(desired("1.1.0", 2)).result == "ok"
    result = world.agent.updater.apply(desired("1.0.0", 3, rollback=True))  # forged flag, target without rollback
    assert result.result == "failed" and "rollback protection" in result.reason
    assert world.agent.current_model.version == "1.1.0"


def test_a_signed_rollback_target_allows_the_downgrade(world, bundles):
    assert world.agent.updater.apply(desired("1.1.0", 2)).result == "ok"
    name = target_name("digits", "1.0.0", rollback=True)
    world.repo.add_targets([(name, bundles["1.0.0"], _custom("1.0.0", rollback=True))])
    result = world.agent.updater.apply(desired("1.0.0", 3, target=name))
    assert result.result == "ok", result.reason
    assert world.agent.current_model.version == "1.0.0"


def test_an_unreachable_repository_refuses_the_update_and_keeps_serving(world):
    world.server.close()
    refused(world, world.agent.updater.apply(desired("1.1.0", 2)), "unreachable")
