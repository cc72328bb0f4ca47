"""A multi-process run's record and report (parent side): the record's ``distributed`` section (every rank's
status and measurement beside the planner's per-rank prediction, bytes) and the per-rank Markdown tables."""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from optimem.estimators.errors import UserError
from optimem.estimators.sharding import sharding_support
from optimem.estimators.step_memory import model_state_terms, step_memory
from optimem.harness.distributed.nodes import node_section
from optimem.harness.distributed.schemes import SCHEMES, is_distributed, model_class, training_arguments
from optimem.harness.results import load_records
from optimem.harness.units import error_text, human_bytes, rel_error


# --------------------------------------------------------------------------------------- the record
def predict_per_rank(cfg, device: str) -> dict[str, Any]:
    """The planner's per-rank figures for ``cfg`` on ``device`` (bytes): its sharding terms
    (:func:`optimem.estimators.sharding.shard_model_states`), the whole-step peak and its parts
    (:func:`optimem.estimators.step_memory.step_memory`), and the three figures a run is checked on: ``weights_bytes``
    (local weights and master partitions), ``gradients_bytes`` (the gradient storage at the optimizer step,
    buckets excluded) and ``optimizer_state_bytes``."""

    ok, why = sharding_support(cfg.optim, cfg.sharding, cfg.num_processes)
    if not ok:
        return {"supported": False, "reason": why}
    try:
        mem = step_memory(setup_for(cfg, device), cfg.batch_size)
    except UserError as exc:
        return {"supported": False, "reason": str(exc)}
    t = mem.terms
    per_rank = [int(g) for g in rank_gradients(setup_for(cfg, device))]
    return {"supported": True, "reason": why, "peak_bytes": int(mem.peak), "peak_phase": mem.peak_phase,
            "weights_bytes": int(t["weights"] + t["master_weights"]),
            "gradients_bytes": int(t["gradients"]), "gradients_bytes_per_rank": per_rank,
            "optimizer_state_bytes": int(t["optimizer_state"]), "host_state_bytes": int(mem.host_state),
            "terms": {k: int(v) for k, v in t.items()}, "breakdown": {k: int(v) for k, v in mem.breakdown.items()}}


def setup_for(cfg, device: str):
    return replace(cfg.setup(), device=device)


def rank_gradients(setup) -> list[int]:
    """The planner's gradient storage at the optimizer step for each rank (bytes)."""
    return [model_state_terms(setup, rank=r)["gradients"] for r in range(setup.num_processes)]


def section(cfg, payload: Mapping[str, Any], *, timeout_s: float, device: str,
            predicted: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The record's ``distributed`` section of a multi-process run (None for one process): the scheme, how
    it was launched and what the Trainer was given, every rank's status and measurement, and the planner's
    per-rank prediction beside them; ``nodes``: per node, its ranks' host figures beside the planner's per-node
    figures (:mod:`.nodes`; ``predicted``: the record's estimate, for its offload split)."""
    if not is_distributed(cfg):
        return None
    got = dict(payload.get("distributed") or {})
    try:
        trainer_args = training_arguments(cfg, model_class(cfg), timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the record is still written
        trainer_args = {"error": f"{type(exc).__name__}: {exc}"}
    per_rank = predict_per_rank(cfg, device)
    ranks = got.get("ranks") or []
    return {"scheme": cfg.sharding, "world_size": int(cfg.num_processes),
            "backend": "nccl" if device == "cuda" else "gloo", "launcher": got.get("launcher", "torchrun"),
            "command": got.get("command"), "training_arguments": trainer_args,
            "measured_rank": got.get("measured_rank"), "ranks": ranks, "predicted": per_rank,
            "nodes": node_section(cfg, device, ranks, per_rank, predicted)}


# --------------------------------------------------------------------------------------- the report
PEAK_TOLERANCE = 0.03
STATE_TOLERANCE = 0.01
"""What the per-rank prediction is held to (tests, the report): the peak within 3%, the optimizer state and
the gradients within 1%."""


def rank_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per rank of a multi-process record: measured against predicted peak, gradients and optimizer
    state (bytes) and the relative errors (``(predicted - measured) / measured``)."""
    d = record.get("distributed") or {}
    pred = d.get("predicted") or {}
    c = record.get("config") or {}
    out = []
    for e in d.get("ranks") or []:
        m = e.get("measured") or {}
        ms = m.get("model_states") or {}
        r = int(e.get("rank", 0))
        per = pred.get("gradients_bytes_per_rank") or []
        row = {"optim": c.get("optim"), "model": c.get("model"), "scheme": d.get("scheme"),
               "world_size": d.get("world_size"), "rank": r, "status": e.get("status"), "reason": e.get("reason"),
               "supported": bool(pred.get("supported")),
               "peak": m.get("peak_bytes"), "peak_predicted": pred.get("peak_bytes"),
               "gradients": ms.get("gradients"),
               "gradients_predicted": per[r] if r < len(per) else pred.get("gradients_bytes"),
               "optimizer_state": ms.get("optimizer_state", m.get("optimizer_state_bytes")),
               "optimizer_state_predicted": pred.get("optimizer_state_bytes"),
               "weights": (ms.get("weights") or 0) + (ms.get("master_weights") or 0) if ms else None,
               "weights_predicted": pred.get("weights_bytes")}
        for k in ("peak", "gradients", "optimizer_state", "weights"):
            row[f"{k}_error"] = rel_error(row[f"{k}_predicted"], row[k]) if e.get("status") == "ok" else None
        row["within"] = (e.get("status") == "ok" and row["peak_error"] is not None
                         and abs(row["peak_error"]) <= PEAK_TOLERANCE
                         and abs(row["gradients_error"]) <= STATE_TOLERANCE
                         and abs(row["optimizer_state_error"]) <= STATE_TOLERANCE)
        out.append(row)
    return out


def markdown(records) -> str:
    """A Markdown table of every rank of every multi-process record (skipped and failed runs listed with
    their reason)."""
    head = ("| optimizer | model | scheme | rank | peak measured | predicted | error | gradients | error "
            "| optimizer state | error | within |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | --- |")
    lines, notes = [head], []
    for rec in records:
        if not rec.get("distributed"):
            if (rec.get("config") or {}).get("num_processes", 1) > 1:
                c = rec["config"]
                notes.append(f"- {c['optim']} {c['model']} {c.get('sharding')}: {rec['status']}: {rec['reason']}")
            continue
        rows = rank_rows(rec)
        if rec.get("status") != "ok":
            c = rec["config"]
            notes.append(f"- {c['optim']} {c['model']} {c.get('sharding')}: {rec['status']}: {rec['reason']}")
            continue
        for r in rows:
            lines.append(f"| {r['optim']} | {r['model']} | {r['scheme']} | {r['rank']} | {human_bytes(r['peak'])} "
                         f"| {human_bytes(r['peak_predicted'])} | {error_text(r['peak_error'])} | {human_bytes(r['gradients'])} "
                         f"| {error_text(r['gradients_error'])} | {human_bytes(r['optimizer_state'])} "
                         f"| {error_text(r['optimizer_state_error'])} | {'yes' if r['within'] else 'NO'} |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def summary_markdown(records) -> str:
    """Per scheme: how many runs and ranks were checked, the optimizers and models, and the worst per-rank
    errors of the peak, the gradients and the optimizer state."""
    by: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("status") == "ok" and rec.get("distributed"):
            by.setdefault(rec["distributed"]["scheme"], []).append(rec)
    lines = ["| scheme | runs | ranks | optimizers | models | worst peak error | worst gradients error "
             "| worst optimizer-state error | all within |", "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for scheme in SCHEMES:
        recs = by.get(scheme)
        if not recs:
            continue
        rows = [r for rec in recs for r in rank_rows(rec)]

        def worst(key):
            return max((r[key] for r in rows if r[key] is not None), key=abs, default=None)

        optims = sorted({r["optim"] for r in rows})
        models = sorted({r["model"] for r in rows})
        lines.append(f"| {scheme} | {len(recs)} | {len(rows)} | {', '.join(optims)} | {', '.join(models)} "
                     f"| {worst('peak_error'):+.2%} | {worst('gradients_error'):+.3%} "
                     f"| {worst('optimizer_state_error'):+.3%} | {'yes' if all(r['within'] for r in rows) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m optimem.harness.distributed RESULTS.jsonl [--markdown OUT.md]``: the per-rank table."""
    p = argparse.ArgumentParser(prog="python -m optimem.harness.distributed",
                                description="per-rank measured vs predicted table of multi-process records")
    p.add_argument("results", nargs="+")
    p.add_argument("--markdown", metavar="OUT.md")
    args = p.parse_args(argv)
    recs = [r for r in load_records(args.results) if (r.get("config") or {}).get("num_processes", 1) > 1]
    text = summary_markdown(recs) + "\n" + markdown(recs)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text, end="")
    bad = [r for rec in recs if rec.get("status") == "ok" for r in rank_rows(rec) if not r["within"]]
    return 1 if bad else 0
