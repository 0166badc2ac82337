"""Wall time of `edgewise demo --json` (3 agents), as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def run(agents: int = 3) -> dict:
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgewise.cli.main", "demo", "--json", "--agents", str(agents)],
                       capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise RuntimeError(f"demo failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout)
    return {
        "wall_s": round(wall, 1),
        "agents": agents,
        "deployed": out["deployed"],
        "inferences": out["inferences"],
        "accuracy": out["accuracy"],
        "telemetry_received": out["telemetry_received"],
        "telemetry_lost": out["telemetry_lost"],
        "limit": "wall < 90 s",
        "pass": wall < 90,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
