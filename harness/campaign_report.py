"""After a GPU campaign, on CPU: fit the CUDA terms on half of the records, judge them on the other half, and write
the README's error table.

    python -m optimem.harness.campaign_report results/gpu-...-2026-12-06.jsonl --markdown results/gpu-....md \
        [--json results/gpu-....json]

Records are the campaign's (or any ``bench run``/``sweep`` CUDA records). Successful CUDA runs are split into two
halves, alternately within each optimizer family in the order of a hash of their ``run_id`` (so the split does not
depend on file order and each family is in both halves). :func:`optimem.harness.calibrate.calibrate` fits the
machine constants (cuBLAS workspace, context, reserved fraction) on the first half only; the second half is judged
with the shipped defaults (before) and with the fitted constants (after). No figure of the judged half is used to
fit them.

Per optimizer family: the median absolute and the worst (signed) relative error of the peak allocated
(``max_memory_allocated``), the reserved peak (``max_memory_reserved``) and the device total (NVML: peak used above
the idle baseline, context included), each before/after; and the optimizer step: its measured median time and the
bandwidth it achieved, against the catalog GPU's HBM bandwidth. The bytes an optimizer step moves are a rule, not a
measurement: it reads the trainable parameters, their gradients and the optimizer state and writes the parameters
and the state once (from the estimate); real kernels may touch some of them more than once (8-bit blocks, foreach
temporaries), so the achieved figure is a lower bound. The goal (issue 26): peak allocated median <= 2%, worst <= 5%.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from optimem.estimators import cuda_overhead as co
from optimem.estimators.errors import UserError
from optimem.harness.calibrate import calibrate

GOAL_MEDIAN, GOAL_WORST = 0.02, 0.05
"""Issue 26's goal for the peak allocated: median absolute error <= 2%, worst <= 5%."""
SYNTHETIC_KEY = "synthetic_test_data"
"""A record whose ``run`` holds this key (true) is made up by a test: the report says so on its first line."""


def cuda_records(records: Iterable[dict]) -> list[dict]:
    """The successful CUDA runs with an allocator peak (the records the fit and the judging can use)."""
    out = []
    for r in records:
        m = r.get("measured") or {}
        if r.get("status") == "ok" and m.get("device") == "cuda" and (m.get("peaks") or {}).get("max_memory_allocated"):
            out.append(r)
    return out


def family_of(record: dict) -> str:
    from optimem.estimators import get_spec

    try:
        return get_spec(record["config"]["optim"]).family
    except (KeyError, UserError):
        return str(record.get("config", {}).get("optim"))


def split_halves(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fit, judge): within each optimizer family, ordered by sha256(run_id), alternately."""
    fams: dict[str, list[dict]] = {}
    for r in records:
        fams.setdefault(family_of(r), []).append(r)
    fit, judge = [], []
    for rs in fams.values():
        rs = sorted(rs, key=lambda r: hashlib.sha256(str(r.get("run_id")).encode()).hexdigest())
        fit += rs[0::2]
        judge += rs[1::2]
    return fit, judge


def _estimate(record: dict):
    from optimem.estimators.estimate import estimate
    from optimem.harness.run_config import RunConfig

    return estimate(replace(RunConfig.from_dict(record["config"]), device="cuda"))


def predicted_totals(est, c: co.CudaConstants) -> dict[str, int]:
    """Allocated, reserved and device peaks (bytes) for an estimate under constants ``c``: the same sums as
    :func:`optimem.estimators.cuda_overhead.cuda_terms` (tensor peak + rounding + workspace; + the replayed caching
    allocator's reserve over allocated; + context), with other constants than the ones the estimate was made with
    (the replay's reserve over allocated is the estimate's: made with its own workspace)."""
    allocated = est.bytes["peak"] + est.cuda["rounding"] + c.cublas_workspace_bytes
    reserved = allocated + est.cuda["reserved_overhead"]
    return {"allocated": allocated, "reserved": reserved, "device": reserved + c.context_bytes}


def measured_totals(record: dict) -> dict[str, int | None]:
    peaks = record["measured"]["peaks"]
    nvml = peaks.get("nvml") or {}
    return {"allocated": peaks.get("max_memory_allocated"), "reserved": peaks.get("max_memory_reserved"),
            "device": nvml.get("peak_above_baseline_bytes")}


def step_bytes_rule(est) -> int:
    """Bytes an optimizer step moves, by rule: read trainable parameters + gradients + state, write parameters +
    state (from the estimate; a lower bound on what the kernels touch)."""
    trainable = est.bytes.get("weights_trainable", est.bytes["weights"])
    return 2 * trainable + est.bytes["gradients"] + 2 * est.bytes.get("optimizer_state_device", 0)


def hbm_bandwidth(device_name: str | None) -> float | None:
    """The catalog GPU's memory bandwidth in bytes/s (None when the device is not in the catalog)."""
    from optimem.estimators.gpus import load_gpus, match_gpu

    gpu = match_gpu(device_name or "", load_gpus()) if device_name else None
    return gpu.bandwidth_gbs * 1e9 if gpu is not None and gpu.bandwidth_gbs else None


def _constants_from_fit(fit: dict) -> co.CudaConstants:
    return co.CudaConstants(int(fit["cublas_workspace_bytes"]), int(fit["context_bytes"]), True,
                            int(fit.get("runs", 0)), str(fit.get("source", "")))


def analyse(records: Iterable[dict]) -> dict[str, Any]:
    """The whole analysis as data: the fit (per GPU), per-record errors of the judged half, per-family summaries."""
    usable = cuda_records(records)
    ests = {id(r): _estimate(r) for r in usable}
    untraced = [r for r in usable if ests[id(r)].bytes.get("peak") is None]  # e.g. an LLM.int8 base on CUDA
    usable = [r for r in usable if ests[id(r)].bytes.get("peak") is not None]
    if not usable:
        raise UserError("no successful CUDA records (status ok, measured on cuda, with max_memory_allocated) whose "
                        "step the estimator traces: nothing to fit or judge; give the records a GPU campaign wrote")
    fit_half, judge_half = split_halves(usable)
    fits = calibrate(fit_half)
    default = co.constants()
    rows = []
    for r in judge_half:
        est = ests[id(r)]
        gpu = (r.get("env") or {}).get("device_name") or "unknown"
        after_c = _constants_from_fit(fits[gpu]) if gpu in fits else default
        meas = measured_totals(r)
        before, after = predicted_totals(est, default), predicted_totals(est, after_c)
        err = {f"{k}_{when}": (p[k] - meas[k]) / meas[k] if meas[k] else None
               for when, p in (("before", before), ("after", after)) for k in ("allocated", "reserved", "device")}
        opt = (((r["measured"].get("throughput") or {}).get("optimizer_step_time_s")) or {}).get("p50")
        moved = step_bytes_rule(est)
        bw = hbm_bandwidth(gpu)
        rows.append({"run_id": r.get("run_id"), "family": family_of(r), "optim": r["config"]["optim"], "gpu": gpu,
                     "model": r["config"]["model"], "measured": meas, "before": before, "after": after,
                     "tensor_peak": est.bytes["peak"], "errors": err, "optimizer_step_s": opt,
                     "step_bytes_rule": moved, "achieved_bytes_per_s": moved / opt if opt else None,
                     "hbm_bytes_per_s": bw, "synthetic": bool((r.get("run") or {}).get(SYNTHETIC_KEY))})
    return {"fit": fits, "fit_records": len(fit_half), "judged_records": len(judge_half), "untraced": len(untraced),
            "rows": rows,
            "families": summarize(rows), "synthetic": any(x["synthetic"] for x in rows)}


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.median(abs(v) for v in vals), max(vals, key=abs)


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per optimizer family (and ``all``): cases, median |error| and worst error of each total before/after, whether
    the peak allocated meets the goal after calibration, the median optimizer-step time and achieved bandwidth."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["family"], []).append(row)
    if rows:
        groups["all"] = rows
    out = {}
    for fam, rs in groups.items():
        s: dict[str, Any] = {"cases": len(rs)}
        for key in rs[0]["errors"]:
            s[key] = dict(zip(("median_abs", "worst"), _stats([r["errors"][key] for r in rs])))
        med, worst = s["allocated_after"]["median_abs"], s["allocated_after"]["worst"]
        s["meets_goal"] = med is not None and med <= GOAL_MEDIAN and abs(worst) <= GOAL_WORST
        times = [r["optimizer_step_s"] for r in rs if r["optimizer_step_s"]]
        bws = [r["achieved_bytes_per_s"] / r["hbm_bytes_per_s"] for r in rs
               if r["achieved_bytes_per_s"] and r["hbm_bytes_per_s"]]
        s["optimizer_step_s_median"] = statistics.median(times) if times else None
        s["achieved_bytes_per_s_median"] = statistics.median(
            [r["achieved_bytes_per_s"] for r in rs if r["achieved_bytes_per_s"]]) if times else None
        s["share_of_hbm_median"] = statistics.median(bws) if bws else None
        out[fam] = s
    return out


def published_rows(records: Iterable[dict]) -> list[dict[str, Any]]:
    """The campaign's published setups (tier 5) as measured: peak allocated, reserved and NVML's peak used (what
    ``nvidia-smi`` shows, the figure such guides publish; bytes), the estimate's device total, and the published
    row's own figure as it is written there (``published``; None in the module's fallback table)."""
    out = []
    for r in records:
        camp = (r.get("run") or {}).get("campaign") or {}
        row = camp.get("published")
        if not row:
            continue
        peaks = ((r.get("measured") or {}).get("peaks")) or {}
        out.append({"id": row.get("id") or r["config"]["model"], "status": r.get("status"),
                    "max_memory_allocated": peaks.get("max_memory_allocated"),
                    "max_memory_reserved": peaks.get("max_memory_reserved"),
                    "nvml_peak_used": (peaks.get("nvml") or {}).get("peak_used_bytes"),
                    "estimate_device": (camp.get("estimate") or {}).get("peak_device"),
                    "published": row.get("published"), "source": row.get("source")})
    return out


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.2f}%"


def _abs_pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.2f}%"


def render_markdown(result: dict[str, Any], sources: list[str]) -> str:
    """The README's error table (and the optimizer-step table) for :func:`analyse`'s result."""
    lines = []
    if result["synthetic"]:
        lines += ["**SYNTHETIC TEST DATA: made up by a test, not a measurement. Never publish these figures.**", ""]
    gpus = sorted({r["gpu"] for r in result["rows"]})
    lines += [f"Records: {', '.join(sources)}; GPU: {', '.join(gpus)}; CUDA constants fitted on "
              f"{result['fit_records']} runs, judged on the other {result['judged_records']} (split by optimizer "
              "family; `python -m optimem.harness.campaign_report`).", "",
              "| family | cases | peak allocated, median / worst (before) | after calibration | reserved (before) | "
              "after | device total (before) | after | goal met |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for fam, s in result["families"].items():
        cells = []
        for k in ("allocated", "reserved", "device"):
            for when in ("before", "after"):
                v = s[f"{k}_{when}"]
                cells.append(f"{_abs_pct(v['median_abs'])} / {_pct(v['worst'])}" if v["worst"] is not None else "n/a")
        lines.append(f"| {fam} | {s['cases']} | " + " | ".join(cells) + f" | {'yes' if s['meets_goal'] else 'no'} |")
    missing = [f for f, s in result["families"].items() if f != "all" and not s["meets_goal"]]
    lines += ["", f"Goal: peak allocated median <= {GOAL_MEDIAN:.0%}, worst <= {GOAL_WORST:.0%} after calibration. "
              + (f"Not met by: {', '.join(missing)}." if missing else "Met by every family.")]
    lines += ["", "| family | optimizer step, median | bytes moved (rule) per s, median | share of the GPU's HBM "
                  "bandwidth |", "| --- | ---: | ---: | ---: |"]
    for fam, s in result["families"].items():
        t, bw, share = s["optimizer_step_s_median"], s["achieved_bytes_per_s_median"], s["share_of_hbm_median"]
        lines.append(f"| {fam} | {'' if t is None else f'{t * 1e3:.2f} ms'} | "
                     f"{'' if bw is None else f'{bw / 1e9:.1f} GB/s'} | "
                     f"{'' if share is None else f'{share * 100:.3g}%'} |")
    lines += ["", "Bytes moved by an optimizer step are a rule (read parameters, gradients and state, write parameters "
              "and state once, from the estimate), not a measurement: the achieved bandwidth is a lower bound."]
    if result.get("published"):
        lines += ["", "Published setups measured on this GPU (MiB; the published figure as its source writes it):", "",
                  "| setup | status | max allocated | max reserved | NVML peak used | our estimate (device) | "
                  "published |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for p in result["published"]:
            mib = [("" if p[k] is None else f"{p[k] / 2**20:,.0f}") for k in
                   ("max_memory_allocated", "max_memory_reserved", "nvml_peak_used", "estimate_device")]
            lines.append(f"| {p['id']} | {p['status']} | " + " | ".join(mib) +
                         f" | {'' if p['published'] is None else p['published']} |")
    fits = result["fit"]
    for gpu, f in fits.items():
        lines.append(f"\nFitted on {f['runs']} runs of {gpu}: cuBLAS workspace {f['cublas_workspace_bytes']} B, "
                     f"context {f['context_bytes']} B (reserved memory is the caching allocator's replay, not "
                     "fitted).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from optimem.harness.campaign import OneLineParser
    from optimem.harness.record import read_records

    p = OneLineParser(prog="python -m optimem.harness.campaign_report",
                                description="Fit the CUDA terms on half of the GPU records, judge the other half.")
    p.add_argument("records", nargs="+", help="JSONL files of GPU records (a campaign's, bench run's, bench sweep's)")
    p.add_argument("--markdown", help="write the tables here (else printed)")
    p.add_argument("--json", help="write the whole analysis here")
    args = p.parse_args(argv)
    records = []
    try:
        for path in args.records:
            if not Path(path).is_file():
                raise UserError(f"{path}: no such file (give the JSONL records a GPU campaign wrote)")
            records += list(read_records(path))
        result = analyse(records)
        result["published"] = published_rows(records)
    except UserError as exc:
        print(f"campaign_report: {exc}", file=sys.stderr)
        return 2
    text = render_markdown(result, [Path(x).name for x in args.records])
    if args.markdown:
        Path(args.markdown).write_text(text)
    else:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


__all__ = ["GOAL_MEDIAN", "GOAL_WORST", "SYNTHETIC_KEY", "analyse", "cuda_records", "main", "predicted_totals",
           "published_rows", "render_markdown", "split_halves", "step_bytes_rule", "summarize"]

if __name__ == "__main__":
    sys.exit(main())
