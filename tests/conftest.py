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
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 1000\nmax_queued_messages 100000\n"
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


# -- access control (control plane API authentication) ---------------------------------------------


def admin_headers(data_dir: Path) -> dict[str, str]:
    """``Authorization`` header with the bootstrap admin token the control plane wrote to ``data_dir``."""
    token = (Path(data_dir) / "admin.token").read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"}


# -- signed agent releases (moved from test_security_selfupdate.py: one wheel build per session) ---


def _release_versions() -> tuple[str, str, str]:
    from edgewise import __version__

    major, minor, patch = (int(x) for x in __version__.split(".")[:3])
    lower = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{max(minor - 1, 0)}.99"
    return __version__, f"{major}.{minor}.{patch + 1}", lower


@pytest.fixture(scope="session")
def release_wheel(tmp_path_factory) -> Path:
    """The edgewise wheel of this checkout, built once per session (offline, no build isolation)."""
    from edgewise.bundle.release import build_wheel

    return build_wheel(Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("wheel"))


def patched_wheel(wheel: Path, version: str, out_dir: Path, patches: dict[str, bytes] | None = None) -> Path:
    """The same wheel as ``version``: dist-info renamed, METADATA and __version__ patched, RECORD rewritten."""
    import base64
    import hashlib
    import zipfile

    old_version = wheel.name.split("-")[1]
    out = out_dir / f"edgewise-{version}-py3-none-any.whl"
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            new = name.replace(f"edgewise-{old_version}.dist-info", f"edgewise-{version}.dist-info")
            if new.endswith(".dist-info/METADATA"):
                data = data.replace(f"\nVersion: {old_version}\n".encode(), f"\nVersion: {version}\n".encode())
            if new == "edgewise/__init__.py":
                data = data.replace(f'__version__ = "{old_version}"'.encode(), f'__version__ = "{version}"'.encode())
            members[new] = data
    for name, data in (patches or {}).items():
        members[name] = data
    record = next(n for n in members if n.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in members.items():
        if name != record:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
    members[record] = ("\n".join(lines + [f"{record},,"]) + "\n").encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


@pytest.fixture(scope="session")
def releases(tmp_path_factory, release_wheel, keys_dir) -> dict[str, Path]:
    """Signed releases: current, next, lower, a broken next (raises on import), one signed by an untrusted key."""
    import zipfile

    from edgewise.bundle.release import build_release

    current, nxt, lower = _release_versions()
    d = tmp_path_factory.mktemp("releases")
    signer = load_signer(keys_dir / "signing.key")
    with zipfile.ZipFile(release_wheel) as zf:
        service = zf.read("edgewise/agent/service.py")
    broken = b'raise RuntimeError("this release is broken on purpose")\n' + service
    out = {}
    for label, version, patches, key in (
        ("current", current, None, signer),
        ("next", nxt, None, signer),
        ("lower", lower, None, signer),
        ("broken", nxt, {"edgewise/agent/service.py": broken}, signer),
        ("foreign", nxt, None, load_signer(keys_dir / "other.key")),
    ):
        (d / label).mkdir()
        whl = patched_wheel(release_wheel, version, d / label, patches)
        out[label] = d / f"{label}.ewr"
        build_release(whl, signer=key, out=out[label])
    return out


# -- PostgreSQL as well as SQLite (EDGEWISE_TEST_DB=postgresql; docs/scale-out-postgres.md) ---------


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL cluster for this session (tests/pg.py), its template1 migrated to head so every
    new database starts with the current schema. Skipped where PostgreSQL is not installed, unless the
    session runs on PostgreSQL (EDGEWISE_TEST_DB=postgresql), where that is a failure."""
    import tempfile

    from pg import PgCluster, pg_bin_dir, selected_engine

    if pg_bin_dir() is None:
        if selected_engine() == "postgresql":
            pytest.fail("EDGEWISE_TEST_DB=postgresql but PostgreSQL is not installed: run `make test-pg`")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql, or `make test-pg`)")
    base = Path(tempfile.mkdtemp(prefix="edgewise-pg-"))
    cluster = PgCluster(base)
    try:
        cluster.start()
        from edgewise.control.db import init_db

        init_db(cluster.url("template1")).dispose()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _test_database_engine(request):
    """On EDGEWISE_TEST_DB=postgresql every control plane without an explicit database URL gets a database of
    its own (one per data dir) on the session's cluster, through EDGEWISE_DATABASE_URL_TEMPLATE."""
    import os

    from pg import selected_engine

    if selected_engine() != "postgresql":
        yield "sqlite"
        return
    cluster = request.getfixturevalue("pg_cluster")
    before = os.environ.get("EDGEWISE_DATABASE_URL_TEMPLATE")
    os.environ["EDGEWISE_DATABASE_URL_TEMPLATE"] = cluster.url("ew_{key}")
    yield "postgresql"
    if before is None:
        os.environ.pop("EDGEWISE_DATABASE_URL_TEMPLATE", None)
    else:
        os.environ["EDGEWISE_DATABASE_URL_TEMPLATE"] = before


@pytest.fixture
def db_url(request, tmp_path, _test_database_engine) -> str:
    """A fresh database for this test: SQLite in tmp_path, or a new PostgreSQL database on the session's cluster."""
    if _test_database_engine == "postgresql":
        return request.getfixturevalue("pg_cluster").create_database()
    return f"sqlite:///{tmp_path / 'cp.db'}"


_DB_HINTS = ("ControlPlane", "init_db", "create_app", "ServerSettings", "db_url", "make_engine", "Database(")
_db_uses: dict[object, bool] = {}


def _uses_database(obj, depth: int = 0) -> bool:
    """True if a test function or fixture (or a tests/ helper function it calls, a few levels deep) mentions the
    control plane's database: its source names ControlPlane, init_db, ServerSettings, ..."""
    import inspect
    import types

    func = getattr(obj, "__wrapped__", obj)
    if not isinstance(func, types.FunctionType) or depth > 4:
        return False
    if func in _db_uses:
        return _db_uses[func]
    _db_uses[func] = False  # recursion guard
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        source = ""
    found = any(hint in source for hint in _DB_HINTS)
    if not found:
        names: set[str] = set()
        stack = [func.__code__]
        while stack:
            code = stack.pop()
            names.update(code.co_names)
            stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        here = Path(__file__).parent
        for name in names:
            target = func.__globals__.get(name)
            module = getattr(inspect.getmodule(target), "__file__", None) if target is not None else None
            if module and Path(module).parent == here and _uses_database(target, depth + 1):
                found = True
                break
    _db_uses[func] = found
    return found


def pytest_collection_modifyitems(config, items):
    """Mark `db` every test that uses a control-plane database, directly, through a fixture or through a tests/
    helper: CI runs `-m "db and not slow"` on PostgreSQL (docs/scale-out-postgres.md)."""
    for item in items:
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs = [getattr(item, "function", None)] + [
            d.func for name, defs in fixtures.items() if name != "_test_database_engine" for d in defs]  # autouse
        if any(_uses_database(f) for f in funcs if f is not None):
            item.add_marker(pytest.mark.db)
