"""Encryption at rest: throughput of the chunked model format and of sealed outbox rows (file and PKCS#11
keystores), and the cost of the agent's verified + encrypted load path for a 50 MB model (issue 5).

Everything is generated here: the 50 MB model is an ONNX Gemm with a 3,600 x 3,600 float32
initializer built with onnx.helper; the PKCS#11 token is a fresh SoftHSM2 token in a temporary folder.
Nothing is downloaded, nothing is written outside a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
N = 3600  # Gemm weight N x N float32: 51.8 MB


def _gemm_model(n: int = N) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(n, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "gemm50mb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _softhsm_keystore(root: Path):  # type: ignore[no-untyped-def]
    """A fresh SoftHSM2 token; None (with the reason printed) when SoftHSM2 is not installed."""
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        print("SoftHSM2 not installed: PKCS#11 figures skipped (apt-get install softhsm2)", flush=True)
        return None
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["EDGEWISE_BENCH_PIN"] = "1234"
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234", "--so-pin", "5678"],
                   check=True, capture_output=True)
    from edgewise.security.keystore import open_keystore

    return open_keystore(f"pkcs11:module={SOFTHSM};token=bench;pin-env=EDGEWISE_BENCH_PIN")


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _model_throughput(ks, data: bytes, repeat: int) -> dict:  # type: ignore[no-untyped-def]
    from edgewise.security.encryption import open_sealed, seal_bytes

    ctx = "edgewise-model/1;device=bench;slot=a"
    sealed = seal_bytes(data, keystore=ks, key_label="storage", context=ctx)
    t_enc = _best(lambda: seal_bytes(data, keystore=ks, key_label="storage", context=ctx), repeat)
    t_dec = _best(lambda: open_sealed(sealed, keystore=ks, context=ctx), repeat)
    mb = len(data) / 1e6
    return {"mb": round(mb, 1), "encrypt_mb_s": round(mb / t_enc), "decrypt_mb_s": round(mb / t_dec),
            "overhead_bytes": len(sealed) - len(data)}


def _row_throughput(ks, root: Path, rows: int = 20000) -> dict:  # type: ignore[no-untyped-def]
    import msgpack

    from edgewise.agent.outbox import Outbox
    from edgewise.protocol import Telemetry
    from edgewise.security.encryption import RowSealer, load_or_replace_data_key

    key, _ = load_or_replace_data_key(ks, "storage", root / f"outbox-{id(ks)}.key", "edgewise-outbox/1;device=bench")
    sealer = RowSealer(key, "bench")
    rec = Telemetry(device_id="bench", seq=0, ts=time.time(), mono=1.0, model="digits", version="1.0.0",
                    inferences=1234, errors=0, latency_p50_ms=0.41, latency_p95_ms=0.9, outbox_pending=3, dropped=0)
    payload = msgpack.packb(rec.model_dump(mode="json"), use_bin_type=True)
    sealed = [sealer.seal(i, payload) for i in range(rows)]
    t_seal = _best(lambda: [sealer.seal(i, payload) for i in range(rows)], 5)
    t_open = _best(lambda: [sealer.open(i, sealed[i]) for i in range(rows)], 5)

    def enqueue(with_sealer: bool) -> float:
        path = root / f"ob-{with_sealer}-{time.monotonic_ns()}.db"
        with Outbox(path, max_bytes=1 << 30, sealer=sealer if with_sealer else None) as box:
            t = time.perf_counter()
            for i in range(0, rows, 100):
                box.enqueue_many([rec] * 100)
            return time.perf_counter() - t

    plain_s = statistics.median(enqueue(False) for _ in range(3))
    sealed_s = statistics.median(enqueue(True) for _ in range(3))
    mb = rows * len(payload) / 1e6
    return {
        "payload_bytes": len(payload), "sealed_bytes": len(sealed[0]),
        "seal_rows_s": round(rows / t_seal), "open_rows_s": round(rows / t_open),
        "seal_mb_s": round(mb / t_seal, 1), "open_mb_s": round(mb / t_open, 1),
        "enqueue_plain_rows_s": round(rows / plain_s), "enqueue_sealed_rows_s": round(rows / sealed_s),
    }


def _load_paths(ks, root: Path, model: bytes, rounds: int) -> dict:  # type: ignore[no-untyped-def]
    """Median seconds: plain InferenceSession from the file vs the agent's verify + decrypt + load from bytes."""
    import onnxruntime as ort

    from edgewise.agent.runtime import LoadedModel
    from edgewise.agent.slots import SlotSealer, Slots
    from edgewise.bundle import build_bundle
    from edgewise.bundle.verify import verify_bundle
    from edgewise.security import TrustedKeys, generate_keypair, load_signer

    plain = root / "model.onnx"
    plain.write_bytes(model)
    if not (root / "signing.key").exists():
        generate_keypair(root / "signing.key", root / "signing.pub", overwrite=True)
    bundle = root / "gemm-1.0.0.ewb"
    if not bundle.exists():
        build_bundle(model, name="gemm", version="1.0.0", signer=load_signer(root / "signing.key"), out=bundle)
    trusted = TrustedKeys.from_paths([root / "signing.pub"])
    slots = Slots(root / f"slots-{id(ks)}", sealer=SlotSealer(ks, "bench"))
    slots.stage(bundle)  # sealed into slot a

    def opts():  # type: ignore[no-untyped-def]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def baseline() -> None:
        ort.InferenceSession(str(plain), opts(), providers=["CPUExecutionProvider"])

    def agent_path() -> None:
        LoadedModel.from_bundle(verify_bundle(slots.bundle("a"), trusted), threads=1)

    def decrypt_only() -> None:
        slots.bundle("a").read_plaintext()

    def verify_only() -> None:
        verify_bundle(slots.bundle("a"), trusted)

    def plain_bundle_path() -> None:  # verified but not encrypted (the agent before issue 5)
        LoadedModel.from_bundle(verify_bundle(bundle, trusted), threads=1)

    fns = {"baseline": baseline, "agent": agent_path, "decrypt": decrypt_only, "verify_decrypt": verify_only,
           "verified_plain": plain_bundle_path}
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved: machine drift hits every path alike
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "bundle_mb": round(bundle.stat().st_size / 1e6, 1),
        "baseline_ms": round(med["baseline"] * 1000), "agent_ms": round(med["agent"] * 1000),
        "decrypt_ms": round(med["decrypt"] * 1000), "verify_decrypt_ms": round(med["verify_decrypt"] * 1000),
        "verified_plain_ms": round(med["verified_plain"] * 1000),
        "ratio": round(med["agent"] / med["baseline"], 2), "pass": med["agent"] / med["baseline"] <= 1.5,
    }


def _backends(root: Path) -> dict:  # type: ignore[type-arg]
    from edgewise.security.keystore import FileKeystore

    backends = {}
    fk = FileKeystore(root / "keys")
    fk.create_key("storage", "aes-256")
    backends["file"] = fk
    hsm = _softhsm_keystore(root / "hsm")
    if hsm is not None:
        hsm.create_key("storage", "aes-256")
        backends["pkcs11"] = hsm
    return backends


def run(rounds: int = 7) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ew-bench-sec-"))
    try:
        model = _gemm_model()
        backends = _backends(root)
        out: dict = {"model_mb": round(len(model) / 1e6, 1), "rounds": rounds, "backends": {}}
        fresh = _load_in_fresh_process(rounds)
        for name, ks in backends.items():
            print(f"-- {name} keystore", flush=True)
            out["backends"][name] = {
                "model": _model_throughput(ks, model, repeat=5),
                "rows": _row_throughput(ks, root),
                "load": fresh[name],
                "load_warm": _load_paths(ks, root, model, rounds),
            }
        file_load = out["backends"]["file"]["load"]
        out["ratio"] = file_load["ratio"]
        out["pass"] = all(b["load"]["pass"] for b in out["backends"].values())
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _load_in_fresh_process(rounds: int) -> dict:
    """The load figure measured in a new process, as an agent loads its model at start. In a process that has
    already run other work (this one, after the throughput runs), the baseline finds its 50 MB in memory the
    allocator already holds and loads faster; that figure is reported too (``load_warm``)."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--load", str(rounds), "--json"], capture_output=True, text=True,
                          timeout=1800, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["load"]


def run_load(rounds: int = 7) -> dict:
    """Only the 50 MB load figure (both keystores): ``python benchmarks/bench_security.py --load [rounds]``."""
    root = Path(tempfile.mkdtemp(prefix="ew-bench-sec-"))
    try:
        model = _gemm_model()
        loads = {name: _load_paths(ks, root, model, rounds) for name, ks in _backends(root).items()}
        return {"model_mb": round(len(model) / 1e6, 1), "rounds": rounds, "load": loads,
                "pass": all(ld["pass"] for ld in loads.values())}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def markdown(r: dict) -> str:
    ok = lambda b: "yes" if b else "**NO**"  # noqa: E731
    rows = []
    for name, b in r["backends"].items():
        m, w = b["model"], b["rows"]
        rows.append(f"| {name} | {m['encrypt_mb_s']} | {m['decrypt_mb_s']} | {w['seal_rows_s']:,} ({w['seal_mb_s']} MB/s) "
                    f"| {w['open_rows_s']:,} ({w['open_mb_s']} MB/s) | {w['enqueue_plain_rows_s']:,} → {w['enqueue_sealed_rows_s']:,} |")
    loads = []
    for name, b in r["backends"].items():
        for what, ld in (("new process (agent start)", b["load"]), ("warm process", b.get("load_warm"))):
            if ld is None:
                continue
            loads.append(f"| {name}, {what} | {ld['baseline_ms']} | {ld['verified_plain_ms']} | {ld['decrypt_ms']} "
                         f"| {ld['verify_decrypt_ms']} | {ld['agent_ms']} | **{ld['ratio']}×** |")
    any_rows = next(iter(r["backends"].values()))["rows"]
    return f"""
Model: ONNX Gemm with a 3,600 × 3,600 float32 initializer ({r['model_mb']} MB), generated by the benchmark.
Chunked AES-256-GCM (1 MiB chunks; one key unwrap per file, in the token for PKCS#11 — bulk data is
encrypted on the host either way). Outbox rows: a {any_rows['payload_bytes']}-byte msgpack Telemetry record,
sealed to {any_rows['sealed_bytes']} bytes (0xC1 + nonce + tag), each bound to (device id, seq).

| keystore | model encrypt MB/s | model decrypt MB/s | rows sealed /s | rows opened /s | outbox enqueue rows/s, plain → sealed (batches of 100) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Load a 50 MB model bundle ({next(iter(r['backends'].values()))['load']['bundle_mb']} MB): the agent's path
(`verify_bundle` on the encrypted slot: decrypt into memory with the signature's sha256 computed on a second
core, Ed25519 check, manifest and member listing; then `LoadedModel.from_bundle`: the model member copied out
as `bytes`, `InferenceSession` from bytes) against `InferenceSession` on the plain `.onnx` file, unverified and
unencrypted. "verified, not encrypted" is a plaintext bundle file through the file path of `verify_bundle`
(what the agent did before encryption at rest: streamed signature hash, every member hashed, model read
and hashed again). Medians of {r['rounds']} interleaved rounds, one intra-op thread, milliseconds.

| keystore | plain file (baseline) | verified, not encrypted | decrypt only | decrypt + verify | agent path | ratio |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(loads)}

Target: agent path ≤ 1.5 × baseline, measured in a new process as the agent loads its model at start — met:
{ok(r['pass'])}. "Warm process" is the same measurement in the benchmark's own process after everything that
ran before it; under `make bench` that process has also run the predict, lab (torch) and throughput
benchmarks, and the plain-file baseline there has been as fast as 86 ms (its 50 MB served from memory the
allocator already holds, no page faults) against ~175 ms for the agent path, about 2×. An agent replacing its
model after long serving may see something in between.
"""


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    if "--load" in sys.argv:  # just the load figure: python benchmarks/bench_security.py --load [rounds]
        rest = [a for a in sys.argv[1:] if a != "--load"]
        rest = [a for a in rest if a != "--json"]
        res = run_load(int(rest[0]) if rest else 7)
        if "--json" in sys.argv:  # for run(): the figure from a fresh process, JSON only
            print(json.dumps(res))
            raise SystemExit(0)
        print(json.dumps(res, indent=2))
        for name, ld in res["load"].items():
            print(f"{name}: baseline {ld['baseline_ms']} ms, agent {ld['agent_ms']} ms, ratio {ld['ratio']}x "
                  f"({'met' if ld['pass'] else 'NOT met'}: target 1.5x)")
    else:
        res = run()
        print(json.dumps(res, indent=2))
        print(markdown(res))
