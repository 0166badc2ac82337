"""Hardware-aware runtime tuning: the session settings that make a variant fastest on the target.

A coordinate search from the default (all of the profile's threads, sequential,
``ORT_ENABLE_ALL``, CPU provider), one setting at a time:

1. graph optimization level: DISABLE_ALL, ENABLE_BASIC, ENABLE_EXTENDED, ENABLE_ALL;
2. intra-op threads: 1 … profile threads (capped at this machine's usable cores);
3. execution mode: sequential, or parallel with 2 inter-op threads (inter-op threads
   only matter in parallel mode, so sequential always records 1);
4. execution provider: CPU, plus every provider the profile lists that this
   onnxruntime build has (``onnxruntime.get_available_providers()``); the others are
   reported as not tried.

Each step times its options in interleaved rounds (see ``measure``) and moves only
if an option is at least 3 % faster than the current setting, so noise does not
pick a setting. The result is recorded with the variant and as a ``runtime`` dict
the agent can put in a bundle manifest.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .measure import LEVELS, RuntimeSettings, candidate_thread_counts, make_session, time_interleaved

HYSTERESIS = 0.03
NOT_INFERENCE_PROVIDERS = {"AzureExecutionProvider"}  # a remote-endpoint EP, not a local accelerator


def usable_providers(profile_eps: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Providers to try (CPU always) and, for the profile's others, why they were not tried."""
    import onnxruntime as ort

    available = set(ort.get_available_providers()) - NOT_INFERENCE_PROVIDERS
    use, skipped = ["CPUExecutionProvider"], {}
    for ep in profile_eps:
        if ep == "CPUExecutionProvider":
            continue
        if ep in available:
            use.append(ep)
        else:
            skipped[ep] = "not in this onnxruntime build (onnxruntime.get_available_providers())"
    return use, skipped


def tune(
    path: Path,
    feed: Mapping[str, np.ndarray],
    *,
    threads: int,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    start: RuntimeSettings | None = None,
) -> tuple[RuntimeSettings, list[dict[str, Any]]]:
    """Best settings for ``path`` on batch ``feed``, and every trial (settings, median ms or error)."""
    current = start or RuntimeSettings(intra_op_threads=threads, inter_op_threads=1)
    trials: list[dict[str, Any]] = []
    stages: list[tuple[str, list[RuntimeSettings]]] = [
        ("graph_optimization_level", [replace(current, graph_optimization_level=lv) for lv in LEVELS]),
        ("intra_op_threads", []),  # filled from the current setting when reached
        ("execution_mode", []),
        ("execution_provider", []),
    ]
    for stage, options in stages:
        if stage == "intra_op_threads":
            options = [replace(current, intra_op_threads=t) for t in candidate_thread_counts(threads)]
        elif stage == "execution_mode":
            options = [current]
            if threads >= 2:
                options.append(replace(current, execution_mode="ORT_PARALLEL", inter_op_threads=2))
        elif stage == "execution_provider":
            options = [replace(current, execution_provider=ep) for ep in providers]
        options = list(dict.fromkeys([current, *options]))
        if len(options) < 2:
            continue
        sessions = {}
        for opt in options:
            try:
                sessions[opt] = (make_session(path, opt), feed)
            except Exception as exc:  # noqa: BLE001 - an option ORT refuses is a recorded trial, not a crash
                trials.append({"stage": stage, "settings": opt.to_runtime(), "error": str(exc).splitlines()[0][:200]})
        if current not in sessions:
            break
        lat = time_interleaved(sessions, rounds=4, round_s=0.01, min_runs_per_round=2)
        for opt, la in lat.items():
            trials.append({"stage": stage, "settings": opt.to_runtime(), "median_ms": la.median_ms})
        best = min(lat, key=lambda o: lat[o].median_ms)
        if best != current and lat[best].median_ms < lat[current].median_ms * (1 - HYSTERESIS):
            current = best
    return current, trials
