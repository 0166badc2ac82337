"""Agent configuration: config.toml, overrides, derived defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgewise.agent import ConfigError, load_config
from edgewise.agent.config import write_toml


def test_first_start_writes_config_and_the_device_keeps_its_id(tmp_path):
    first = load_config(tmp_path, server_url="http://control:8000")
    written = tomllib.loads((tmp_path / "config.toml").read_text())
    assert written["device_id"] == first.device_id
    assert written["server_url"] == "http://control:8000"
    again = load_config(tmp_path)
    assert again.device_id == first.device_id
    assert again.server_url == "http://control:8000"


def test_overrides_win_over_the_file_and_none_means_not_given(tmp_path):
    load_config(tmp_path, device_id="dev-1", api_port=9000, telemetry_interval_s=5.0)
    cfg = load_config(tmp_path, api_port=0, telemetry_interval_s=None)
    assert cfg.api_port == 0
    assert cfg.telemetry_interval_s == 5.0
    assert cfg.device_id == "dev-1"


def test_broker_defaults_to_the_server_host_on_port_1883(tmp_path):
    cfg = load_config(tmp_path, device_id="d", server_url="https://control.example:8443/base")
    assert cfg.broker_url == "mqtt://control.example:1883"
    assert cfg.broker_address() == ("control.example", 1883, False)
    assert "broker_url" not in tomllib.loads((tmp_path / "config.toml").read_text())  # derived, not persisted


def test_no_server_means_no_broker(tmp_path):
    cfg = load_config(tmp_path, device_id="d")
    assert cfg.broker_url is None and cfg.broker_address() is None


def test_trust_dir_defaults_under_the_state_dir_and_relative_paths_join_it(tmp_path):
    assert load_config(tmp_path / "a", device_id="d").trust_dir == tmp_path / "a" / "trust"
    assert load_config(tmp_path / "b", device_id="d", trust_dir="keys").trust_dir == tmp_path / "b" / "keys"


def test_an_invalid_device_id_is_refused_with_the_rule(tmp_path):
    with pytest.raises(ConfigError, match="device_id.*letters, digits"):
        load_config(tmp_path, device_id="no/slashes")
    assert not (tmp_path / "config.toml").exists()


def test_an_unknown_setting_is_named(tmp_path):
    with pytest.raises(ConfigError, match="api_prot: unknown setting"):
        load_config(tmp_path, device_id="d", api_prot=1)


def test_a_broken_config_file_says_which_file(tmp_path):
    (tmp_path / "config.toml").write_text("device_id = \n")
    with pytest.raises(ConfigError, match="config.toml is not valid TOML"):
        load_config(tmp_path)


def test_toml_writer_round_trips_awkward_strings_and_lists(tmp_path):
    values = {"device_id": 'q"uo\\te\n\x7f', "tags": ["a b", "ü"], "threads": 2, "flush_interval_s": 1e-05, "p": Path("/x y")}
    write_toml(tmp_path / "c.toml", values)
    back = tomllib.loads((tmp_path / "c.toml").read_text())
    assert back == {**values, "p": "/x y"}
