"""Step memory: the predicted per-GPU peak of one configuration at one micro-batch (:func:`step_memory`, bytes),
sharding applied per phase, and the searches over it (the largest micro-batch, the longest sequence that fits a
budget). The peak is the whole-step estimator's (:func:`optimem.estimators.estimate`); model-state terms per rank
come from :mod:`optimem.estimators.sharding`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

from .catalog import resolve
from .categories import Category as C
from .errors import UserError
from .estimate import estimate
from .inventory import build_inventory
from .model_sizes import ModelSizes, model_sizes
from .optimizers import get_spec
from .params import DTYPES, Inventory, normalize_dtype
from .peak import narrowed
from .peft_model import adapter_inventory
from .search import largest
from .setup import DEFAULT_TARGETS, TrainingSetup
from .sharding import ZERO, _gathered_copies, sharded_terms, shard_model_states
from .user_objects import is_training_arguments, setup_for

MAX_BATCH = 4096
"""Largest micro-batch the search tries; a result at this cap is reported as 'at least'."""

PLAN_DEFAULTS: dict = {"mixed_precision": "bf16", "seq_len": 2048}
"""What the planner assumes where a setup field is not given: bf16 autocast (how people train on GPUs) and
2048 tokens per sample; every other field has :class:`~optimem.estimators.setup.TrainingSetup`'s default."""


def plan_setup(model: Any, optim: Any, **fields) -> TrainingSetup:
    """A :class:`~optimem.estimators.setup.TrainingSetup` with the planner's defaults (:data:`PLAN_DEFAULTS`), and
    GaLore/APOLLO's default targets where none are given.

    ``model``: a model name, or the user's own config / ``PreTrainedModel`` / PEFT model; ``optim``: an optimizer
    name, or the ``transformers.TrainingArguments`` of the run (then its precision, batch, accumulation,
    checkpointing and parallelism are the setup's, and only the sequence length takes the planner's default).
    See :func:`optimem.estimators.user_objects.setup_for`."""
    if is_training_arguments(optim):
        setup = setup_for(model, optim, **{"seq_len": PLAN_DEFAULTS["seq_len"], **fields})
    else:
        setup = setup_for(model, get_spec(optim).name, **{**PLAN_DEFAULTS, **fields})
    if get_spec(setup.optim).needs_target_modules and not setup.optim_target_modules:
        setup = replace(setup, optim_target_modules=DEFAULT_TARGETS)
    return setup


@dataclass
class StepMemory:
    """The predicted per-GPU peak of one configuration at one micro-batch, and its parts (bytes)."""

    batch_size: int
    peak: int
    terms: dict[str, int]
    """Model-state terms per GPU (see :func:`shard_model_states`)."""
    breakdown: dict[str, int]
    """The peak phase's bytes split as :data:`~optimem.estimators.categories.PER_GPU` (they sum to ``peak``)."""
    host_state: int
    single_gpu_peak: int
    peak_phase: str | None = None

    @property
    def activations(self) -> int:
        """Everything at the peak that is not a model state: activations, temporaries, other."""
        return self.peak - sum(self.breakdown.get(k, 0) for k in ("weights", "gradients", "optimizer_state",
                                                                   "sharding_overhead"))


def _estimate(setup: TrainingSetup, batch: int):
    """The estimate of ``setup`` at micro-batch ``batch``, on the device it trains on (``auto``: CUDA)."""
    return estimate(setup, batch_size=batch, device=setup.estimate_device)


def _phases(est) -> list[tuple[str, int, dict[str, int]]] | None:
    """``[(phase, peak bytes, {category: bytes})]`` from the estimate's per-phase breakdown, or None."""
    if not est.phases:
        return None
    return [(name, int(ph["peak"]), {k: int(v) for k, v in ph.items() if k != "peak"})
            for name, ph in est.phases.items()]


@functools.lru_cache(maxsize=4096)
def _inventory(model: str, dtype: str) -> Inventory:
    return build_inventory(model, dtype)


def setup_inventory(setup: TrainingSetup) -> Inventory:
    """The inventory of the model ``setup`` trains: the plain model's, or a LoRA/QLoRA setup's peft model."""
    if setup.peft:
        return adapter_inventory(setup)
    return _inventory(setup.model, setup.dtype)


def step_memory(setup: TrainingSetup, batch: int) -> StepMemory:
    """Predicted per-GPU peak of ``setup`` at micro-batch ``batch`` (``setup.batch_size`` is not read)."""
    return _step_memory_cached(setup, int(batch))


@functools.lru_cache(maxsize=65536)
def _step_memory_cached(setup: TrainingSetup, batch: int) -> StepMemory:
    est = _estimate(setup, batch)
    b = est.bytes
    if b["peak"] is None:  # no whole-step peak for this setup (see the estimate's notes): nothing to fit
        raise UserError(f"cannot plan {setup.model} with {setup.optim}: {est.notes[-1]}")
    W, G, O = int(b["weights"]), int(b["gradients"]), int(b["optimizer_state_device"])
    peak = int(b["peak"])
    host = int(b.get("optimizer_state_host", 0))
    phases = _phases(est)
    single = setup.sharding == "none" and setup.num_processes == 1
    if single:
        terms = shard_model_states(sharding="none", num_gpus=1, weights=W, gradients=G, optimizer_state=O)
    else:
        inv = setup_inventory(setup)
        terms = sharded_terms(setup, inv, model_sizes(inv), W, G, O, est.optim_args)
    if not phases:
        # No per-phase split: weights and optimizer state live through every steady phase, so their change
        # applies to the peak exactly; gradients come and go, so only an increase is applied (an upper bound).
        g_sh = terms["gradients"] + terms["grad_partition_fp32"]
        over = terms["ddp_buckets"] + terms["gathered_working_set"]
        new_peak = (peak - W - O + terms["weights"] + terms["master_weights"] + terms["optimizer_state"]
                    + max(0, g_sh - G) + over)
        parts = {"weights": terms["weights"] + terms["master_weights"], "gradients": g_sh,
                 "optimizer_state": terms["optimizer_state"], "sharding_overhead": over}
        parts["other"] = new_peak - sum(parts.values())
        return StepMemory(batch, new_peak, terms, parts, host, peak, None)
    # Each model-state component present in a phase scales by its shard factor; the optimizer step runs on
    # this GPU's shard, so its temporaries shrink with the state; the gathered unit lives in forward/backward.
    f_w = (terms["weights"] + terms["master_weights"]) / W if W else 1.0
    f_g = terms["gradients"] / G if G else 1.0  # the fp32 gradient copy exists only in the step
    if setup.sharding == "zero1":
        f_g = (2 * sizes_of(setup).trainable_params if setup.sixteen_bit else G) / G if G else 1.0  # reduced at the end
    f_g_step = (terms["gradients"] + terms["grad_partition_fp32"]) / G if G else 1.0
    f_o = terms["optimizer_state"] / O if O else 1.0
    shards_step = setup.sharding in ZERO + ("fsdp",)
    # The Trainer's autocast keeps a 16-bit copy of every matmul weight for the whole forward. DeepSpeed's
    # 16-bit engine and FSDP's MixedPrecisionPolicy hand autocast 16-bit weights already: no copies.
    cast_cache = 0
    if shards_step and setup.mixed_precision and DTYPES[normalize_dtype(setup.dtype)] > DTYPES[setup.mixed_precision]:
        inv = setup_inventory(setup)
        cast_cache = model_sizes(inv).autocast_cast_params * DTYPES[setup.mixed_precision]
    best: tuple[int, str, dict[str, int]] | None = None
    all_parts: dict[str, dict[str, int]] = {}
    for name, total, comps in phases:
        is_step = "optim" in name.lower() and "step" in name.lower()
        grads_here = comps.get(C.GRADIENTS, 0)
        parts = {
            "weights": math.ceil(comps.get(C.WEIGHTS, W) * f_w),
            "gradients": math.ceil(grads_here * (f_g_step if is_step else f_g)),
            # (ZeRO-3's flat gradient partition is allocated once, at engine start: see below)
            "optimizer_state": math.ceil(comps.get(C.OPTIMIZER_STATE, 0) * f_o),
            "activations": comps.get(C.ACTIVATIONS, 0),
            "temporaries": comps.get(C.TEMPORARIES, 0),
            "sharding_overhead": terms["ddp_buckets"] + terms["grad_buckets"]
            + (0 if is_step else _gathered_copies(setup.sharding, name, grads_here) * terms["gathered_working_set"]),
        }
        if setup.sharding == "zero3" and G:
            parts["gradients"] = terms["gradients"] + (terms["grad_partition_fp32"] if is_step else 0)
        if is_step and shards_step:
            parts["temporaries"] = -(-parts["temporaries"] // setup.num_processes)  # exact ceil
        if cast_cache and name.endswith("forward"):
            parts["activations"] -= min(cast_cache, parts["activations"])
        known = sum(comps.get(c, 0) for c in (C.WEIGHTS, C.GRADIENTS, C.OPTIMIZER_STATE, C.ACTIVATIONS,
                                              C.TEMPORARIES))
        parts["other"] = max(int(total) - known, 0)
        t = sum(parts.values())
        all_parts[name] = parts
        if best is None or t >= best[0]:
            best = (t, name, parts)
    new_peak, name, parts = best
    if single:  # the estimator's own figure and phase, exactly
        new_peak = peak
        own = getattr(est, "peak_phase", None)
        name, parts = (own, all_parts[own]) if own in all_parts else (name, parts)
    return StepMemory(batch, new_peak, terms, parts, host, peak, name)


def sizes_of(setup: TrainingSetup) -> ModelSizes:
    """The :class:`ModelSizes` of the model ``setup`` trains."""
    return model_sizes(setup_inventory(setup))


def model_state_terms(setup: TrainingSetup, rank: int | None = None) -> dict[str, int]:
    """Per-GPU model-state terms of ``setup`` (:func:`shard_model_states`), batch-independent: needs only the
    estimator's weights, gradients and optimizer state, not the whole-step peak. ``rank``: the rank whose
    gradient storage is reported (ZeRO-1/2 partitions differ at their edges; default: the largest)."""
    est = _estimate(setup, 1)
    b = est.bytes
    inv = setup_inventory(setup)
    return sharded_terms(setup, inv, model_sizes(inv), int(b["weights"]), int(b["gradients"]),
                         int(b["optimizer_state_device"]), est.optim_args, rank=rank)


def fits(setup: TrainingSetup, batch: int, budget: int) -> bool:
    """Whether micro-batch ``batch`` of ``setup`` fits in ``budget`` bytes per GPU."""
    return step_memory(setup, batch).peak <= budget


def max_micro_batch(setup: TrainingSetup, budget: int, limit: int = MAX_BATCH) -> int:
    """The largest micro-batch ``b <= limit`` with ``fits(b)`` (0 when batch 1 does not fit). Exponential
    search then bisection; the peak grows with the batch, so ``b`` fits and ``b + 1`` does not (below the limit)."""
    return largest(lambda b: fits(setup, b, budget), limit)


MAX_SEQ = 1 << 20
"""Longest sequence the search tries when the model's config names no position limit."""


def position_limit(setup: TrainingSetup) -> int:
    """The longest sequence the model takes: its config's ``max_position_embeddings`` / ``n_positions``
    (none for relative-position models such as T5: :data:`MAX_SEQ`)."""
    cfg = resolve(setup.model).load()
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in ("max_position_embeddings", "n_positions"):
        value = cfg.get(key) or text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return MAX_SEQ


def max_seq_len(setup: TrainingSetup, batch: int, budget: int, limit: int | None = None) -> int:
    """The longest sequence ``s <= limit`` (default :func:`position_limit`) at micro-batch ``batch`` whose
    step fits in ``budget`` bytes (0 when not even 1 token does). The peak grows with the sequence length:
    exponential search then bisection, as :func:`max_micro_batch`."""
    limit = position_limit(setup) if limit is None else limit
    probe = _estimate(replace(setup, seq_len=min(limit, PROBE_SEQ)), batch)
    if narrowed(probe.notes):
        raise UserError(f"cannot search the longest sequence of {setup.model}: its training step changes with the "
                        "sequence length (a loop over tokens or chunks), so every length the search tries would be "
                        "traced at that length; plan a given --seq-len instead")
    return largest(lambda seq: fits(replace(setup, seq_len=seq), batch, budget), limit)


PROBE_SEQ = 64
"""Sequence length :func:`max_seq_len` estimates first, to learn whether the step changes with the length."""


__all__ = ["MAX_BATCH", "MAX_SEQ", "PLAN_DEFAULTS", "StepMemory", "fits", "max_micro_batch",
           "max_seq_len", "model_state_terms", "plan_setup", "position_limit", "setup_inventory", "sizes_of",
           "step_memory"]
