"""CUDA-only memory terms: what a CUDA device holds beyond the live tensor bytes the phase model counts.

The phase model predicts the peak of live *tensor* bytes (what the harness's tensor accountant measures
exactly on CPU, and what ``torch.cuda.max_memory_allocated`` approximates on CUDA). On a CUDA device four
more terms decide whether a run fits; they are reported separately (``Estimate.cuda``), never folded into
``bytes["peak"]``:

``rounding``
    PyTorch's caching allocator rounds every block up to a multiple of 512 bytes (``kMinBlockSize``).
    Exact for parameters, gradients and optimizer state (their sizes are known); for activations and
    transients the simulator counts the live allocations at the peak and charges half a block each (the
    expected waste when sizes are not multiples of 512; large activations usually are, so this leans
    high).
``cublas_workspace``
    cuBLAS and cuBLASLt allocate their workspaces through the caching allocator on the first matmul of a
    stream, so they appear in ``max_memory_allocated``. Their size depends on the torch version and the
    GPU generation (``CUBLAS_WORKSPACE_CONFIG``, ``CUBLASLT_WORKSPACE_SIZE``): machine-dependent.
``context``
    The CUDA context (driver state, loaded kernels): memory ``nvidia-smi`` shows but the allocator does
    not. Depends on the GPU, driver, CUDA version and lazy module loading: machine-dependent.
``reserved`` (a model of the caching allocator's segments)
    The allocator keeps freed blocks cached in segments it got from the driver; ``max_memory_reserved``
    exceeds ``max_memory_allocated`` by the segments' rounding (2 MiB for large blocks, 2 MiB small-pool
    segments, 20 MiB segments for 1-10 MiB blocks) and fragmentation. Modelled as ``reserved_fraction``
    of the allocated peak: machine- and workload-dependent.

The machine-dependent constants (``cublas_workspace_bytes``, ``context_bytes``, ``reserved_fraction``)
live in ``estimators/calibration/cuda.json``: a ``default`` entry (PyTorch's documented defaults and
typical values, marked uncalibrated) and per-GPU entries fitted from recorded ``bench run`` records by

    python -m optimem.harness.calibrate cuda results/runs.jsonl [--write]

which, for every successful CUDA record, recomputes the tensor peak the phase model predicts for its
configuration and fits: workspace = median(max_memory_allocated - predicted tensor peak - rounding);
reserved_fraction = median(max_memory_reserved / max_memory_allocated - 1); context = median of the
NVML-measured context bytes. All figures are bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

CALIBRATION = Path(__file__).with_name("calibration") / "cuda.json"
BLOCK = 512
"""PyTorch CUDACachingAllocator's ``kMinBlockSize``: every allocation is rounded up to a multiple."""


@dataclass(frozen=True)
class CudaConstants:
    """The machine-dependent constants for one GPU (or the defaults). ``calibrated``: fitted from
    ``runs`` recorded runs (``False``: documented defaults)."""

    cublas_workspace_bytes: int
    context_bytes: int
    reserved_fraction: float
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
                         float(data["reserved_fraction"]), bool(data.get("calibrated", False)),
                         int(data.get("runs", 0)), str(data.get("source", "")))


def round_up(n: int, block: int = BLOCK) -> int:
    return -(-n // block) * block


@lru_cache(maxsize=64)
def persistent_rounding(inv, state_sizes: tuple) -> dict[str, int]:
    """Exact rounding waste of parameters, gradients (trainable parameters) and optimizer state tensors."""
    weights = sum(round_up(r.nbytes) - r.nbytes for r in inv.rows)
    grads = sum(round_up(r.nbytes) - r.nbytes for r in inv.rows if r.trainable)
    state = sum(round_up(n) - n for n in state_sizes)
    return {"weights": weights, "gradients": grads, "optimizer_state": state}


def cuda_terms(mem, inv, state_sizes: tuple, gpu: str | None = None) -> dict:
    """The CUDA-only terms for a :class:`~optimem.estimators.peak.StepMemory` (bytes), at its peak phase:
    ``rounding``, ``cublas_workspace``, ``peak_allocated`` (tensor peak + both), ``reserved_overhead``,
    ``peak_reserved``, ``context`` and ``peak_device`` (reserved + context: what ``nvidia-smi`` would
    show), plus the constants' provenance."""
    c = constants(gpu)
    ph = mem.phases[mem.peak_phase]
    pr = persistent_rounding(inv, state_sizes)
    rounding = pr["weights"] + (pr["gradients"] if ph["gradients"] else 0) + \
        (pr["optimizer_state"] if ph["optimizer_state"] else 0) + (mem.allocations or {}).get(mem.peak_phase, 0) * BLOCK // 2
    allocated = mem.peak + rounding + c.cublas_workspace_bytes
    # a float product is exact enough below 2**53 bytes; above, Fraction keeps every digit of a huge shape's figure
    reserved_over = int(allocated * c.reserved_fraction) if allocated < 1 << 53 else \
        int(allocated * Fraction(c.reserved_fraction))
    reserved = allocated + reserved_over
    return {"rounding": rounding, "cublas_workspace": c.cublas_workspace_bytes, "peak_allocated": allocated,
            "reserved_overhead": reserved_over, "peak_reserved": reserved, "context": c.context_bytes,
            "peak_device": reserved + c.context_bytes, "gpu": gpu, "calibrated": c.calibrated,
            "calibration_runs": c.runs, "source": c.source}


__all__ = ["BLOCK", "CALIBRATION", "CudaConstants", "calibrated_gpus", "constants", "cuda_terms", "persistent_rounding", "round_up"]
