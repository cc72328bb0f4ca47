"""Fit the estimator's machine-dependent CUDA constants from recorded runs.

    python -m optimem.harness.calibrate cuda results/runs.jsonl [--write]   # fit per GPU; --write merges the fit
    python -m optimem.harness.calibrate show                                # the table in use

The constants and what they mean live in :mod:`optimem.estimators.cuda_overhead` (the estimator reads them from
``estimators/calibration/cuda.json``); fitting them needs recorded runs, which are the harness's, so the fit
lives here. For every successful CUDA record the estimate of its configuration (the record's ``config``,
read back as a :class:`~optimem.harness.run_config.RunConfig`) gives the tensor peak, and per GPU:
workspace = median(max_memory_allocated - predicted tensor peak - rounding); context = median of the
NVML-measured context bytes. Reserved memory is not fitted: the estimate replays the caching allocator
(``estimators/allocator.py``). All figures are bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from dataclasses import replace

from optimem.estimators import cuda_overhead as co
from optimem.estimators.estimate import estimate
from optimem.harness.run_config import RunConfig


def calibrate(records: Iterable[dict]) -> dict[str, dict]:
    """Fit the constants per GPU (``env.device_name``) from run records; records that are not successful
    CUDA runs are skipped."""
    per: dict[str, dict[str, list]] = {}
    for rec in records:
        m = rec.get("measured") or {}
        if rec.get("status") != "ok" or m.get("device") != "cuda":
            continue
        peaks = m.get("peaks", {})
        alloc = peaks.get("max_memory_allocated")
        if not alloc:
            continue
        gpu = (rec.get("env") or {}).get("device_name") or "unknown"
        est = estimate(replace(RunConfig.from_dict(rec["config"]), device="cuda"))
        d = per.setdefault(gpu, {"workspace": [], "context": []})
        d["workspace"].append(alloc - est.bytes["peak"] - est.cuda["rounding"])
        ctx = (peaks.get("nvml") or {}).get("cuda_context_bytes")
        if ctx:
            d["context"].append(ctx)
    default = co.constants()
    out = {}
    for gpu, d in per.items():
        out[gpu] = {"cublas_workspace_bytes": int(max(0, statistics.median(d["workspace"]))),
                    "context_bytes": int(statistics.median(d["context"])) if d["context"] else default.context_bytes,
                    "calibrated": True, "runs": len(d["workspace"]),
                    "source": "fitted by python -m optimem.harness.calibrate cuda"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimem.harness.calibrate",
                                description="Fit the estimator's CUDA-only constants from recorded bench run records.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cuda", help="fit per-GPU constants from JSONL run records")
    c.add_argument("records", nargs="+", help="JSONL files written by 'bench run' / 'bench sweep'")
    c.add_argument("--write", action="store_true", help=f"merge the fit into {co.CALIBRATION}")
    sub.add_parser("show", help="print the calibration table")
    args = p.parse_args(argv)
    if args.cmd == "show":
        print(json.dumps(co._table(), indent=2))
        return 0
    from optimem.harness.record import read_records

    records = [r for path in args.records for r in read_records(path)]
    fit = calibrate(records)
    if not fit:
        print("no successful CUDA records found: nothing to calibrate", file=sys.stderr)
        return 1
    print(json.dumps(fit, indent=2))
    if args.write:
        table = json.loads(co.CALIBRATION.read_text())
        table.setdefault("gpus", {}).update(fit)
        co.CALIBRATION.write_text(json.dumps(table, indent=2) + "\n")
        co._table.cache_clear()
        print(f"written to {co.CALIBRATION}", file=sys.stderr)
    return 0


__all__ = ["calibrate", "main"]

if __name__ == "__main__":
    sys.exit(main())
