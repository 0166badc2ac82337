"""Shared fixtures: small real models trained once per session, keys, bundles, a real Mosquitto."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgewise.bundle import build_bundle
from edgewise.security import TrustedKeys, generate_keypair, load_signer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def digits_data():
    from edgewise.lab.demo_model import load_digits_split

    return load_digits_split()


@pytest.fixture(scope="session")
def digits_models(digits_data) -> dict[str, bytes]:
    """ONNX bytes of the two demo classifiers (logreg = v1, mlp = v2), trained on bundled digits."""
    from edgewise.lab.demo_model import train_digits_onnx

    return {"logreg": train_digits_onnx("logreg", digits_data), "mlp": train_digits_onnx("mlp", digits_data)}


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "signing.key", d / "signing.pub")
    generate_keypair(d / "other.key", d / "other.pub")
    return d


@pytest.fixture(scope="session")
def signer(keys_dir):
    return load_signer(keys_dir / "signing.key")


@pytest.fixture(scope="session")
def trusted(keys_dir) -> TrustedKeys:
    return TrustedKeys.from_paths([keys_dir / "signing.pub"])


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, digits_models, digits_data, signer) -> dict[str, Path]:
    """Signed bundles digits-1.0.0 (logreg) and digits-1.1.0 (mlp), each with 16 golden samples."""
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    d = tmp_path_factory.mktemp("bundles")
    out = {}
    for version, kind in (("1.0.0", "logreg"), ("1.1.0", "mlp")):
        path = d / f"digits-{version}.ewb"
        build_bundle(
            digits_models[kind], name="digits", version=version, signer=signer, out=path,
            labels=LABELS, preprocessing=PREPROCESSING, golden=({"x": digits_data.x_test[:16]},),
        )
        out[version] = path
    return out


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A real Mosquitto broker on a free loopback port; yields its mqtt:// URL."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        pytest.fail("mosquitto is not installed: run `make test` (it runs apt-get install mosquitto)")
    d = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest file {d / 'mosquitto.log'}\nlog_type error\nlog_type warning\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train as fast on one thread, and a busy 2-core machine cannot stall an OpenMP barrier."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory) -> dict[str, str]:
    """A fresh SoftHSM2 token (label ``edgewise``, user PIN in $EDGEWISE_PKCS11_PIN) for this test session.

    Yields the keystore URL and the paths; SOFTHSM2_CONF points the library at a token folder under tmp.
    """
    import os

    if not SOFTHSM_MODULE.exists() or shutil.which("softhsm2-util") is None:
        pytest.fail("SoftHSM2 is not installed: run `make test` (it runs apt-get install softhsm2)")
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["EDGEWISE_PKCS11_PIN"] = "1234"
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "edgewise", "--pin", "1234", "--so-pin", "5678"],
        check=True, capture_output=True, env=dict(os.environ),
    )
    return {
        "url": f"pkcs11:module={SOFTHSM_MODULE};token=edgewise;pin-env=EDGEWISE_PKCS11_PIN",
        "module": str(SOFTHSM_MODULE), "token": "edgewise", "pin": "1234", "conf": str(conf),
    }
