"""``bench sweep --find-max-batch``: per configuration, the largest batch size that fits (bytes of
``--memory-limit``, or the device's real out-of-memory error on CUDA without one).

The search starts at the estimator's guess when it predicts whole-job peaks (:func:`guess_start`), else the grid's
batch size; it gallops, bisects, and under a limit interpolates the measured peaks (:func:`next_probe`). Each probe
is an ordinary record of the results file; each search's outcome is one line of ``<results>.max-batch.jsonl``."""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import replace
from pathlib import Path

from optimem.estimators.search import largest
from optimem.harness.grid import config_key, config_label
from optimem.harness.launcher import predict, resolve_device
from optimem.harness.record import read_records
from optimem.harness.results import predicted_peak
from optimem.harness.fit import available_memory

MAX_BATCH_SUFFIX = ".max-batch.jsonl"
DEFAULT_MAX_BATCH_CAP = 4096
OVER_LIMIT = "over the memory limit"
"""How the reason of a run recorded ``oom`` by the ``--memory-limit`` check (not by a real OOM) starts."""


def max_batch_path(out: str | os.PathLike) -> Path:
    """``results/x.jsonl`` -> ``results/x.max-batch.jsonl``: where max-batch searches are recorded."""
    p = Path(out)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + MAX_BATCH_SUFFIX)


def read_max_batch(path: Path) -> dict[str, dict]:
    """``{group key: search summary}`` of a ``.max-batch.jsonl`` file (empty if there is none)."""
    if not path.is_file():
        return {}
    return {r["group_key"]: r for r in read_records(path) if r.get("kind") == "max_batch" and r.get("group_key")}


def group_key(base, device: str) -> str:
    """The key of a configuration with its batch size left open (a max-batch search)."""
    return config_key({**base.to_dict(), "batch_size": None}, device)


class _Unknown(Exception):
    """The estimator cannot predict a whole-job peak for this configuration."""


def guess_start(base, device: str, *, limit: int | None, cap: int) -> int | None:
    """The largest batch (at least 1, at most ``cap``) the estimator says fits under ``limit`` bytes (None when
    it cannot say: no limit, or no whole-job peak prediction)."""
    if limit is None:
        return None

    def fits(b: int) -> bool:
        try:
            pred = predict(replace(base, batch_size=b))
        except Exception:  # noqa: BLE001
            raise _Unknown from None
        value, complete = predicted_peak({"predicted": pred, "run": {"resolved_device": device}})
        if not complete or value is None:
            raise _Unknown
        return value <= limit

    try:
        return max(largest(fits, cap), 1)
    except _Unknown:
        return None


def search(sweep, base, start: int, emit) -> dict:
    """Find the largest batch size of ``base`` that fits, probing with ``sweep`` (a
    :class:`optimem.harness.sweep.Sweep`: its ``run_one``, ``should_skip``, ``opts`` and ``sweep_id``); emits probe
    records; returns the summary (the ``<results>.max-batch.jsonl`` line)."""
    device = resolve_device(base)
    cap = sweep.opts.max_batch_cap
    group = group_key(base, device)
    label = config_label({**base.to_dict(), "batch_size": "?"})
    limit = sweep.opts.memory_limit
    if limit is None and device == "cuda":  # no limit on a GPU: start from the estimate under its free memory

        limit = available_memory(device)[0]
    guess = guess_start(base, device, limit=limit, cap=cap)
    probes: list[dict] = []
    cache: dict[int, dict] = {}
    failure: dict | None = None

    class _Failed(Exception):
        pass

    def fits(b: int) -> bool:
        nonlocal failure
        if b not in cache:
            cfg = replace(base, batch_size=b, extra=dict(base.extra))
            key = config_key(cfg.to_dict(), device)
            earlier = sweep.should_skip(key)
            rec = earlier if earlier is not None and earlier.get("status") in ("ok", "oom") else None
            if rec is None:
                rec = sweep.run_one(cfg, label=f"{label} probe b={b}")
                rec["run"]["max_batch_probe"] = {"group_key": group, "batch_size": b}
                emit(("record", rec, 0, None))
            cache[b] = rec
            m = rec.get("measured") or {}
            probes.append({"batch_size": b, "status": rec["status"], "peak_bytes": m.get("peak_bytes"),
                           "run_id": rec.get("run_id"), "reused": rec is earlier, "reason": rec.get("reason")})
        rec = cache[b]
        if rec["status"] == "ok":
            return True
        if rec["status"] in ("oom", "oom-predicted"):
            return False
        failure = rec
        raise _Failed

    lo, hi, capped = 0, None, False
    first = min(max(guess or start, 1), cap)
    try:
        b, step, interpolated = first, 1, 0
        while True:
            if fits(b):
                lo = max(lo, b)
            else:
                hi = b if hi is None else min(hi, b)
            if hi is not None and hi - lo <= 1:
                break
            if hi is None and lo >= cap:
                capped = True
                break
            b, step, interpolated = next_probe(lo, hi, step, interpolated, cache, cap, sweep.opts.memory_limit)
        reason = ""
        complete = True
    except _Failed:
        complete = False
        reason = (f"search stopped: batch {failure['config']['batch_size']} ended with status "
                  f"{failure['status']}: {failure.get('reason', '')}")
    ok_peaks = {p["batch_size"]: p["peak_bytes"] for p in probes if p["status"] == "ok"}
    env = (cache[first].get("env") if first in cache else {}) or {}
    summary = {
        "schema_version": 1, "kind": "max_batch", "group_key": group, "label": label,
        "config": {**base.to_dict(), "batch_size": None}, "device": device,
        "memory_limit_bytes": sweep.opts.memory_limit, "max_batch_size": lo if complete or lo else None,
        "first_failing_batch": hi, "capped": capped, "complete": complete, "reason": reason,
        "peak_bytes_at_max": ok_peaks.get(lo), "start_batch": first, "estimator_guess": guess,
        "probes": sorted(probes, key=lambda p: p["batch_size"]),
        "runs": sum(1 for p in probes if not p["reused"]),
        "env": {k: env.get(k) for k in ("device", "device_name", "torch", "transformers", "optimizer_package")},
        "sweep_id": sweep.sweep_id, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return summary


def next_probe(lo: int, hi: int | None, step: int, interpolated: int, cache: dict[int, dict], cap: int,
               limit: int | None) -> tuple[int, int, int]:
    """The next batch size to try, given the largest that fit (``lo``, 0 for none) and the smallest that
    did not (``hi``, None for none yet). Peak memory is close to affine in the batch size, so under a
    memory limit the measured peaks predict the boundary (secant / false position); without enough
    points, or after three predictions in a row that did not close the gap, it gallops (1, 2, 4, ...
    past the last fit, or below the first failure) and bisects. Returns (batch, step, interpolated)."""
    def peak(b: int | None) -> int | None:
        if b is None or b not in cache:
            return None
        return (cache[b].get("measured") or {}).get("peak_bytes")

    oks = sorted(b for b, r in cache.items() if r["status"] == "ok" and peak(b) is not None)
    fails = sorted(b for b, r in cache.items() if r["status"] == "oom" and peak(b) is not None
                   and str(r.get("reason", "")).startswith(OVER_LIMIT))  # measured to the end, not a real OOM
    guess = None
    if limit is not None and interpolated < 3:
        if hi is not None and lo and hi in fails and peak(hi) > peak(lo):
            slope = (peak(hi) - peak(lo)) / (hi - lo)
            guess = lo + int((limit - peak(lo)) // slope)
        elif hi is None and len(oks) >= 2 and peak(oks[-1]) > peak(oks[-2]):
            slope = (peak(oks[-1]) - peak(oks[-2])) / (oks[-1] - oks[-2])
            guess = lo + int((limit - peak(lo)) // slope)
        elif not lo and len(fails) >= 2 and peak(fails[1]) > peak(fails[0]):
            slope = (peak(fails[1]) - peak(fails[0])) / (fails[1] - fails[0])
            guess = hi - max(1, -int((limit - peak(hi)) // slope))
    upper = (hi - 1) if hi is not None else cap
    if guess is not None:
        # peaks are only piecewise affine (at small batches the optimizer step's peak can dominate, and
        # it does not grow with the batch): never jump more than 4x past the last fit, or below a
        # quarter of the first failure
        if hi is None:
            upper = min(upper, max(4 * lo, lo + 1))
        lower = max(lo + 1, 1, (hi // 4) if hi is not None and not lo else 1)
        return min(max(guess, lower), upper), step, interpolated + 1
    if hi is None:
        return min(lo + step, cap), step * 2, 0
    if not lo:
        return max(hi - step, 1), step * 2, 0
    return (lo + hi) // 2, step, 0
