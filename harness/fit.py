"""Refuse a run that cannot fit, before it starts: the estimate against the memory the device has now.

:func:`check` answers in two stages. First the model states alone (weights + gradients + optimizer state,
no step traced: milliseconds once the model's inventory is cached) against the memory available; a run whose
states alone do not fit is refused without tracing anything. Then, when the whole-step prediction is at hand
(``predicted``: ``estimate(...).to_dict()``), its peak (on CUDA: ``cuda.peak_device``, the caching allocator's
reserve and the CUDA context included) against the same figure.

Memory available (:func:`available_memory`, bytes): on CUDA the device's free memory as NVML reports it
(``nvmlDeviceGetMemoryInfo().free``, no CUDA context created; else ``torch.cuda.mem_get_info``); on CPU the
kernel's ``MemAvailable`` (psutil's ``available``), lowered to what the process's cgroup still allows
(``memory.max - memory.current``: a container's or a Slurm job's limit) when that is smaller.

Only single-process runs are checked: a multi-process run's per-rank figures are the planner's (sharded
states), not this one-process estimate's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from optimem.harness.units import human_bytes
from optimem.estimators import get_spec
from optimem.estimators.estimate import estimate_setup
from optimem.harness.launcher import predict, skip_reason
from optimem.harness.env_facts import collect_env
from optimem.harness.record import build_record

OOM_PREDICTED = "oom-predicted"
"""The status of a sweep's record for a configuration refused before it ran."""


@dataclass(frozen=True)
class Refusal:
    """Why a run cannot fit: what it needs and what the device has (bytes)."""

    needed: int
    available: int
    what: str
    """What ``needed`` counts (``weights + gradients + optimizer state`` or ``whole-step peak``)."""
    parts: str
    """``needed`` split into its terms, human-readable."""
    source: str
    """Where ``available`` was read (``MemAvailable``, ``cgroup memory.max``, ``NVML free``...)."""
    device: str
    predicted: dict[str, Any] | None = None
    """The estimate refused on (``estimate().to_dict()``; states only in the first stage)."""

    def text(self) -> str:
        """One line with the figures."""
        where = "the GPU has" if self.device == "cuda" else "this machine has"
        return (f"predicted out of memory: the estimate needs {human_bytes(self.needed)} ({self.what}: "
                f"{self.parts}) but {where} {human_bytes(self.available)} available ({self.source})")


def _cgroup_room() -> tuple[int | None, str]:
    """Bytes the process's cgroup (v2) still allows, or None where there is no limit."""
    try:
        rel = next((ln.split("::", 1)[1].strip() for ln in Path("/proc/self/cgroup").read_text().splitlines()
                    if ln.startswith("0::")), None)
        if rel is None:
            return None, ""
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None, ""
        used = int((base / "memory.current").read_text().strip())
        return max(int(limit) - used, 0), "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        return None, ""


def _host_available() -> tuple[int, str]:
    import psutil  # lazy: pulls in psutil, which importing this module does not

    avail, source = int(psutil.virtual_memory().available), "MemAvailable"
    room, where = _cgroup_room()
    if room is not None and room < avail:
        return room, where
    return avail, source


def _cuda_free() -> tuple[int | None, str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        import pynvml  # lazy: pynvml is optional (the nvml extra)

        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(visible))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free), "NVML free"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (package or driver): ask torch, which creates a context
        pass
    try:
        import torch  # lazy: pulls in torch, which importing this module does not

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0]), "torch.cuda.mem_get_info free"
    except Exception:  # noqa: BLE001 - no CUDA to ask
        pass
    return None, ""


def available_memory(device: str) -> tuple[int | None, str]:
    """``(bytes available on device now, where that was read)``; None where it cannot be read."""
    if device == "cuda":
        return _cuda_free()
    return _host_available()


def _states(est: dict, device: str) -> tuple[int, str]:
    b = est["bytes"]
    state = b["optimizer_state"] if device == "cpu" else b["optimizer_state_device"]
    need = b["weights"] + b["gradients"] + state
    parts = (f"weights {human_bytes(b['weights'])} + gradients {human_bytes(b['gradients'])} + optimizer state "
             f"{human_bytes(state)}")
    return need, parts


def check(cfg, device: str, *, predicted: dict | None = None,
          available: tuple[int | None, str] | None = None) -> Refusal | None:
    """The :class:`Refusal` of ``cfg`` (a :class:`~optimem.harness.run_config.RunConfig`) on ``device``
    (``cpu``/``cuda``), or None when it may fit (or cannot be judged: an optimizer optimem does not estimate,
    a multi-process run, memory that cannot be read). ``predicted``: the whole-step estimate when the caller
    has it (else only the model states are checked); ``available``: ``(bytes, source)`` instead of reading
    the device (tests)."""
    if cfg.num_processes > 1 or get_spec(cfg.optim).availability != "ok":
        return None
    room, source = available if available is not None else available_memory(device)
    if room is None:
        return None
    states = estimate_setup(replace(cfg, device=device).setup(), states_only=True).to_dict()
    need, parts = _states(states, device)
    if need > room:
        return Refusal(need, room, "weights + gradients + optimizer state", parts, source, device, states)
    if predicted is None:
        return None
    peak = (predicted.get("cuda") or {}).get("peak_device") if device == "cuda" else None
    peak = peak if peak is not None else (predicted.get("bytes") or {}).get("peak")
    if peak is not None and peak > room:
        what = "whole-step peak" + (" on the device, CUDA context and allocator reserve included"
                                    if device == "cuda" else "")
        phase = predicted.get("peak_phase") or "?"
        return Refusal(peak, room, what, f"at {phase}; {parts}", source, device, predicted)
    return None


def judge(cfg, device: str, *, available: tuple[int | None, str] | None = None) -> Refusal | None:
    """:func:`check` with both stages (the whole-step prediction computed only when the states fit); None for
    a configuration the run itself will record as skipped."""
    if skip_reason(cfg, device) is not None:
        return None
    return check(cfg, device, available=available) or check(cfg, device, predicted=predict(cfg), available=available)


def refusal_record(cfg, device: str, *, refusal: Refusal | None = None,
                   available: tuple[int | None, str] | None = None) -> dict | None:
    """The ``oom-predicted`` record of ``cfg`` (``refusal``: already found; else :func:`judge` is asked), or
    None when it may fit."""
    refusal = refusal or judge(cfg, device, available=available)
    if refusal is None:
        return None
    fit = {"needed_bytes": refusal.needed, "available_bytes": refusal.available, "available_from": refusal.source,
           "needed": refusal.what}
    return build_record(config=cfg.to_dict(), status=OOM_PREDICTED, reason=refusal.text(), measured=None,
                        predicted=refusal.predicted, env=collect_env(device, get_spec(cfg.optim)),
                        run={"resolved_device": device, "duration_s": 0.0, "fit": fit})


__all__ = ["OOM_PREDICTED", "Refusal", "available_memory", "check", "judge", "refusal_record"]
