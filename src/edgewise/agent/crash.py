"""Crash accounting: a model that takes the agent down is reported, so the control plane can count crashes.

A crash cannot report itself: the process is gone. So the agent leaves evidence
behind and the next start reads it:

- ``serving.json`` (the marker): written when the agent starts loading its model
  and again whenever another model goes live; removed by a clean ``stop()``. If it
  is still there at the next start, the previous run ended without stopping.
- ``fault.log``: where :func:`enable_fault_log` points Python's ``faulthandler``
  (``run_agent``, the device's process, does). A fatal signal (SIGSEGV, SIGFPE,
  SIGABRT, SIGBUS, SIGILL: a native crash in ONNX Runtime or a custom op) leaves
  the crashing thread's stack there.
- the slots' trial record: a start that never completed trying a new model
  (``starts > passed``) is a crash during the trial; the updater rolls it back
  (``agent.slots``, ``Updater._resume_trial``).

What the next start concludes (:meth:`CrashWatch.previous_run`):

- trial record shows a dead start → Event ``model.crash`` (error), phase ``trial``;
- marker + a fatal signal whose stack runs through the model's code (``agent/runtime.py``:
  load, preprocessing, inference) → ``model.crash`` (error), phase ``load``/``serving``/``trial``
  (what the marker recorded);
- marker + a fatal signal elsewhere → ``agent.crash`` (error): the agent's fault, not the model's;
- marker without a fatal signal → ``agent.unclean_exit`` (warning): SIGKILL, the OOM killer or a
  power cut look the same from here, and a power cut on a canary must not halt a rollout.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..fsutil import atomic_write

log = logging.getLogger("edgewise.agent.crash")

MARKER = "serving.json"
FAULT_LOG = "fault.log"
PREVIOUS_FAULT_LOG = "fault.prev.log"
MODEL_CODE = ("edgewise/agent/runtime.py", "edgewise\\agent\\runtime.py")
_fault_file: IO[str] | None = None  # kept open for faulthandler, which writes to its file descriptor when the process dies


def enable_fault_log(state_dir: Path) -> Path:
    """Point ``faulthandler`` (process-wide) at ``state_dir/fault.log``; the previous run's log is kept as
    ``fault.prev.log`` for :meth:`CrashWatch.previous_run`. Call once per device process, before the agent starts."""
    global _fault_file
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / FAULT_LOG
    try:
        if path.exists() and path.stat().st_size > 0:
            os.replace(path, state_dir / PREVIOUS_FAULT_LOG)
    except OSError as exc:
        log.warning("cannot keep the previous fault log %s: %s", path, exc)
    f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - must outlive this function: faulthandler writes to it at a crash
    faulthandler.enable(file=f, all_threads=True)
    old, _fault_file = _fault_file, f
    if old is not None:
        old.close()
    return path


@dataclass
class CrashReport:
    """One conclusion about the previous run: the Event to send."""

    kind: str  # model.crash | agent.crash | agent.unclean_exit
    severity: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


def _crashing_stack(text: str) -> tuple[str | None, str]:
    """(the fatal error's name, the crashing thread's stack) from faulthandler's output."""
    error = None
    for line in text.splitlines():
        if line.startswith("Fatal Python error:"):
            error = line.split(":", 1)[1].strip() or None
            break
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Current thread"):
            stack = []
            for more in lines[i + 1 :]:
                if not more.strip() or more.startswith("Thread 0x"):
                    break
                stack.append(more)
            return error, "\n".join(stack)
    return error, text


class CrashWatch:
    """The evidence files of one agent's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.marker = self.state_dir / MARKER

    def running(self, model: str | None, version: str | None, phase: str) -> None:
        """Record what the agent is doing with which model (``load``, ``trial`` or ``serving``) until a clean stop."""
        record = {"model": model, "version": version, "phase": phase, "pid": os.getpid(), "since": time.time()}
        try:
            atomic_write(self.marker, (json.dumps(record) + "\n").encode())
        except OSError as exc:  # no evidence next time; serving matters more
            log.warning("cannot write %s: %s", self.marker, exc)

    def clean_exit(self) -> None:
        """The agent stops on purpose: nothing crashed."""
        self.marker.unlink(missing_ok=True)

    def _fault_text(self) -> str:
        """The fault logs a previous process left (not the one this process's faulthandler writes to right now)."""
        texts = []
        for name in (PREVIOUS_FAULT_LOG, FAULT_LOG):
            path = self.state_dir / name
            if _fault_file is not None and name == FAULT_LOG and Path(_fault_file.name) == path:
                continue  # ours, opened for this run
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot read the fault log %s: %s", path, exc)
        return "\n".join(t for t in texts if t.strip())

    def previous_run(self, trial: Any = None) -> list[CrashReport]:
        """What the evidence says about how the previous run ended; the evidence is consumed.

        ``trial`` is the slots' trial record *before* this start touched it (``Slots.trial()``), or None.
        """
        try:
            marker: dict[str, Any] | None = json.loads(self.marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            marker = None
        except (OSError, ValueError):
            marker = {"model": None, "version": None, "phase": "unknown"}
        fault = self._fault_text()
        error, stack = _crashing_stack(fault) if fault else (None, "")
        in_model = any(m in stack for m in MODEL_CODE)
        fatal = {"signal": error, "stack": stack[-2000:]} if fault else {}
        if trial is not None and trial.starts > trial.passed:
            what = f"{trial.model} {trial.version}"
            return [CrashReport(
                "model.crash", "error",
                f"{what} crashed the agent during its trial (start {trial.starts}, {trial.passed} completed)"
                + (f": {error}" if error else ""),
                {"model": trial.model, "version": trial.version, "phase": "trial", "generation": trial.generation,
                 "starts": trial.starts, "passed": trial.passed, **fatal},
            )]
        if marker is None:
            return []
        what = f"{marker.get('model')} {marker.get('version')}" if marker.get("model") else "no model"
        base = {"model": marker.get("model"), "version": marker.get("version"), "phase": marker.get("phase"),
                "pid": marker.get("pid"), "since": marker.get("since")}
        if fault and in_model:
            return [CrashReport("model.crash", "error", f"{what} crashed the agent while {marker.get('phase')}: {error or 'fatal error'}",
                                {**base, **fatal})]
        if fault:
            return [CrashReport("agent.crash", "error", f"the agent crashed ({error or 'fatal error'}) outside the model's code "
                                f"while {marker.get('phase')} {what}", {**base, **fatal})]
        return [CrashReport("agent.unclean_exit", "warning", f"the agent serving {what} ended without stopping (killed, out of "
                            "memory or power lost); not counted as a model crash", base)]
