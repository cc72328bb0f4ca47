"""CUDA-only memory terms: what a CUDA device holds beyond the live tensor bytes the phase model counts.

The phase model predicts the peak of live *tensor* bytes (what the harness's tensor accountant measures
exactly on CPU, and what ``torch.cuda.max_memory_allocated`` approximates on CUDA). On a CUDA device four
more terms decide whether a run fits; they are reported separately (``Estimate.cuda``), never folded into
``bytes["peak"]``:

``rounding``
    PyTorch's caching allocator rounds every block up to a multiple of 512 bytes (``kMinBlockSize``) and hands
    out a whole cached block when the rest would be too small to split: what the replayed blocks (below) hold
    beyond the tensor bytes.
``cublas_workspace``
    cuBLAS and cuBLASLt allocate their workspaces through the caching allocator on the first matmul of a
    stream, so they appear in ``max_memory_allocated``. Their size depends on the torch version and the
    GPU generation (``CUBLAS_WORKSPACE_CONFIG``, ``CUBLASLT_WORKSPACE_SIZE``): machine-dependent.
``context``
    The CUDA context (driver state, loaded kernels): memory ``nvidia-smi`` shows but the allocator does
    not. Depends on the GPU, driver, CUDA version and lazy module loading: machine-dependent.
``reserved`` (the caching allocator, replayed)
    The allocator keeps freed blocks cached in segments it got from the driver; ``max_memory_reserved`` is a
    deterministic function of the sequence of allocations and frees. :func:`cuda_terms` replays the step's
    sequence (``estimators/alloc_tape.py``: model load, optimizer ``__init__`` state, step 0 and a steady step)
    through the allocator's algorithm (``estimators/allocator.py``, written from
    ``c10/cuda/CUDACachingAllocator.cpp``; ``PYTORCH_CUDA_ALLOC_CONF``'s ``max_split_size_mb``,
    ``roundup_power2_divisions``, ``expandable_segments`` and ``garbage_collection_threshold`` are read from
    ``alloc_conf`` or the environment). Its peak allocated bytes replace the rounding estimate above when the
    replay runs (``rounding`` is then what the replayed blocks add over the tensor peak and the workspace).

The machine-dependent constants (``cublas_workspace_bytes``, ``context_bytes``) live in
``estimators/calibration/cuda.json``: a ``default`` entry (PyTorch's documented defaults and typical values,
marked uncalibrated) and per-GPU entries fitted from recorded ``bench run`` records by

    python -m optimem.harness.calibrate cuda results/runs.jsonl [--write]

which, for every successful CUDA record, recomputes the estimate for its configuration and fits:
workspace = median(max_memory_allocated - predicted tensor peak - rounding); context = median of the
NVML-measured context bytes. Nothing is fitted to reserved memory: that is the replay's. All figures are bytes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .allocator import K_MIN_BLOCK as BLOCK, AllocatorConfig, OutOfMemory, replay_arrays
from .alloc_tape import region_tape
CALIBRATION = Path(__file__).with_name("calibration") / "cuda.json"


@dataclass(frozen=True)
class CudaConstants:
    """The machine-dependent constants for one GPU (or the defaults). ``calibrated``: fitted from
    ``runs`` recorded runs (``False``: documented defaults)."""

    cublas_workspace_bytes: int
    context_bytes: int
    calibrated: bool = False
    runs: int = 0
    source: str = ""


@lru_cache(maxsize=8)
def _table(path: str = str(CALIBRATION)) -> dict:
    with open(path) as fh:
        return json.load(fh)


def calibrated_gpus(path: Path | str = CALIBRATION) -> list[str]:
    """The device names (``torch.cuda.get_device_name()``) that have fitted constants."""
    return sorted(_table(str(path)).get("gpus", {}))


def constants(gpu: str | None = None, path: Path | str = CALIBRATION) -> CudaConstants:
    """The constants for ``gpu`` (a ``torch.cuda.get_device_name()``), else the defaults."""
    table = _table(str(path))
    entry = table.get("gpus", {}).get(gpu) if gpu else None
    data = entry if entry is not None else table["default"]
    return CudaConstants(int(data["cublas_workspace_bytes"]), int(data["context_bytes"]),
                         bool(data.get("calibrated", False)),
                         int(data.get("runs", 0)), str(data.get("source", "")))


def alloc_config(alloc_conf: str | None = None) -> AllocatorConfig:
    """The allocator options: ``alloc_conf`` (a ``PYTORCH_CUDA_ALLOC_CONF`` string), else the environment's."""
    text = alloc_conf if alloc_conf is not None else os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return AllocatorConfig.parse(text)


@lru_cache(maxsize=4096)
def replayed(model, b: int, s: int, workspace: int, config: AllocatorConfig, capacity: int | None = None):
    """The allocator replay (:class:`~optimem.estimators.allocator.Replay`) of ``model``'s step at ``(b, s)``
    (a :class:`~optimem.estimators.peak.PhaseModel`; cached per shape and options). ``capacity``: the bytes the
    driver can give (None: unlimited); past it the allocator frees its cache and retries, then
    :class:`~optimem.estimators.allocator.OutOfMemory`."""
    tape = region_tape(model, b, s, workspace)
    return replay_arrays(tape.handles, tape.is_free, tape.sizes_at(b, s), config, capacity)


def reserve_within(mem, model, b: int, s: int, capacity: int, gpu: str | None = None,
                   alloc_conf: str | None = None) -> int | None:
    """The most the caching allocator reserves when the step runs within ``capacity`` bytes (a GPU's memory less
    its CUDA context), or None when it cannot: the replay with that capacity, where a ``cudaMalloc`` past it makes
    the allocator free its cache and retry (``malloc``'s ``release_cached_blocks`` path) before it runs out of
    memory. While no ``cudaMalloc`` goes past the capacity the replay is the unlimited one, step for step."""
    c = constants(gpu)
    try:
        return replayed(model, b, s, c.cublas_workspace_bytes, alloc_config(alloc_conf), capacity).max_reserved
    except OutOfMemory:
        return None


def cuda_terms(mem, model, b: int, s: int, gpu: str | None = None, alloc_conf: str | None = None) -> dict:
    """The CUDA-only terms for a :class:`~optimem.estimators.peak.StepMemory` of ``model`` at ``(b, s)``
    (bytes): ``cublas_workspace``, ``peak_allocated`` (the replayed allocator's ``max_memory_allocated``:
    blocks as rounded and split), ``rounding`` (what that adds over the tensor peak and the workspace),
    ``reserved_overhead`` and ``peak_reserved`` (its ``max_memory_reserved``), ``context`` and ``peak_device``
    (reserved + context: what ``nvidia-smi`` would show), ``segments`` and ``alloc_retries`` at the end,
    ``alloc_conf`` (the ``PYTORCH_CUDA_ALLOC_CONF`` text replayed) and the constants' provenance."""
    c = constants(gpu)
    text = alloc_conf if alloc_conf is not None else os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    config = alloc_config(text)
    r = replayed(model, b, s, c.cublas_workspace_bytes, config)
    allocated = r.max_allocated
    reserved = r.max_reserved
    return {"rounding": allocated - mem.peak - c.cublas_workspace_bytes, "cublas_workspace": c.cublas_workspace_bytes,
            "peak_allocated": allocated, "reserved_overhead": reserved - allocated, "peak_reserved": reserved,
            "context": c.context_bytes, "peak_device": reserved + c.context_bytes, "segments": r.segments,
            "alloc_retries": r.alloc_retries, "alloc_conf": text or "", "gpu": gpu, "calibrated": c.calibrated,
            "calibration_runs": c.runs, "source": c.source}


__all__ = ["BLOCK", "CALIBRATION", "CudaConstants", "alloc_config", "calibrated_gpus", "constants", "cuda_terms",
           "replayed", "reserve_within"]
