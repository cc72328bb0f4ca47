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

    python -m estimators.cuda_overhead calibrate results/runs.jsonl [--write]

which, for every successful CUDA record, recomputes the tensor peak the phase model predicts for its
configuration and fits: workspace = median(max_memory_allocated - predicted tensor peak - rounding);
reserved_fraction = median(max_memory_reserved / max_memory_allocated - 1); context = median of the
NVML-measured context bytes. All figures are bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
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
    """The CUDA-only terms for a :class:`~estimators.peak.StepMemory` (bytes), at its peak phase:
    ``rounding``, ``cublas_workspace``, ``peak_allocated`` (tensor peak + both), ``reserved_overhead``,
    ``peak_reserved``, ``context`` and ``peak_device`` (reserved + context: what ``nvidia-smi`` would
    show), plus the constants' provenance."""
    c = constants(gpu)
    ph = mem.phases[mem.peak_phase]
    pr = persistent_rounding(inv, state_sizes)
    rounding = pr["weights"] + (pr["gradients"] if ph["gradients"] else 0) + \
        (pr["optimizer_state"] if ph["optimizer_state"] else 0) + (mem.allocations or {}).get(mem.peak_phase, 0) * BLOCK // 2
    allocated = mem.peak + rounding + c.cublas_workspace_bytes
    reserved_over = int(allocated * c.reserved_fraction)
    reserved = allocated + reserved_over
    return {"rounding": rounding, "cublas_workspace": c.cublas_workspace_bytes, "peak_allocated": allocated,
            "reserved_overhead": reserved_over, "peak_reserved": reserved, "context": c.context_bytes,
            "peak_device": reserved + c.context_bytes, "gpu": gpu, "calibrated": c.calibrated,
            "calibration_runs": c.runs, "source": c.source}


# ------------------------------------------------------------------------------------------------- calibration
def _config_estimate(cfg: dict):
    from estimators import estimate, get_spec

    spec = get_spec(cfg["optim"])
    targets = cfg.get("optim_target_modules") if spec.needs_target_modules else None
    return estimate(cfg["model"], cfg["optim"], dtype=cfg["dtype"], optim_args=cfg.get("optim_args"),
                    optim_target_modules=targets, batch_size=cfg["batch_size"], seq_len=cfg["seq_len"],
                    gradient_checkpointing=cfg["gradient_checkpointing"], mixed_precision=cfg.get("mixed_precision"),
                    grad_accum=cfg.get("grad_accum", 1), device="cuda")


def calibrate(records) -> dict[str, dict]:
    """Fit the constants per GPU from run records (see the module docstring). Records that are not
    successful CUDA runs are skipped."""
    per: dict[str, dict[str, list]] = {}
    for rec in records:
        m = rec.get("measured") or {}
        if rec.get("status") != "ok" or m.get("device") != "cuda":
            continue
        peaks = m.get("peaks", {})
        alloc, reserved = peaks.get("max_memory_allocated"), peaks.get("max_memory_reserved")
        if not alloc:
            continue
        gpu = (rec.get("env") or {}).get("device_name") or "unknown"
        est = _config_estimate(rec["config"])
        d = per.setdefault(gpu, {"workspace": [], "reserved": [], "context": []})
        d["workspace"].append(alloc - est.bytes["peak"] - est.cuda["rounding"])
        if reserved:
            d["reserved"].append(reserved / alloc - 1.0)
        ctx = (peaks.get("nvml") or {}).get("cuda_context_bytes")
        if ctx:
            d["context"].append(ctx)
    default = _table()["default"]
    out = {}
    for gpu, d in per.items():
        out[gpu] = {"cublas_workspace_bytes": int(max(0, statistics.median(d["workspace"]))),
                    "context_bytes": int(statistics.median(d["context"])) if d["context"] else default["context_bytes"],
                    "reserved_fraction": round(max(0.0, statistics.median(d["reserved"])), 4) if d["reserved"]
                    else default["reserved_fraction"],
                    "calibrated": True, "runs": len(d["workspace"]),
                    "source": "fitted by python -m estimators.cuda_overhead calibrate"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m estimators.cuda_overhead",
                                description="Fit the CUDA-only constants from recorded bench run records.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="fit per-GPU constants from JSONL run records")
    c.add_argument("records", nargs="+", help="JSONL files written by 'bench run'")
    c.add_argument("--write", action="store_true", help=f"merge the fit into {CALIBRATION}")
    sub.add_parser("show", help="print the calibration table")
    args = p.parse_args(argv)
    if args.cmd == "show":
        print(json.dumps(_table(), indent=2))
        return 0
    from harness.record import read_records

    records = [r for path in args.records for r in read_records(path)]
    fit = calibrate(records)
    if not fit:
        print("no successful CUDA records found: nothing to calibrate", file=sys.stderr)
        return 1
    print(json.dumps(fit, indent=2))
    if args.write:
        table = json.loads(CALIBRATION.read_text())
        table.setdefault("gpus", {}).update(fit)
        CALIBRATION.write_text(json.dumps(table, indent=2) + "\n")
        _table.cache_clear()
        print(f"written to {CALIBRATION}", file=sys.stderr)
    return 0


__all__ = ["BLOCK", "CALIBRATION", "CudaConstants", "asdict", "calibrate", "constants", "cuda_terms",
           "persistent_rounding", "round_up"]

if __name__ == "__main__":
    sys.exit(main())
