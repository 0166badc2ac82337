"""Federated rounds at the control plane with devices that only exist on the wire: every update goes through the real
ingest path (Batch on telemetry/fl), signed by the device's key. Rejections, late updates, DP budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import free_port
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import http_json, wait_until
from test_fl_support import deliver, head_shapes, job, register_fake, signed_update, wait_round


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir, bundles):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    d = tmp_path_factory.mktemp("fl-control")
    plane = ControlPlane(ServerSettings(data_dir=d, port=free_port(), embedded_broker_port=free_port(), trust=[keys_dir / "signing.pub"],
                                        fl_signing_key=keys_dir / "signing.key", fl_tick_s=0.05))
    plane.start()
    upload_bundle(plane.url, bundles["1.1.0"], plane.admin_token)
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def shapes(cp):
    return head_shapes(cp)


def _start(cp, devices, **kw):
    body = {"model": "digits", "base_version": "1.1.0", "devices": devices, "cohort_size": len(devices), "rounds": 1,
            "round_deadline_s": 30, "eval_set": "digits", **kw}
    return http_json("POST", f"{cp.url}/api/v1/fl/jobs", body, token=cp.admin_token)


def _small(shapes, scale=0.001, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(0, scale, size=s)).astype(np.float32) for k, s in shapes.items()}


def test_bad_signature_wrong_shape_nan_and_uninvited_updates_are_rejected_with_reasons_and_a_replay_counts_once(cp, shapes):
    devs = [f"rej-{i}" for i in range(4)]
    for d in devs + ["rej-stranger"]:
        register_fake(cp, d)
    j = _start(cp, devs, min_updates=1, max_updates=4)
    wait_round(cp, j["id"], 1)
    keys = {d: ec.generate_private_key(ec.SECP256R1()) for d in devs + ["rej-stranger"]}
    good = signed_update(devs[0], j["id"], 1, 0, _small(shapes), key=keys[devs[0]])
    deliver(cp, good)
    deliver(cp, good)  # the outbox delivers at least once: a replay must not count twice
    forged = signed_update(devs[1], j["id"], 1, 0, _small(shapes), key=keys[devs[1]])
    forged = forged.model_copy(update={"num_samples": 10_000})  # changed after signing
    deliver(cp, forged)
    wrong = {k: np.zeros((3,) + v, np.float32) for k, v in shapes.items()}
    deliver(cp, signed_update(devs[2], j["id"], 1, 0, wrong, key=keys[devs[2]]))
    nan = _small(shapes)
    next(iter(nan.values())).flat[0] = np.nan
    deliver(cp, signed_update(devs[3], j["id"], 1, 0, nan, key=keys[devs[3]]))
    deliver(cp, signed_update("rej-stranger", j["id"], 1, 0, _small(shapes), key=keys["rej-stranger"]))
    status = job(cp, j["id"])
    reasons = {r["device_id"]: r["reason"].split(":")[0] for r in status["rejected_updates"]}
    assert reasons == {devs[1]: "bad_signature", devs[2]: "wrong_shape", devs[3]: "not_finite", "rej-stranger": "unknown_device"}
    assert status["updates"]["accepted"] == 1  # the good one, once
    http_json("POST", f"{cp.url}/api/v1/fl/jobs/{j['id']}/stop", {}, token=cp.admin_token)
    assert job(cp, j["id"])["state"] == "stopped"


def test_a_device_signing_with_another_key_than_its_pinned_one_is_rejected(cp, shapes):
    devs = ["pin-0"]
    register_fake(cp, devs[0])
    j1 = _start(cp, devs, min_updates=1, max_updates=1, rounds=2)
    wait_round(cp, j1["id"], 1)
    deliver(cp, signed_update("pin-0", j1["id"], 1, 0, _small(shapes), key=ec.generate_private_key(ec.SECP256R1())))
    wait_round(cp, j1["id"], 2)
    deliver(cp, signed_update("pin-0", j1["id"], 2, 1, _small(shapes), key=ec.generate_private_key(ec.SECP256R1())))
    (rej,) = job(cp, j1["id"])["rejected_updates"]
    assert rej["reason"].startswith("bad_signature") and "pinned" in rej["reason"]
    http_json("POST", f"{cp.url}/api/v1/fl/jobs/{j1['id']}/stop", {}, token=cp.admin_token)


def test_an_update_that_arrives_after_its_round_closed_counts_once_in_the_next_round_or_is_dropped_as_stale(cp, shapes):
    devs = [f"late-{i}" for i in range(3)]
    for d in devs:
        register_fake(cp, d)
    keys = {d: ec.generate_private_key(ec.SECP256R1()) for d in devs}
    j = _start(cp, devs, min_updates=1, max_updates=1, rounds=3, round_deadline_s=1.5, max_staleness=1)
    wait_round(cp, j["id"], 1)
    deliver(cp, signed_update(devs[0], j["id"], 1, 0, _small(shapes, seed=1), key=keys[devs[0]]))
    wait_round(cp, j["id"], 1, "closed")
    assert wait_round(cp, j["id"], 2)["cohort"] == [devs[0]]  # the two still training for round 1 are not asked again
    late = signed_update(devs[1], j["id"], 1, 0, _small(shapes, seed=2), key=keys[devs[1]], seq=7)  # trained in round 1, offline until now
    deliver(cp, late)
    r2 = wait_round(cp, j["id"], 2, "closed")
    assert r2["used"] == 1 and r2["late"] == 1 and r2["participants"] == [devs[1]] and r2["detail"]["late_from"] == [1]
    deliver(cp, late)  # delivered again (an outbox retry after a lost PUBACK): never counted twice
    wait_round(cp, j["id"], 3)
    stale = signed_update(devs[2], j["id"], 1, 0, _small(shapes, seed=3), key=keys[devs[2]])  # two aggregations old now
    deliver(cp, stale)
    wait_round(cp, j["id"], 3, "skipped")
    status = wait_until(lambda: (s := job(cp, j["id"]))["state"] == "completed" and s, 20, what="the job to complete")
    assert sum(r["used"] for r in status["rounds"]) == 2
    assert [(r["device_id"], r["status"]) for r in status["rejected_updates"]] == [(devs[2], "stale")]
    assert status["result_version"] is not None


def test_a_dp_job_reports_epsilon_every_round_and_stops_when_the_budget_is_spent(cp, shapes):
    from edgewise.learn.dp import epsilon_after

    devs = [f"dp-{i}" for i in range(2)]
    for d in devs:
        register_fake(cp, d)
    keys = {d: ec.generate_private_key(ec.SECP256R1()) for d in devs}
    z, delta = 2.0, 1e-5
    eps = [epsilon_after(n, 1.0, z, delta) for n in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2  # two rounds fit, a third does not
    j = _start(cp, devs, min_updates=1, max_updates=1, rounds=10, clip_norm=0.5,
               dp={"epsilon": budget, "delta": delta, "noise_multiplier": z})
    for n in (1, 2):
        wait_round(cp, j["id"], n)
        deliver(cp, signed_update(devs[0], j["id"], n, n - 1, _small(shapes, seed=n), key=keys[devs[0]]))
        wait_round(cp, j["id"], n, "closed")
    status = wait_until(lambda: (s := job(cp, j["id"]))["state"] != "running" and s, 20, what="the job to stop")
    assert status["state"] == "stopped" and "budget" in status["reason"]
    assert [r["number"] for r in status["rounds"]] == [1, 2]
    assert [r["epsilon"] for r in status["rounds"]] == pytest.approx(eps[:2], rel=1e-6)
    assert status["epsilon"] == pytest.approx(eps[1], rel=1e-6) and status["epsilon"] <= budget
    assert all(math.isfinite(r["accuracy"]) for r in status["rounds"])


def test_the_api_refuses_a_job_without_a_cohort_source_and_a_base_model_without_a_trainable_head(cp, bundles):
    with pytest.raises(Exception, match="422.*exactly one of group, tag or devices"):
        http_json("POST", f"{cp.url}/api/v1/fl/jobs", {"model": "digits", "base_version": "1.1.0"}, token=cp.admin_token)
    with pytest.raises(Exception, match="422.*dp needs clip_norm"):
        _start(cp, ["x"], dp={"epsilon": 1.0})
    upload_bundle(cp.url, bundles["1.0.0"], cp.admin_token)  # logreg: a LinearClassifier, no Gemm/MatMul head
    with pytest.raises(Exception, match="422.*cannot be trained federatedly"):
        http_json("POST", f"{cp.url}/api/v1/fl/jobs", {"model": "digits", "base_version": "1.0.0", "tag": "x"}, token=cp.admin_token)
    with pytest.raises(Exception, match="404"):
        http_json("GET", f"{cp.url}/api/v1/fl/jobs/fl-nope", token=cp.admin_token)


def test_fl_start_reads_a_job_file_and_status_shows_its_rounds(cp, tmp_path):
    from typer.testing import CliRunner

    from edgewise.cli.main import app

    register_fake(cp, "cli-0")
    job_file = tmp_path / "job.toml"
    job_file.write_text('[job]\nname = "cli"\nmodel = "digits"\nbase_version = "1.1.0"\ndevices = ["cli-0"]\ncohort_size = 1\n'
                        'rounds = 1\nround_deadline_s = 0.2\n\n[job.recipe]\nepochs = 1\nlr = 0.05\n')
    env = {"EDGEWISE_API_TOKEN": cp.admin_token, "EDGEWISE_SERVER": cp.url}
    started = CliRunner().invoke(app, ["fl", "start", str(job_file), "--json"], env=env)
    assert started.exit_code == 0, started.output
    import json

    job_id = json.loads(started.output)["id"]
    done = CliRunner().invoke(app, ["fl", "status", job_id, "--wait", "--timeout", "30"], env=env)
    assert done.exit_code == 0 and "round   1 skipped" in done.output  # nobody answered: the round is recorded as skipped
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    out = CliRunner().invoke(app, ["fl", "start", str(bad)], env=env)
    assert out.exit_code != 0 and "not valid TOML" in out.output


def test_an_enrolled_device_signs_with_its_certificate_key_and_its_updates_are_refused_once_it_is_revoked(cp, tmp_path, keys_dir, bundles, digits_data):
    from edgewise.agent.enroll import enroll
    from edgewise.agent.outbox import drain_once
    from edgewise.protocol import Command
    from edgewise.protocol.messages import FLTask, SampleArray
    from test_agent_support import make_agent
    from edgewise.control.fl import _load_base, head_weights

    dev = "enrolled-fl-0"
    token = http_json("POST", f"{cp.url}/api/v1/enrollment-tokens", {}, token=cp.admin_token)["token"]
    enroll(cp.url, token, tmp_path / dev, device_id=dev)
    a = make_agent(tmp_path / dev, keys_dir, device_id=dev, capture=True, capture_destination="local", capture_random_fraction=1.0,
                   capture_low_confidence=0.0, capture_drift_window=0)
    try:
        assert a.install(bundles["1.1.0"]).result == "ok"
        a.predict(digits_data.x_train[:30])
        with cp.services.db.session() as s:
            head = head_weights(_load_base(s, cp.services.registry, "digits", "1.1.0"))

        def train_and_send(job_id: str) -> None:
            task = FLTask(job_id=job_id, round=1, model="digits", version="1.1.0", base_version=0, min_confidence=0.5,
                          tensors=[SampleArray.of(k, v) for k, v in head.items()], deadline=0.0)
            a._run_command(Command(device_id=dev, id=job_id[-8:], name="fl.train", args=task.model_dump(mode="json")))
            drain_once(a.outbox, dev, lambda topic, payload: cp.services.ingest.handle(topic, payload) or True)

        register_fake(cp, dev)
        j = _start(cp, [dev], min_updates=1, max_updates=5)
        wait_round(cp, j["id"], 1)
        train_and_send(j["id"])
        status = job(cp, j["id"])
        assert status["updates"]["accepted"] == 1 and status["rejected_updates"] == []
        http_json("POST", f"{cp.url}/api/v1/devices/{dev}/revoke", {"reason": "stolen"}, token=cp.admin_token)
        register_fake(cp, dev)
        j2 = _start(cp, [dev], min_updates=1, max_updates=5)
        wait_round(cp, j2["id"], 1)
        train_and_send(j2["id"])
        (rej,) = job(cp, j2["id"])["rejected_updates"]
        assert rej["reason"].startswith("bad_signature") and "certificate" in rej["reason"]
        for jid in (j["id"], j2["id"]):
            http_json("POST", f"{cp.url}/api/v1/fl/jobs/{jid}/stop", {}, token=cp.admin_token)
    finally:
        a.stop()


@pytest.mark.parametrize("aggregator,clip", [("median", None), ("fedavg", 0.05)])
def test_a_few_poisoned_updates_do_not_wreck_the_model_with_a_robust_aggregator_or_clipping(cp, shapes, aggregator, clip):
    from edgewise.control.fl import unpack
    from edgewise.control.models import FLJob

    devs = [f"poison-{aggregator}-{i}" for i in range(5)]
    for d in devs:
        register_fake(cp, d)
    extra = {"clip_norm": clip} if clip else {}
    j = _start(cp, devs, min_updates=5, max_updates=5, aggregator=aggregator, **extra)
    base_acc = j["base_accuracy"]
    wait_round(cp, j["id"], 1)
    rng = np.random.default_rng(0)
    for i, d in enumerate(devs):
        delta = _small(shapes, seed=i) if i < 3 else {k: rng.normal(0, 50, size=s).astype(np.float32) for k, s in shapes.items()}
        deliver(cp, signed_update(d, j["id"], 1, 0, delta, key=ec.generate_private_key(ec.SECP256R1()), num_samples=10 if i < 3 else 10_000))
    r1 = wait_round(cp, j["id"], 1, "closed")
    assert r1["used"] == 5 and r1["accuracy"] >= base_acc - 0.02
    if clip:
        assert r1["clipped"] >= 2
        with cp.services.db.session() as s:
            from edgewise.control.fl import _load_base, head_weights

            new = unpack(s.get(FLJob, j["id"]).weights)
            base = head_weights(_load_base(s, cp.services.registry, "digits", "1.1.0"))
        moved = np.sqrt(sum(float(np.sum((new[k].astype(np.float64) - base[k]) ** 2)) for k in base))
        assert moved <= clip + 1e-6  # a weighted mean of clipped updates is no longer than the clip bound


def test_a_job_carries_on_after_the_control_plane_restarts(tmp_path, keys_dir, bundles, shapes):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                              trust=[keys_dir / "signing.pub"], fl_signing_key=keys_dir / "signing.key", fl_tick_s=0.05)
    key = ec.generate_private_key(ec.SECP256R1())
    first = ControlPlane(settings).start()
    try:
        upload_bundle(first.url, bundles["1.1.0"], first.admin_token)
        register_fake(first, "restart-0")
        j = _start(first, ["restart-0"], min_updates=1, max_updates=1, rounds=2)
        wait_round(first, j["id"], 1)
        deliver(first, signed_update("restart-0", j["id"], 1, 0, _small(shapes), key=key))
        wait_round(first, j["id"], 2)
    finally:
        first.stop()
    second = ControlPlane(settings.model_copy()).start()
    try:
        deliver(second, signed_update("restart-0", j["id"], 2, 1, _small(shapes, seed=5), key=key))  # same pinned key
        status = wait_until(lambda: (s := job(second, j["id"]))["state"] != "running" and s, 20, what="the job to finish")
        assert status["state"] == "completed" and [r["used"] for r in status["rounds"]] == [1, 1]
        assert status["result_version"] == "1.1.1"
    finally:
        second.stop()
