"""Privatized telemetry (issue 8 FL2): class and confidence histograms get local DP on the device, within a daily budget,
switched per device/tag/group by the control plane. Real agents (ONNX Runtime, outbox), real control plane and MQTT."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from pydantic import ValidationError

from edgewise.agent.privacy import TelemetryPrivatizer
from edgewise.learn.dp import unbias_randomized_response
from edgewise.protocol import DesiredState, Summary, Telemetry, decode
from edgewise.protocol.messages import DriftSketch, TelemetryPrivacy
from edgewise.sim.fleet import http_json, wait_until
from test_agent_support import make_agent
from test_data_commands import control_plane  # noqa: F401  (fixture: a live control plane with digits 1.0.0 uploaded)

DAY = 86_400.0
NOON = 1_800_000_000.0 - (1_800_000_000.0 % DAY) + DAY / 2  # a fixed UTC noon: reports in tests never straddle midnight


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _setting(mechanism: str = "laplace", eps: float = 1.0, budget: float = 1e6, **kw) -> TelemetryPrivacy:
    return TelemetryPrivacy(mechanism=mechanism, epsilon_per_report=eps, budget_per_day=budget, **kw)


def _summary(classes: dict[str, int], conf: list[int]) -> Summary:
    return Summary(device_id="p", seq=0, ts=NOON, predictions=sum(classes.values()), classes=classes, confidence_hist=conf)


def _privatizer(tmp_path, setting: TelemetryPrivacy | None, seed: int = 1) -> TelemetryPrivatizer:
    p = TelemetryPrivatizer(tmp_path, rng=np.random.default_rng(seed))
    p.set(setting)
    return p


RAW_CLASSES = {str(c): 1000 for c in range(10)}  # large counts: clipping at 0 never bites, the noise shows as it is
RAW_CONF = [1000] * 10


# -- the agent: what leaves the device ---------------------------------------------------------------


def _summaries_in_outbox(agent) -> list[Summary]:
    return [m for m in (decode(r.payload) for r in agent.outbox.peek(1000)) if m.type == "summary"]


def test_with_privacy_on_the_class_histogram_an_agent_sends_differs_from_the_raw_one_and_stays_non_negative_integers(
    tmp_path, keys_dir, bundles, digits_data
):
    agent = make_agent(tmp_path / "dev", keys_dir, device_id=_id("priv"), bandwidth_mode="summary", telemetry_interval_s=3600)
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        x = digits_data.x_test[:300]
        top1 = agent.predict(x)["probabilities"].argmax(axis=1)
        raw = {str(c): int(n) for c, n in enumerate(np.bincount(top1, minlength=10)) if n}
        agent._on_desired(DesiredState(device_id=agent.device_id, generation=1, privacy=_setting(eps=0.5, budget=50)))
        sent = agent.telemetry_tick()
        (stored,) = _summaries_in_outbox(agent)
        assert stored.classes == sent.classes != raw
        assert all(isinstance(v, int) and v > 0 for v in stored.classes.values())  # zero bins are dropped, like raw ones
        assert all(isinstance(v, int) and v >= 0 for v in stored.confidence_hist) and len(stored.confidence_hist) == 10
        assert stored.privacy.mechanism == "laplace" and stored.privacy.epsilon == 0.5 and stored.privacy.num_classes == 10
        assert stored.predictions == 300  # totals are not privatized
        assert agent.health()["privacy"]["spent"] == pytest.approx(0.5)
        agent._on_desired(DesiredState(device_id=agent.device_id, generation=2))  # privacy None: as counted again
        agent.predict(x)
        assert agent.telemetry_tick().classes == raw and agent.telemetry_tick().privacy is None
    finally:
        agent.stop()


def test_an_agent_privatizing_its_telemetry_imports_neither_scipy_nor_the_dp_accountant(tmp_path, keys_dir, bundles):
    import json
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, shutil, sys
        from pathlib import Path
        import numpy as np
        from edgewise.agent import Agent, load_config
        from edgewise.protocol import DesiredState
        from edgewise.protocol.messages import TelemetryPrivacy
        state = Path({str(tmp_path / "dev")!r})
        (state / "trust").mkdir(parents=True)
        shutil.copy({str(keys_dir / "signing.pub")!r}, state / "trust")
        agent = Agent(load_config(state, device_id="lean-priv", api_port=0, bandwidth_mode="summary", update_trust="signature-only"))
        assert agent.install({str(bundles["1.0.0"])!r}).result == "ok"
        agent._on_desired(DesiredState(device_id="lean-priv", generation=1,
                                       privacy=TelemetryPrivacy(mechanism="randomized_response", epsilon_per_report=1, budget_per_day=9)))
        agent.predict(np.zeros((4, 64), np.float32))
        assert agent.telemetry_tick().privacy.epsilon == 1
        mods = sorted(sys.modules)
        agent.stop()
        print(json.dumps(mods))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = {m.split(".")[0] for m in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert not modules & {"scipy", "dp_accounting", "sklearn", "torch"}


def test_the_privacy_setting_and_the_days_spending_survive_a_restart(tmp_path):
    p = _privatizer(tmp_path, _setting(eps=1.0, budget=2.0))
    for _ in range(2):
        assert p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON).privacy.epsilon == 1.0
    again = TelemetryPrivatizer(tmp_path)  # a restarted agent, before it hears from the control plane
    out = again.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON + 60)
    assert again.setting == _setting(eps=1.0, budget=2.0)
    assert out.privacy.left_out and out.classes == {} and out.confidence_hist == []


def test_the_state_file_reserves_budget_ahead_so_a_crash_never_refills_it(tmp_path):
    from edgewise.agent.privacy import RESERVE_REPORTS

    p = _privatizer(tmp_path, _setting(eps=0.5, budget=100.0))
    p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON)
    assert p.status(now=NOON)["spent"] == 0.5
    crashed = TelemetryPrivatizer(tmp_path)  # no clean shutdown: what the file says counts as spent
    assert crashed.status(now=NOON)["spent"] == pytest.approx(0.5 * RESERVE_REPORTS)


def test_an_unreadable_state_file_leaves_histograms_out_until_the_control_plane_sends_the_setting_again(tmp_path):
    (tmp_path / "privacy.json").write_text("{not json")
    p = TelemetryPrivatizer(tmp_path)
    out = p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON)
    assert out.privacy.left_out and out.classes == {} and out.confidence_hist == []
    p.set(None)  # the desired state arrived: privacy off for this device
    assert p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON).classes == RAW_CLASSES


# -- mechanisms: the noise matches ε ---------------------------------------------------------------


def _noise(p: TelemetryPrivatizer, n: int) -> tuple[np.ndarray, np.ndarray]:
    cls, conf = [], []
    for _ in range(n):
        out = p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON)
        cls.append([out.classes.get(str(c), 0) - 1000 for c in range(10)])
        conf.append(np.asarray(out.confidence_hist) - 1000)
    return np.asarray(cls, dtype=float), np.asarray(conf, dtype=float)


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_laplace_noise_has_the_scale_epsilon_asks_for_split_over_the_reports_histograms(tmp_path, eps):
    cls, conf = _noise(_privatizer(None, _setting("laplace", eps=eps)), 800)  # no state dir: nothing written per report
    b = 2 / eps  # two histograms in the report, each at ε/2: Laplace scale 1/(ε/2)
    for noise in (cls, conf):
        assert abs(noise.mean()) < 0.1 * b
        assert np.abs(noise).mean() == pytest.approx(b, rel=0.06)  # E|Laplace(b)| = b (rounding adds ~1/(12b) variance only)


def test_gaussian_noise_has_the_classic_calibration_for_epsilon_and_delta(tmp_path):
    eps, delta = 0.8, 1e-5
    cls, conf = _noise(_privatizer(None, _setting("gaussian", eps=eps, delta=delta)), 400)
    sigma = math.sqrt(2 * math.log(1.25 / (delta / 2))) / (eps / 2)
    assert np.concatenate([cls, conf]).std() == pytest.approx(sigma, rel=0.06)


def test_randomized_response_keeps_the_total_and_unbiases_back_to_the_raw_histogram(tmp_path):
    raw = {"0": 600, "3": 300, "7": 100}
    p = _privatizer(None, _setting("randomized_response", eps=4.0))
    outs = [p.privatize(_summary(raw, [0] * 9 + [1000]), num_classes=10, now=NOON) for _ in range(200)]
    for o in outs:
        assert sum(o.classes.values()) == 1000 and all(isinstance(v, int) and v >= 0 for v in o.classes.values())
        assert o.privacy.num_classes == 10
    assert outs[0].classes != raw
    mean = np.mean([[o.classes.get(str(c), 0) for c in range(10)] for o in outs], axis=0)
    est = unbias_randomized_response(mean, 2.0)  # each histogram at ε/2
    assert est == pytest.approx([600, 0, 0, 300, 0, 0, 0, 100, 0, 0], abs=25)


def test_the_drift_sketchs_class_and_confidence_counts_are_privatized_in_full_telemetry(tmp_path):
    p = _privatizer(tmp_path, _setting(eps=1.0))
    sketch = DriftSketch(n=300, features={"f0": [100, 200]}, classes={"1": 200, "2": 100}, confidence_hist=[0] * 8 + [100, 200])
    out = p.privatize(Telemetry(device_id="p", seq=0, ts=NOON, sketch=sketch), num_classes=10, now=NOON)
    assert out.sketch.features == {"f0": [100, 200]} and out.sketch.n == 300  # drift detection keeps its feature bins
    assert out.sketch.classes != sketch.classes and out.sketch.confidence_hist != sketch.confidence_hist
    assert out.privacy.histograms == 2


# -- the budget ------------------------------------------------------------------------------------


def test_the_daily_budget_stops_releases_when_spent_leaving_the_histograms_out_never_raw_and_refills_the_next_day(tmp_path):
    p = _privatizer(tmp_path, _setting(eps=1.0, budget=3.0))
    released = [p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON + i) for i in range(3)]
    assert all(r.privacy.epsilon == 1.0 and not r.privacy.left_out for r in released)
    spent = p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON + 10)
    assert spent.privacy.left_out and spent.privacy.epsilon == 0
    assert spent.classes == {} and spent.confidence_hist == [] and spent.predictions == 10_000
    assert p.status(now=NOON + 10)["left"] == 0 and p.left_out == 1
    tomorrow = p.privatize(_summary(RAW_CLASSES, RAW_CONF), now=NOON + DAY)
    assert not tomorrow.privacy.left_out and tomorrow.classes


def test_a_report_with_nothing_counted_spends_nothing_and_privacy_off_sends_as_counted(tmp_path):
    p = _privatizer(tmp_path, _setting(eps=1.0, budget=1.0))
    empty = _summary({}, [0] * 10)
    assert p.privatize(empty, now=NOON) == empty and p.status(now=NOON)["spent"] == 0
    off = _privatizer(tmp_path / "off", None)
    raw = _summary(RAW_CLASSES, RAW_CONF)
    assert off.privatize(raw, now=NOON) == raw


def test_a_setting_no_report_could_fit_or_gaussian_with_epsilon_1_or_more_is_refused_naming_it():
    with pytest.raises(ValidationError, match="budget_per_day"):
        _setting(eps=2.0, budget=1.0)
    with pytest.raises(ValidationError, match="epsilon_per_report < 1"):
        _setting("gaussian", eps=1.0)
    with pytest.raises(ValidationError, match="mechanism"):
        TelemetryPrivacy(mechanism="rappor", epsilon_per_report=1, budget_per_day=2)  # type: ignore[arg-type]


# -- the control plane: per device / tag / group, through the desired state over MQTT -----------------


def test_an_operator_switches_privacy_on_for_a_group_and_only_its_devices_send_privatized_histograms(
    control_plane, tmp_path, keys_dir, bundles, digits_data
):
    cp = control_plane
    api = f"{cp.url}/api/v1"
    ward, lab = _id("ward"), _id("lab")
    for dev, tag in ((ward, "ward-3"), (lab, "lab")):
        http_json("POST", f"{api}/devices", {"id": dev, "tags": [tag]}, token=cp.admin_token)
    http_json("POST", f"{api}/groups", {"name": "ward-3", "query": {"tags_all": ["ward-3"]}}, token=cp.admin_token)
    agents = {}
    try:
        for dev in (ward, lab):
            state = tmp_path / dev
            (state / "keys").mkdir(parents=True)
            (state / "keys" / "device.token").write_text(cp.issue_device_token(dev) + "\n")
            a = make_agent(state, keys_dir, device_id=dev, server_url=cp.url, broker_url=cp.settings.effective_broker_url,
                           bandwidth_mode="summary", telemetry_interval_s=3600)
            assert a.install(bundles["1.0.0"]).result == "ok"
            a.start()
            agents[dev] = a
        wait_until(lambda: all(a.connected for a in agents.values()), 30, what="both agents connected")
        setting = {"mechanism": "laplace", "epsilon_per_report": 0.5, "budget_per_day": 100}
        r = http_json("PUT", f"{api}/privacy", {"group": "ward-3", "privacy": setting}, token=cp.admin_token)
        assert r["devices"] == [ward]
        wait_until(lambda: agents[ward].privacy.setting is not None, 30, what="the ward device to get the setting over MQTT")
        assert agents[lab].privacy.setting is None
        listed = {d["device_id"]: d["privacy"] for d in http_json("GET", f"{api}/privacy", token=cp.admin_token)}
        assert listed[ward]["epsilon_per_report"] == 0.5 and listed[lab] is None

        x = digits_data.x_test[:300]
        raw = None
        for a in agents.values():
            top1 = a.predict(x)["probabilities"].argmax(axis=1)
            raw = {str(c): int(n) for c, n in enumerate(np.bincount(top1, minlength=10)) if n}
            a.telemetry_tick()

        def arrived(dev):
            rows = http_json("GET", f"{api}/devices/{dev}/summaries", token=cp.admin_token)
            return rows if rows and rows[-1]["predictions"] == 300 else None

        assert wait_until(lambda: arrived(lab), 30, what="the lab summary")[-1]["classes"] == raw
        ward_classes = wait_until(lambda: arrived(ward), 30, what="the ward summary")[-1]["classes"]
        assert ward_classes != raw and all(v >= 0 for v in ward_classes.values())

        # off again for the group: the next summary goes out as counted
        http_json("PUT", f"{api}/privacy", {"group": "ward-3", "privacy": None}, token=cp.admin_token)
        wait_until(lambda: agents[ward].privacy.setting is None, 30, what="privacy off on the ward device")
    finally:
        for a in agents.values():
            a.stop()


def test_the_cli_sets_shows_and_switches_off_privacy_for_a_tag_and_refuses_a_bad_setting_with_the_reason(control_plane):
    from typer.testing import CliRunner

    from edgewise.cli.main import app

    cp = control_plane
    http_json("POST", f"{cp.url}/api/v1/devices", {"id": "priv-cli", "tags": ["cli-ward"]}, token=cp.admin_token)
    env = {"EDGEWISE_API_TOKEN": cp.admin_token, "EDGEWISE_SERVER": cp.url}
    run = lambda *args: CliRunner().invoke(app, ["privacy", *args], env=env)  # noqa: E731
    out = run("set", "--tag", "cli-ward", "--epsilon", "0.5", "--budget", "24")
    assert out.exit_code == 0 and "laplace, ε=0.5 per report, 24.0 per day for 1 device(s): priv-cli" in out.output, out.output
    assert "priv-cli: laplace ε=0.5/report 24.0/day" in run("show", "--tag", "cli-ward").output
    assert "off" in run("off", "--device", "priv-cli").output and "priv-cli: off" in run("show", "--tag", "cli-ward").output
    bad = run("set", "--tag", "cli-ward", "--mechanism", "gaussian", "--epsilon", "2", "--budget", "24")
    assert bad.exit_code != 0 and "epsilon_per_report < 1" in bad.output
    assert run("set", "--epsilon", "1", "--budget", "2").exit_code != 0  # no target


def test_the_privacy_api_refuses_a_bad_target_or_setting_with_a_reason(control_plane):
    cp = control_plane
    api = f"{cp.url}/api/v1"
    http_json("POST", f"{api}/devices", {"id": "priv-api", "tags": ["x"]}, token=cp.admin_token)
    good = {"mechanism": "laplace", "epsilon_per_report": 1, "budget_per_day": 10}
    with pytest.raises(Exception, match="422.*exactly one target"):
        http_json("PUT", f"{api}/privacy", {"tag": "x", "device_id": "priv-api", "privacy": good}, token=cp.admin_token)
    with pytest.raises(Exception, match="422.*budget_per_day"):
        http_json("PUT", f"{api}/privacy", {"tag": "x", "privacy": {**good, "epsilon_per_report": 20}}, token=cp.admin_token)
    with pytest.raises(Exception, match="404"):
        http_json("PUT", f"{api}/privacy", {"group": "no-such-group", "privacy": good}, token=cp.admin_token)
    with pytest.raises(Exception, match="404"):
        http_json("PUT", f"{api}/privacy", {"tag": "nobody", "privacy": good}, token=cp.admin_token)
