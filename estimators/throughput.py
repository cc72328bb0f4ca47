"""Throughput: the one model-FLOPs formula, MFU calibrated from run records, tokens/s per GPU.

FLOPs per trained token are ``6 N + 12 L d S`` (``N`` non-embedding parameters, ``L`` layers, ``d`` hidden size,
``S`` sequence length; PaLM appendix B): the harness's measured MFU and the planner's predicted tokens/s use this
same function. Tokens/s per GPU = ``MFU x peak FLOP/s / FLOPs per token``, divided by :data:`RECOMPUTE_FACTOR` with
gradient checkpointing. Communication is not modelled. Records are passed in (no file is globbed here).
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .gpus import GPU, match_gpu
from .setup import TrainingSetup

DEFAULT_MFU = 0.40
"""Assumed model FLOPs utilisation of a Trainer run without gradient checkpointing (a typical figure for
well-fed dense decoder training in bf16 on one datacenter GPU; calibrated from records when they exist)."""

RECOMPUTE_FACTOR = 4.0 / 3.0
"""Hardware FLOPs with gradient checkpointing over model FLOPs: the forward (2 of 6) is run again."""


def flops_per_token(non_embedding_params: int, layers: int | None, hidden: int | None, seq_len: int) -> float:
    """Model FLOPs per trained token: ``6 N`` for the matmuls of forward and backward plus ``12 L d S`` for the
    attention scores (0 when the layer count or width is unknown). Recomputation is not counted (MFU)."""
    attn = 12.0 * layers * hidden * seq_len if layers and hidden else 0.0
    return 6.0 * non_embedding_params + attn


@dataclass(frozen=True)
class Calibration:
    """A measured MFU (no recompute counted) for one GPU, model and compute dtype."""

    gpu: str
    model: str
    compute_dtype: str
    mfu: float
    runs: int


def _record_compute(config: Mapping[str, Any]) -> str | None:
    mp = config.get("mixed_precision")
    if mp:
        return str(mp)
    dt = config.get("dtype")
    return str(dt) if dt else None


def calibrate(records: Iterable[Mapping], catalog: Mapping[str, GPU]) -> dict[tuple[str, str, str], Calibration]:
    """MFU per ``(gpu id, model, compute dtype)`` from run records (as ``bench run`` writes them).

    Uses ``ok`` CUDA records with a measured MFU. The achieved FLOP/s (``mfu x peak_flops`` of the record) is
    divided by this catalog's peak for the same GPU and dtype, and :data:`RECOMPUTE_FACTOR` is undone for runs
    with gradient checkpointing, so the figure is comparable with :data:`DEFAULT_MFU`. The median per key wins.
    """
    from .catalog import canonical_name  # lazy: the catalog module is only needed once records exist

    samples: dict[tuple[str, str, str], list[float]] = {}
    for rec in records:
        if not isinstance(rec, Mapping) or rec.get("status") != "ok":
            continue
        meas, env, cfg = rec.get("measured") or {}, rec.get("env") or {}, rec.get("config") or {}
        if not all(isinstance(x, Mapping) for x in (meas, env, cfg)):
            continue
        tp = meas.get("throughput") or {}
        if not isinstance(tp, Mapping):
            continue
        mfu = tp.get("mfu")
        if meas.get("device") != "cuda" or not isinstance(mfu, (int, float)) or mfu <= 0:
            continue
        gpu = match_gpu(str(env.get("device_name") or ""), catalog)
        compute = _record_compute(cfg)
        if gpu is None or compute is None:
            continue
        ours = gpu.peak_flops(compute)
        if not ours:
            continue
        theirs = tp.get("peak_flops")
        achieved = float(mfu) * float(theirs) if isinstance(theirs, (int, float)) and theirs else float(mfu) * ours
        value = achieved / ours * (RECOMPUTE_FACTOR if cfg.get("gradient_checkpointing") else 1.0)
        model = canonical_name(str(cfg.get("model")))  # never fetches a Hub id's config
        samples.setdefault((gpu.id, model, compute), []).append(value)
    return {k: Calibration(k[0], k[1], k[2], statistics.median(v), len(v)) for k, v in samples.items()}


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float | None
    """Per GPU."""
    mfu: float
    mfu_source: str
    flops_per_token: float


def throughput(fpt: float, gpu: GPU, setup: TrainingSetup, *, mfu: float = DEFAULT_MFU,
               mfu_source: str = "assumed") -> Throughput:
    """Tokens/s on one GPU for ``fpt`` model FLOPs per token (:func:`flops_per_token`) at an MFU (None when
    the GPU has no fast path for the setup's compute dtype)."""
    peak = gpu.peak_flops(setup.compute_dtype)
    if not peak or not fpt:
        return Throughput(None, mfu, mfu_source, fpt)
    tps = mfu * peak / fpt / (RECOMPUTE_FACTOR if setup.gradient_checkpointing else 1.0)
    return Throughput(tps, mfu, mfu_source, fpt)


__all__ = ["Calibration", "DEFAULT_MFU", "RECOMPUTE_FACTOR", "Throughput", "calibrate", "flops_per_token",
           "throughput"]
