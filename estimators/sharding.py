"""Sharding: which optimizer can run under which scheme, and the per-rank model-state terms (bytes) of DDP, DeepSpeed
ZeRO-1/2/3 and FSDP2 as the engines cut the real parameter list.

**Sharding** (per GPU, ``N`` GPUs; ``P`` trainable elements; each optimizer's state from its own formulas):

* ``none`` / ``ddp``: everything replicated, as the Trainer holds it on one GPU. DDP also keeps gradient
  buckets as large as the gradients (the Trainer leaves ``gradient_as_bucket_view`` off, and PyTorch documents
  that turning it on saves "the total gradients size").
* ``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed): the engine trains a 16-bit copy of the model when mixed
  precision (or a 16-bit dtype) is on, keeps an fp32 master partition (``4P/N``) and hands the optimizer one
  flat 1-D fp32 partition per parameter group, so the optimizer state is the optimizer's formula on a 1-D
  tensor of ``P/N`` elements (Adafactor is then *not* factored; GaLore/APOLLO cannot project a 1-D tensor and
  fail). ZeRO-1 shards the optimizer state and master weights; ZeRO-2 also the gradients (16-bit partition +
  the fp32 copy the step reads); ZeRO-3 also the 16-bit weights (its fp32 gradient copy is one
  ``sub_group_size`` at a time), plus the gathered working set: the largest single module's parameters and
  gradients, unsharded (DeepSpeed's ``4 x largest layer``). For AdamW in bf16, ZeRO-2 is ``2P + 18P/N``.
* ``fsdp`` (FSDP2 full shard, the Trainer's default FSDP): parameters, gradients and optimizer state stay in
  the Trainer's dtype, each ``/N`` (``MixedPrecisionPolicy`` computes in bf16/fp16), plus the gathered
  working set: the largest FSDP unit (a decoder block, the input embedding, or the output head with the final
  norm, as accelerate wraps them), parameters and gradients unsharded in the compute dtype.

Layer-wise optimizers cannot run distributed in the Trainer (``NotImplementedError: Layer-wise ... does not
support DDP``); LOMO/AdaLomo update parameters inside backward hooks without all-reducing gradients except on
lomo_optim's DeepSpeed ZeRO-3 path, so they are data-parallel only under ``zero3``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .estimate import targeted_names
from .model_sizes import ModelSizes
from .optimizers import get_spec, parse_optim_args
from .optimizers.lowrank import projection_side
from .optimizers.spec import ParamCtx
from .params import DTYPES, Inventory, ParamRow, normalize_dtype
from .setup import SHARDINGS, TrainingSetup

ZERO3_SUB_GROUP = 1_000_000_000
"""DeepSpeed's default ``sub_group_size`` (elements): ZeRO-3 steps the optimizer one sub-group at a time."""
ZERO3_MAX_LIVE = 1_000_000_000
"""DeepSpeed's default ``stage3_max_live_parameters`` (elements): gathered parameters ZeRO-3 keeps before it
releases any (with ``stage3_max_reuse_distance`` also 1e9, a model below it stays gathered once the first step
has traced the module order: measured)."""
ZERO_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads each flat parameter group to a multiple of ``2 x N`` elements
(``nccl_start_alignment_factor``) before cutting it into ``N`` partitions."""
ZERO3_PERSISTENCE = 10
"""The Trainer's ``auto`` ``stage3_param_persistence_threshold``: ``10 x hidden`` elements; smaller
parameters stay whole on every rank."""
ZERO = ("zero1", "zero2", "zero3")


FSDP2_FAILS: dict[str, str] = {
    "bitsandbytes": "bitsandbytes' update kernels have no DTensor sharding strategy (NotImplementedError: Operator "
                    "bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy registered)",
    "transformers.optimization.Adafactor": "transformers' Adafactor mixes its plain factored state with the "
                                           "DTensor gradient (RuntimeError: aten.add_.Tensor got mixed "
                                           "torch.Tensor and DTensor)",
}
"""Optimizers whose step fails on FSDP2's DTensor parameters (by package or class), with the error a real run
raised (measured on CPU ranks: results/cpu-amd-epyc-2026-12-02-distributed.jsonl; DTensor dispatch is the same
on GPUs)."""


def sharding_support(optim: str, sharding: str, num_gpus: int) -> tuple[bool, str]:
    """``(allowed, reason)`` for running ``optim`` under ``sharding`` on ``num_gpus`` GPUs in the Trainer."""
    spec = get_spec(optim)
    if sharding not in SHARDINGS:
        raise UserError(f"unknown sharding '{sharding}': use one of {', '.join(SHARDINGS)}")
    if sharding == "none":
        if num_gpus > 1:
            return False, "several GPUs need a sharding scheme (ddp, zero1/2/3, fsdp)"
        return True, ""
    if spec.layerwise:
        return False, (f"layer-wise {optim} cannot run distributed: the Trainer raises 'Layer-wise {optim} does "
                       "not support DDP' (DDP, DeepSpeed and FSDP alike)")
    if not spec.keeps_gradients:
        if sharding == "zero3":
            return True, (f"{optim} under DeepSpeed ZeRO-3 takes lomo_optim's ZeRO-3 path (all-reduces each "
                          "gradient inside backward)")
        return False, (f"{optim} updates each parameter inside backward without all-reducing its gradient "
                       "(lomo_optim all-reduces only under DeepSpeed ZeRO-3): not data-parallel under "
                       f"{sharding}; use zero3 or one GPU")
    if sharding == "fsdp":
        why = FSDP2_FAILS.get(spec.cls) or FSDP2_FAILS.get(spec.import_name)
        if why:
            return False, f"{optim} cannot step FSDP2's DTensor parameters: {why}"
    if sharding in ZERO and spec.needs_target_modules:
        return False, (f"{optim} projects 2-D gradients; DeepSpeed ZeRO hands the optimizer flat 1-D "
                       "partitions and the projector indexes shape[1] (IndexError)")
    return True, ""


def _flat_partition_state(inv: Inventory, optim: str, args: Mapping[str, Any], facts: ModelSizes,
                          num_gpus: int, dtype: str, sizes: Sequence[int] | None = None) -> int:
    """Optimizer-state bytes for DeepSpeed's flat partitions: one 1-D ``dtype`` tensor per parameter group
    (the Trainer's decay / no-decay groups) of ``sizes`` elements (default ``group/N``), device-resident keys
    only. DeepSpeed's master partition is fp32 whatever the training dtype."""
    spec = get_spec(optim)
    if spec.state_location == "host":
        return 0
    total = 0
    if sizes is None:
        sizes = [math.ceil(x / num_gpus) for x in (facts.decay_params, facts.no_decay_params) if x > 0]
    for i, numel in enumerate(sizes):
        if numel <= 0:
            continue
        row = ParamRow(name=f"flat_partition_{i}", shape=(int(numel),), dtype=dtype,
                       trainable=True, module_kind="other", module_name="", module_class="FlatPartition")
        for key, nbytes in spec.param_state(ParamCtx(row, args, False)).items():
            if key not in spec.host_keys:
                total += nbytes
    if spec.shared is not None:
        total += sum(v for k, v in spec.shared(inv, args).items() if k not in spec.host_keys)
    return total


@dataclass(frozen=True)
class ShardLayout:
    """Per-rank element counts of one model under one scheme on ``N`` ranks, from the parameter inventory
    (how the engines cut the real parameter list, padding included).

    ``local_params``: parameter elements a rank stores between steps (ZeRO-1/2: the whole padded flat
    groups; ZeRO-3: its partition of every parameter plus the persistent ones whole; FSDP2: its dim-0 shard of
    every parameter, dim 0 padded to a multiple of ``N``). ``local_trainable``: elements of its master /
    gradient partition. ``grad_storage``: per rank, gradient elements held at the optimizer step (ZeRO-1/2:
    the partition is a list of views of the parameters' gradients, so a parameter straddling a partition
    edge keeps its whole gradient alive on both ranks; the last rank's padding is a zero tensor of its own).
    ``persistent``: ZeRO-3 parameters below the persistence threshold (whole on every rank). ``bucket``:
    ZeRO-3's reduction bucket (``reduce_bucket_size`` = hidden², the Trainer's ``auto``). ``gathered``:
    parameters gathered at once in forward/backward (ZeRO-3: those not persistent, at most
    :data:`ZERO3_MAX_LIVE`; FSDP2: the largest unit)."""

    local_params: int
    local_trainable: int
    grad_storage: tuple[int, ...]
    persistent: int = 0
    bucket: int = 0
    gathered: int = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _decay_groups(inv: Inventory) -> list[list[ParamRow]]:
    """The Trainer's two parameter groups (weight decay, then none: norms and biases), in model order."""
    rows = [r for r in inv.rows if r.trainable]
    no_decay = [r for r in rows if r.module_kind == "norm" or r.name.endswith("bias")]
    ids = {id(r) for r in no_decay}
    return [g for g in ([r for r in rows if id(r) not in ids], no_decay) if g]


def shard_layout(inv: Inventory, facts: ModelSizes, sharding: str, n: int) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``inv`` under ``sharding`` on ``n`` ranks (None for none/ddp)."""
    n = max(int(n), 1)
    frozen = sum(r.numel for r in inv.rows if not r.trainable)
    if sharding in ("zero1", "zero2"):
        local, part_total = frozen, 0
        storage = [0] * n
        for group in _decay_groups(inv):
            total = sum(r.numel for r in group)
            padded = _ceil_div(total, ZERO_ALIGNMENT * n) * ZERO_ALIGNMENT * n
            part = padded // n
            local += padded
            part_total += part
            starts, offset = [], 0
            for r in group:
                starts.append((offset, offset + r.numel))
                offset += r.numel
            for rank in range(n):
                lo, hi = rank * part, (rank + 1) * part
                storage[rank] += sum(e - b for b, e in starts if b < hi and e > lo)  # whole gradients
                storage[rank] += max(0, min(hi, padded) - max(lo, total))  # the zero padding
        return ShardLayout(local, part_total, tuple(storage))
    if sharding == "zero3":
        threshold = ZERO3_PERSISTENCE * (facts.hidden or 0)
        rows = inv.rows
        parts = sum(_ceil_div(r.numel, n) for r in rows)
        persistent = sum(r.numel for r in rows if r.numel < threshold)
        trainable = sum(_ceil_div(r.numel, n) for r in rows if r.trainable)
        gathered = min(sum(r.numel for r in rows if r.numel >= threshold), ZERO3_MAX_LIVE)
        return ShardLayout(parts + persistent, trainable, (trainable,) * n, persistent=persistent,
                           bucket=(facts.hidden or 0) ** 2, gathered=gathered)
    if sharding == "fsdp":
        def shard(r: ParamRow) -> int:
            if not r.shape:
                return _ceil_div(1, n)
            rest = math.prod(r.shape[1:])
            return _ceil_div(r.shape[0], n) * rest

        local = sum(shard(r) for r in inv.rows)
        trainable = sum(shard(r) for r in inv.rows if r.trainable)
        # the root unit stays gathered through forward and backward, beside the largest other unit
        return ShardLayout(local, trainable, (trainable,) * n,
                           gathered=facts.largest_unit_params + facts.fsdp_root_params)
    return None


def shard_model_states(*, sharding: str, num_gpus: int, weights: int, gradients: int, optimizer_state: int,
                       num_params: int = 0, trainable_params: int = 0, flat_state: int | None = None,
                       sixteen_bit: bool = False, gathered_params: int = 0,
                       gathered_elem_bytes: int = 2, layout: ShardLayout | None = None, param_bytes: int = 4,
                       rank: int | None = None) -> dict[str, int]:
    """Per-GPU model-state terms (bytes) of one configuration under ``sharding`` on ``num_gpus`` GPUs.

    ``weights``, ``gradients``, ``optimizer_state``: what the Trainer holds on one GPU (the estimator's
    ``weights``, ``gradients``, ``optimizer_state_device``). ZeRO stages also read ``num_params`` and
    ``trainable_params`` (elements), ``flat_state`` (the optimizer's state on its flat partitions, already per
    GPU; default ``optimizer_state / N``) and ``sixteen_bit`` (the engine trains in bf16/fp16: 2-byte weights
    and gradients). ``layout`` (:func:`shard_layout`): the engines' real cut of the parameter list (padding,
    partition edges, persistent parameters); without it the terms are the even split ``x / N``.
    ``param_bytes``: bytes per element of the stored parameters (FSDP2 keeps trainable parameters in fp32
    under mixed precision). ``rank``: the rank whose gradient storage is reported (default: the largest).

    Terms: ``weights`` (local parameter storage), ``master_weights`` (DeepSpeed's fp32 partition: a copy of
    the local weights whatever the training dtype), ``gradients`` (gradient storage at the optimizer step),
    ``grad_partition_fp32`` (the fp32 flat gradient partition a ZeRO step builds), ``optimizer_state``,
    ``gathered_working_set`` (one copy of the parameters gathered at once, in the compute dtype: ZeRO-3's live
    parameters, FSDP2's largest unit; :func:`step_memory` counts it per phase), ``ddp_buckets`` (DDP's
    gradient buckets), ``grad_buckets`` (ZeRO-3's reduction bucket, allocated once).
    """
    n = max(int(num_gpus), 1)

    def part(x: int) -> int:
        return -(-int(x) // n)  # exact ceil(x / n), whatever the size

    terms = {"weights": 0, "master_weights": 0, "gradients": 0, "grad_partition_fp32": 0, "optimizer_state": 0,
             "gathered_working_set": 0, "ddp_buckets": 0, "grad_buckets": 0}
    if sharding in ("none", "ddp"):
        terms.update(weights=weights, gradients=gradients, optimizer_state=optimizer_state)
        if sharding == "ddp" and n > 1:
            terms["ddp_buckets"] = gradients
        return terms
    if sharding == "fsdp":
        if layout is not None:
            terms.update(weights=layout.local_params * param_bytes,
                         gradients=layout.local_trainable * param_bytes if gradients else 0,
                         gathered_working_set=layout.gathered * gathered_elem_bytes)
        else:
            terms.update(weights=part(weights), gradients=part(gradients),
                         gathered_working_set=int(gathered_params) * int(gathered_elem_bytes))
        terms["optimizer_state"] = part(optimizer_state) if flat_state is None else int(flat_state)
        return terms
    if sharding not in ZERO:
        raise UserError(f"unknown sharding '{sharding}': use one of {', '.join(SHARDINGS)}")
    p = int(trainable_params)
    eb = 2 if sixteen_bit else int(param_bytes)
    terms["optimizer_state"] = part(optimizer_state) if flat_state is None else int(flat_state)
    if layout is None:  # the even split, as the ZeRO paper counts
        w = 2 * int(num_params) if sixteen_bit else weights
        g = (2 * p if gradients else 0) if sixteen_bit else gradients
        terms["master_weights"] = part(4 * p)
        if sixteen_bit and gradients:
            terms["grad_partition_fp32"] = 4 * (part(p) if sharding != "zero3" else min(part(p), ZERO3_SUB_GROUP))
        if sharding == "zero1":
            terms.update(weights=w, gradients=g)
        elif sharding == "zero2":
            terms.update(weights=w, gradients=part(g))
        else:
            terms.update(weights=part(w), gradients=part(g),
                         gathered_working_set=int(gathered_params) * int(gathered_elem_bytes))
        return terms
    local = layout.local_trainable
    held = max(layout.grad_storage) if rank is None else layout.grad_storage[rank]
    terms["weights"] = layout.local_params * eb
    terms["master_weights"] = 4 * local
    if sharding in ("zero1", "zero2"):
        if gradients:
            terms["gradients"] = held * eb
            terms["grad_partition_fp32"] = 4 * local  # the step flattens the partition into one fp32 tensor
        return terms
    if gradients:  # ZeRO-3: one flat gradient partition buffer, fp32 when training in fp32
        terms["gradients"] = local * eb
        terms["grad_partition_fp32"] = 4 * min(local, ZERO3_SUB_GROUP) if sixteen_bit else 0
        terms["grad_buckets"] = layout.bucket * eb
    terms["gathered_working_set"] = layout.gathered * eb
    return terms


def _gathered_copies(sharding: str, phase: str, grads_in_phase: int) -> int:
    """How many copies of the gathered parameters a phase holds at its peak. FSDP2: in forward the unit's
    all-gather output and its unsharded parameters (accelerate keeps the tail unit, the largest, unsharded
    into backward); in backward the unsharded parameters, plus their unsharded gradients once gradients
    exist at the phase's peak (measured: the backward peak at its start holds one copy). ZeRO-3: the live
    parameters, once."""
    if sharding == "fsdp":
        if phase.endswith("forward"):
            return 2
        return 1 + (1 if grads_in_phase > 0 else 0)
    return 1 if sharding == "zero3" else 0


def _partition_sizes(inv: Inventory, sharding: str, n: int) -> list[int]:
    """Elements of each flat 1-D partition a ZeRO rank's optimizer steps (one per Trainer parameter group):
    ZeRO-1/2 cut the padded flat group evenly; ZeRO-3 concatenates the rank's partition of each parameter."""
    out = []
    for group in _decay_groups(inv):
        if sharding == "zero3":
            out.append(sum(_ceil_div(r.numel, n) for r in group))
        else:
            total = sum(r.numel for r in group)
            out.append(_ceil_div(total, ZERO_ALIGNMENT * n) * ZERO_ALIGNMENT)
    return out


def _fsdp_state(setup: TrainingSetup, inv: Inventory, n: int) -> int:
    """A rank's optimizer state under FSDP2, parameter by parameter: each state tensor of a parameter's shape is
    a DTensor sharded on dim 0 (``ceil(d0 / N)`` rows), a 0-d step counter is whole on every rank. GaLore (its
    ops run on the DTensor gradient; measured): the projector comes out of the SVD replicated, and the moments
    of the projected gradient stay sharded when it is projected from the right (dim 0 kept), replicated when
    from the left (dim 0 contracted). Device-resident keys only."""
    spec = get_spec(setup.optim)
    if spec.state_location == "host":
        return 0
    args = spec.resolve_args(parse_optim_args(setup.optim_args))
    targeted = (targeted_names(inv, setup.optim_target_modules) if spec.needs_target_modules
                else frozenset())
    total = 0
    for row in inv.rows:
        if not (row.trainable or spec.state_for_frozen):
            continue
        d0 = row.shape[0] if row.shape else 1
        frac = _ceil_div(d0, n) / d0
        projected = spec.family == "galore" and row.name in targeted and len(row.shape) == 2
        side = projection_side(row.shape[0], row.shape[1], str(args.get("proj_type", "std"))) if projected else None
        for key, nbytes in spec.param_state(ParamCtx(row, args, row.name in targeted)).items():
            if key in spec.host_keys:
                continue
            whole = nbytes <= 8 or (projected and (key == "projector" or side != "right"))
            total += nbytes if whole else math.ceil(nbytes * frac)
    if spec.shared is not None:
        total += sum(v for k, v in spec.shared(inv, args).items() if k not in spec.host_keys)
    return total


def sharded_terms(setup: TrainingSetup, inv: Inventory, facts: ModelSizes, W: int, G: int, O: int,
                  optim_args: Mapping[str, Any], rank: int | None = None) -> dict[str, int]:
    """Per-rank model-state terms of ``setup`` (:func:`shard_model_states`) from the single-GPU weights ``W``,
    gradients ``G`` and device optimizer state ``O`` (bytes) and the optimizer's resolved ``optim_args``."""
    spec = get_spec(setup.optim)
    compute_bytes = DTYPES[setup.mixed_precision] if setup.mixed_precision else DTYPES[normalize_dtype(setup.dtype)]
    n = setup.num_processes
    flat = None
    if setup.sharding in ZERO and spec.keeps_gradients:
        flat = _flat_partition_state(inv, setup.optim, optim_args, facts, n, "fp32",
                                     sizes=_partition_sizes(inv, setup.sharding, n))
    elif setup.sharding in ZERO:  # LOMO family on ZeRO-3: lomo_optim keeps its (tiny) state per full shape
        flat = O
    if setup.sharding == "fsdp":
        flat = _fsdp_state(setup, inv, n)
    layout = shard_layout(inv, facts, setup.sharding, n)
    param_bytes = DTYPES[normalize_dtype(setup.dtype)]
    if setup.sharding == "fsdp" and setup.mixed_precision:
        param_bytes = 4  # accelerate upcasts trainable parameters to fp32 for FSDP2 under mixed precision
    gathered = facts.largest_module_params if setup.sharding == "zero3" else facts.largest_unit_params
    return shard_model_states(sharding=setup.sharding, num_gpus=n, weights=W, gradients=G,
                              optimizer_state=O, num_params=facts.num_params,
                              trainable_params=facts.trainable_params, flat_state=flat,
                              sixteen_bit=setup.sixteen_bit, gathered_params=gathered,
                              gathered_elem_bytes=compute_bytes, layout=layout, param_bytes=param_bytes, rank=rank)


__all__ = ["FSDP2_FAILS", "ShardLayout", "ZERO", "ZERO3_MAX_LIVE", "ZERO3_SUB_GROUP", "shard_layout",
           "shard_model_states", "sharded_terms", "sharding_support"]
