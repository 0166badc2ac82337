"""The agent stays lean: no control plane, lab or server libraries in its process, optional parts loaded on demand."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_a_running_agent_imports_nothing_from_the_server_or_the_lab(tmp_path, keys_dir, bundles):
    script = textwrap.dedent(
        f"""
        import json, shutil, sys
        from pathlib import Path
        from edgewise.agent import Agent, load_config
        state = Path({str(tmp_path / "dev")!r})
        (state / "trust").mkdir(parents=True)
        shutil.copy({str(keys_dir / "signing.pub")!r}, state / "trust")
        agent = Agent(load_config(state, device_id="lean", api_port=0))
        assert agent.install({str(bundles["1.0.0"])!r}).result == "ok"
        agent.start()
        import numpy as np
        agent.predict(np.zeros((1, 64), np.float32))
        mods = sorted(sys.modules)
        agent.stop()
        print(json.dumps(mods))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    forbidden = {"edgewise.control", "edgewise.lab", "fastapi", "sqlalchemy", "torch", "sklearn", "uvicorn", "amqtt", "typer",
                 "httpx", "argon2", "asn1crypto", "pkcs11", "tuf", "securesystemslib"}  # enrollment/PKCS#11/TUF: on demand
    assert not {m for m in modules if m.split(".")[0] in forbidden or m in forbidden or m.startswith(("edgewise.control", "edgewise.lab"))}
    # Loaded only when needed: paho with a broker, prometheus_client on the first scrape, urllib.request on a download.
    assert "paho" not in modules and "prometheus_client" not in modules
    assert "onnxruntime" in modules


def test_an_agent_with_a_tuf_root_imports_python_tuf_only_when_an_update_arrives(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from edgewise.agent import Agent, load_config
        state = Path({str(tmp_path / "dev")!r})
        (state / "trust").mkdir(parents=True)
        (state / "trust" / "root.json").write_text("{{}}")
        agent = Agent(load_config(state, device_id="lean-tuf", api_port=0, server_url="http://127.0.0.1:9"))
        assert agent.updater.require_tuf
        print("tuf" in sys.modules, "securesystemslib" in sys.modules)
        agent.stop()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
