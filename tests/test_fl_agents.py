"""End to end: a real control plane, three real agents with locally captured digits samples, a federated job of two
rounds; the result is a new registered version with its lineage and its accuracy on the evaluation set."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from conftest import free_port
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import http_json, wait_until
from test_agent_support import make_agent
from test_fl_support import job


@pytest.fixture()
def fleet(tmp_path, keys_dir, bundles, digits_data):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    cp = ControlPlane(ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                                     trust=[keys_dir / "signing.pub"], fl_signing_key=keys_dir / "signing.key", fl_tick_s=0.1))
    cp.start()
    upload_bundle(cp.url, bundles["1.1.0"], cp.admin_token)
    agents = []
    try:
        for i in range(3):
            dev = f"fl-{i}-{uuid.uuid4().hex[:6]}"
            state = tmp_path / dev
            (state / "keys").mkdir(parents=True)
            (state / "keys" / "device.token").write_text(cp.issue_device_token(dev) + "\n")
            a = make_agent(state, keys_dir, device_id=dev, server_url=cp.url, broker_url=cp.settings.effective_broker_url,
                           capture=True, capture_destination="local", capture_random_fraction=1.0, capture_low_confidence=0.0,
                           capture_drift_window=0, capture_seed=i)
            assert a.install(bundles["1.1.0"]).result == "ok"
            x = digits_data.x_train[i * 60 : (i + 1) * 60]  # each device sees its own 60 digits
            for k in range(0, len(x), 10):
                a.predict(x[k : k + 10])
            a.start()
            agents.append(a)
        ids = {a.device_id for a in agents}
        wait_until(lambda: ids <= {d["id"] for d in http_json("GET", f"{cp.url}/api/v1/devices", token=cp.admin_token)
                                   if d.get("version") == "1.1.0"}, 30, what="three agents on 1.1.0")
        yield cp, agents
    finally:
        for a in agents:
            a.stop()
        cp.stop()


def test_a_job_over_three_real_agents_runs_two_rounds_and_registers_a_new_version_with_lineage_and_accuracy(fleet):
    cp, agents = fleet
    body = {"name": "digits-head", "model": "digits", "base_version": "1.1.0", "devices": [a.device_id for a in agents],
            "cohort_size": 3, "min_updates": 2, "max_updates": 3, "round_deadline_s": 45, "rounds": 2, "eval_set": "digits",
            "recipe": {"epochs": 2, "batch_size": 16, "lr": 0.05}, "min_confidence": 0.5, "clip_norm": 5.0, "seed": 1}
    j = http_json("POST", f"{cp.url}/api/v1/fl/jobs", body, token=cp.admin_token)
    status = wait_until(lambda: (s := job(cp, j["id"]))["state"] != "running" and s, 90, interval=0.2, what="the job to finish")
    assert status["state"] == "completed", status["reason"]
    assert [r["state"] for r in status["rounds"]] == ["closed", "closed"]
    assert all(r["used"] >= 2 and r["rejected"] == 0 for r in status["rounds"])
    assert all(0.8 < r["accuracy"] <= 1.0 for r in status["rounds"])
    version = status["result_version"]
    assert version == "1.1.1"
    row = http_json("GET", f"{cp.url}/api/v1/models/digits/{version}", token=cp.admin_token)
    lineage = row["manifest"]["metadata"]["lineage"]
    assert lineage["job"] == j["id"] and lineage["rounds"] == 2 and lineage["devices"] >= 2
    assert lineage["metrics"]["accuracy"] == pytest.approx(status["accuracy"])
    with cp.services.db.session() as s:  # every participant signed with its own key, pinned at its first update
        from edgewise.control.models import FLDeviceKey

        assert {k.device_id for k in s.query(FLDeviceKey)} >= set(lineage_devices(status))
    assert np.isfinite(status["accuracy"]) and status["base_accuracy"] is not None


def lineage_devices(status):
    return {d for r in status["rounds"] for d in r["participants"]}


def test_an_agent_that_trained_offline_delivers_its_update_through_the_outbox_and_it_counts_once_in_a_later_round(
        fleet, tmp_path, keys_dir, bundles, digits_data):
    from edgewise.control.fl import _load_base, head_weights
    from edgewise.protocol import Command
    from edgewise.protocol.messages import FLTask, SampleArray
    from test_fl_support import register_fake, wait_round

    cp, agents = fleet
    dev = f"fl-off-{uuid.uuid4().hex[:6]}"
    state = tmp_path / dev
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "device.token").write_text(cp.issue_device_token(dev) + "\n")
    off = make_agent(state, keys_dir, device_id=dev, server_url=cp.url, broker_url=cp.settings.effective_broker_url,
                     capture=True, capture_destination="local", capture_random_fraction=1.0, capture_low_confidence=0.0,
                     capture_drift_window=0, capture_seed=9)
    try:
        assert off.install(bundles["1.1.0"]).result == "ok"
        off.predict(digits_data.x_train[300:360])
        register_fake(cp, dev)  # it was seen online (running 1.1.0) before it lost its link
        body = {"model": "digits", "base_version": "1.1.0", "devices": [a.device_id for a in agents] + [dev], "cohort_size": 4,
                "min_updates": 2, "max_updates": 4, "round_deadline_s": 3, "rounds": 2, "max_staleness": 1,
                "recipe": {"epochs": 1, "batch_size": 16, "lr": 0.05}, "min_confidence": 0.5}
        j = http_json("POST", f"{cp.url}/api/v1/fl/jobs", body, token=cp.admin_token)
        wait_round(cp, j["id"], 1)
        # the offline device got round 1's task (e.g. just before its link dropped) and trains with no link at all
        with cp.services.db.session() as s:
            head = head_weights(_load_base(s, cp.services.registry, "digits", "1.1.0"))
        task = FLTask(job_id=j["id"], round=1, model="digits", version="1.1.0", base_version=0, min_confidence=0.5,
                      tensors=[SampleArray.of(k, v) for k, v in head.items()], deadline=0.0)
        off._run_command(Command(device_id=dev, id="t1", name="fl.train", args=task.model_dump(mode="json")))
        assert off.outbox.pending() >= 1  # the signed update waits in the durable outbox
        r1 = wait_round(cp, j["id"], 1, "closed", timeout=30)
        assert dev not in r1["participants"] and r1["used"] == 3
        off.start()  # the link is back: the outbox delivers the round-1 update
        status = wait_until(lambda: (s := job(cp, j["id"]))["state"] != "running" and s, 60, interval=0.2, what="the job to finish")
        r2 = status["rounds"][1]
        assert status["state"] == "completed" and r2["state"] == "closed"
        assert dev in r2["participants"] and 1 in r2["detail"]["late_from"]
        with cp.services.db.session() as s:
            from edgewise.control.models import FLUpdateRow

            rows = s.query(FLUpdateRow).filter(FLUpdateRow.job_id == j["id"]).all()
        mine = [(r.round, r.status, r.counted_in) for r in rows if r.device_id == dev and r.round == 1]
        assert mine == [(1, "used", 2)]  # counted in round 2, once
        assert sum(r["used"] for r in status["rounds"]) == sum(1 for r in rows if r.status == "used")  # nothing counted twice
    finally:
        off.stop()


def test_a_job_that_trains_every_layer_of_the_mlp_completes_over_real_agents(fleet):
    cp, agents = fleet
    body = {"name": "digits-all", "model": "digits", "base_version": "1.1.0", "devices": [a.device_id for a in agents],
            "cohort_size": 3, "min_updates": 2, "max_updates": 3, "round_deadline_s": 60, "rounds": 1, "eval_set": "digits",
            "recipe": {"epochs": 1, "batch_size": 16, "lr": 0.02, "layers": "all"}, "min_confidence": 0.5, "clip_norm": 5.0,
            "seed": 2}
    j = http_json("POST", f"{cp.url}/api/v1/fl/jobs", body, token=cp.admin_token)
    status = wait_until(lambda: (s := job(cp, j["id"]))["state"] != "running" and s, 150, interval=0.2, what="the job to finish")
    assert status["state"] == "completed", status["reason"]
    (r,) = status["rounds"]
    assert r["state"] == "closed" and r["used"] >= 2 and r["rejected"] == 0 and 0.8 < r["accuracy"] <= 1.0
