"""Reading results files: records, derived figures (bytes, seconds, samples or tokens per second), and a
pandas table of them; shared by ``bench plot``, ``bench compare``, ``bench sweep`` and the notebook.
Memory breakdowns are in :data:`optimem.estimators.categories.BREAKDOWN`'s categories.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optimem.estimators.categories import BREAKDOWN, to_breakdown
from optimem.estimators.errors import UserError
from optimem.estimators.optimizers import REGISTRY
from optimem.harness.grid import config_label, precision_label, record_key, shape_label
from optimem.harness.record import ReadReport, read_records
from optimem.harness.units import pct_error


def load_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *, reports: list | None = None) -> list[dict]:
    """Every record in one or more JSONL files, file order kept; each gets ``_source`` (the file) and
    ``_line`` (its position). Lines that are not records this optimem reads are skipped (and said so on stderr:
    see :func:`optimem.harness.record.read_records`; ``reports`` collects a :class:`~optimem.harness.record.ReadReport` per
    file); non-record lines (``kind`` set) are left out."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[dict] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"no such results file: {path}")
        report = ReadReport(str(p))
        if reports is not None:
            reports.append(report)
        for i, rec in enumerate(read_records(p, report=report)):
            if rec.get("kind") or "config" not in rec or "status" not in rec:
                continue
            rec["_source"] = str(p)
            rec["_line"] = i
            out.append(rec)
    return out


def none_read(paths: Iterable[str], reports: list) -> str:
    """Why no run record came out of ``paths``: an empty file, or every line skipped (and why)."""
    skipped = [f"{r.path} {r.summary(with_path=False)}" for r in reports if r.skipped]
    if skipped:
        return "no run record this optimem can read: " + "; ".join(skipped)
    return f"no run records in {', '.join(map(str, paths))} (empty): run 'bench sweep' or 'bench run' first"


def latest_by_key(records: Iterable[dict]) -> dict[str, dict]:
    """``{config key: record}``, the last record of each configuration winning (file order)."""
    out: dict[str, dict] = {}
    for rec in records:
        out[record_key(rec)] = rec
    return out


def resolved_device(record: dict) -> str:
    return ((record.get("run") or {}).get("resolved_device") or (record.get("measured") or {}).get("device")
            or (record.get("env") or {}).get("device") or "cpu")


# ------------------------------------------------------------------------------------- predicted
def rank_prediction(record: dict) -> dict | None:
    """A multi-process record's per-rank prediction (``distributed.predicted``, the planner's sharding
    model), or None: single-process records, and schemes the planner has no figure for."""
    pred = ((record.get("distributed") or {}).get("predicted") or {})
    return pred if pred.get("supported") and isinstance(pred.get("peak_bytes"), (int, float)) else None


def predicted_parts(record: dict) -> dict[str, int | None]:
    """Predicted bytes per breakdown category at the predicted peak (None where the estimator has no
    figure): the estimate's own breakdown of its peak phase (``phases[peak_phase]``) when it has one, else
    its totals (on CUDA the optimizer state's device part only: host-kept state is not in device memory).
    A multi-process record's figures are the planner's per-rank ones (sharding overhead in ``other``)."""
    rank = rank_prediction(record)
    if rank is not None:
        return to_breakdown(rank.get("breakdown") or {})
    pred = record.get("predicted") or {}
    b = pred.get("bytes") or {}
    if not b:
        return dict.fromkeys(BREAKDOWN)
    at_peak = (pred.get("phases") or {}).get(pred.get("peak_phase") or "")
    if isinstance(at_peak, dict) and "weights" in at_peak:  # the estimator's own breakdown at its peak
        return to_breakdown(at_peak)
    state = b.get("optimizer_state")
    if resolved_device(record) == "cuda" and b.get("optimizer_state_device") is not None:
        state = b["optimizer_state_device"]
    other = b.get("other")
    if other is None:
        parts = [b.get(k) for k in ("logits", "temporaries", "step_transients", "transients")]
        other = sum(p for p in parts if p) if any(p is not None for p in parts) else None
    parts = {"weights": b.get("weights"), "gradients": b.get("gradients"), "optimizer_state": state,
             "activations": b.get("activations"), "other": other}
    peak = b["peak"] if isinstance(b.get("peak"), (int, float)) else None
    if peak is not None and other is None and parts["activations"] is not None:
        # the whole-step peak is known: what the named parts leave of it is "other" (logits, transients)
        parts["other"] = max(int(peak) - sum(int(v) for v in parts.values() if v), 0)
    return parts


def predicted_peak(record: dict) -> tuple[int | None, bool]:
    """(predicted peak bytes, complete). ``complete`` is False when the estimate has no activation
    figure, so the value is the model states only (weights + gradients + optimizer state)."""
    rank = rank_prediction(record)
    if rank is not None:
        return int(rank["peak_bytes"]), True
    pred = record.get("predicted") or {}
    b = pred.get("bytes") or {}
    if isinstance(b.get("peak"), (int, float)):
        return int(b["peak"]), True
    if isinstance(pred.get("peak_bytes"), (int, float)):
        return int(pred["peak_bytes"]), True
    parts = predicted_parts(record)
    if parts["weights"] is None:
        return None, False
    total = sum(v for v in parts.values() if v)
    return int(total), parts["activations"] is not None


# -------------------------------------------------------------------------------------- measured
def peak_phase(measured: dict) -> tuple[str | None, dict | None]:
    """The phase whose peak is the run's peak (name, phase dict)."""
    phases = (measured or {}).get("phases") or {}
    best = None
    for name, ph in phases.items():
        if best is None or ph.get("peak_bytes", 0) > best[1].get("peak_bytes", 0):
            best = (name, ph)
    return best if best else (None, None)


def measured_parts(record: dict) -> dict[str, int | None]:
    """Measured bytes per breakdown category at the run's peak.

    With the tensor accountant (CPU runs) this is its exact breakdown at the peak; otherwise weights,
    gradients and optimizer state are the measured sizes and ``other`` is the rest of the peak
    (activations then have no figure of their own and are inside ``other``)."""
    m = record.get("measured") or {}
    if not m:
        return dict.fromkeys(BREAKDOWN)
    name, ph = peak_phase(m)
    tensors = (ph or {}).get("tensors")
    if tensors and m.get("primary_tracker", "tensors") == "tensors":
        return to_breakdown(tensors.get("breakdown_at_peak") or {})
    state = m.get("optimizer_state_bytes") or 0
    st = m.get("optimizer_state") or {}
    if m.get("device") == "cuda" and st.get("device") is not None:
        state = st["device"]
    weights = (m.get("parameters_bytes") or 0) + (m.get("buffers_bytes") or 0)
    grads = m.get("gradients_bytes") or 0
    rest = max(int(m.get("peak_bytes") or 0) - weights - grads - state, 0)
    return {"weights": weights, "gradients": grads, "optimizer_state": state, "activations": None, "other": rest}


def step_times(record: dict) -> list[float]:
    """Per-step wall times (seconds) after warmup: the samples throughput comparisons test."""
    tp = ((record.get("measured") or {}).get("throughput") or {})
    samples = tp.get("all_step_times_s")
    if isinstance(samples, list) and samples:
        return [float(x) for x in samples[int(tp.get("warmup_steps") or 0):]]
    return []


# ---------------------------------------------------------------------------------------- table
def record_row(rec: dict) -> dict[str, Any]:
    """One flat row of figures for a record (the columns of :func:`to_frame`)."""
    c = rec.get("config") or {}
    m = rec.get("measured") or {}
    env = rec.get("env") or {}
    spec = REGISTRY.get(str(c.get("optim")))
    tp = m.get("throughput") or {}
    pred = rec.get("predicted") or {}
    ppeak, complete = predicted_peak(rec)
    mpeak = m.get("peak_bytes") if m else None
    row: dict[str, Any] = {
        "key": record_key(rec), "run_id": rec.get("run_id"), "label": config_label(c),
        "optim": c.get("optim"), "family": (pred.get("family") or (spec.family if spec else None) or "other"),
        "model": c.get("model"), "batch_size": c.get("batch_size"), "seq_len": c.get("seq_len"),
        "grad_accum": c.get("grad_accum"), "shape": shape_label(c), "dtype": c.get("dtype"),
        "mixed_precision": c.get("mixed_precision"), "precision": precision_label(c),
        "gradient_checkpointing": bool(c.get("gradient_checkpointing")), "optim_args": c.get("optim_args"),
        "memory_limit_bytes": (c.get("extra") or {}).get("memory_limit_bytes"),
        "steps": c.get("steps"), "warmup": c.get("warmup"),
        "status": rec.get("status"), "reason": rec.get("reason"), "device": resolved_device(rec),
        "device_name": env.get("device_name"), "torch": env.get("torch"), "transformers": env.get("transformers"),
        "optimizer_package": (env.get("optimizer_package") or {}).get("name"),
        "optimizer_package_version": (env.get("optimizer_package") or {}).get("version"),
        "time": env.get("time"), "git_commit": env.get("git_commit"),
        "primary_tracker": m.get("primary_tracker"),
        "measured_peak": mpeak, "predicted_peak": ppeak, "predicted_peak_complete": complete,
        "peak_error_pct": pct_error(ppeak, mpeak),
        "measured_optimizer_state_total": m.get("optimizer_state_bytes"),
        "predicted_optimizer_state_total": (rank_prediction(rec) or {}).get(
            "optimizer_state_bytes", (pred.get("bytes") or {}).get("optimizer_state")),
        "num_processes": c.get("num_processes", 1), "sharding": c.get("sharding", "none"),
        "rss_peak": (m.get("peaks") or {}).get("rss_peak_bytes"),
        "samples_per_s": tp.get("samples_per_s"), "tokens_per_s": tp.get("tokens_per_s"),
        "step_time_p50": (tp.get("step_time_s") or {}).get("p50"),
        "optimizer_step_time_p50": (tp.get("optimizer_step_time_s") or {}).get("p50"),
        "step_times": step_times(rec), "duration_s": (rec.get("run") or {}).get("duration_s"),
        "source": rec.get("_source"),
    }
    row["optimizer_state_error_pct"] = pct_error(row["predicted_optimizer_state_total"],
                                                 row["measured_optimizer_state_total"])
    for k, v in measured_parts(rec).items():
        row[f"measured_{k}"] = v
    for k, v in predicted_parts(rec).items():
        row[f"predicted_{k}"] = v
    return row


def to_frame(records_or_paths: Any, *, latest: bool = True):
    """A pandas DataFrame, one row per record (see :func:`record_row`); ``latest`` keeps only the last
    record of each configuration."""
    import pandas as pd  # lazy: pulls in pandas, which importing this module does not

    if isinstance(records_or_paths, (str, os.PathLike)) or (
            isinstance(records_or_paths, (list, tuple)) and records_or_paths
            and isinstance(records_or_paths[0], (str, os.PathLike))):
        records = load_records(records_or_paths)
    else:
        records = list(records_or_paths)
    if latest:
        records = list(latest_by_key(records).values())
    df = pd.DataFrame([record_row(r) for r in records])
    if len(df) == 0:
        return pd.DataFrame(columns=list(record_row({"config": {}, "status": None}).keys()))
    for col in NUMERIC_COLUMNS + [f"{w}_{c}" for w in ("measured", "predicted") for c in BREAKDOWN]:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


NUMERIC_COLUMNS = ["batch_size", "seq_len", "grad_accum", "memory_limit_bytes", "steps", "warmup", "measured_peak",
                   "predicted_peak", "peak_error_pct", "measured_optimizer_state_total",
                   "predicted_optimizer_state_total", "optimizer_state_error_pct", "rss_peak", "samples_per_s",
                   "tokens_per_s", "step_time_p50", "optimizer_step_time_p50", "duration_s"]


__all__ = ["latest_by_key", "load_records", "measured_parts", "none_read",
           "pct_error", "peak_phase", "predicted_parts", "predicted_peak", "rank_prediction", "record_row",
           "resolved_device",
           "step_times", "to_frame"]
