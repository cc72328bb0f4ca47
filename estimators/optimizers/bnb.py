"""bitsandbytes optimizers (8-bit blockwise and 32-bit, paged or not) as the Trainer builds them.

8-bit state applies to parameters with at least ``min_8bit_size`` (4096) elements that are not
embeddings (the Trainer overrides ``nn.Embedding`` weights to ``optim_bits=32``). 8-bit state: uint8
codes, one fp32 absmax per 256-element block; the quantization maps are shared per optimizer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from .spec import FP32, OptimizerSpec, ParamCtx, blocks

MIN_8BIT_SIZE = 4096
BLOCK = 256
QMAP_BYTES = 256 * FP32


def _is_8bit(ctx: ParamCtx) -> bool:
    return ctx.args["optim_bits"] == 8 and ctx.n >= MIN_8BIT_SIZE and not ctx.row.in_embedding


def _two_state(ctx: ParamCtx) -> dict[str, int]:
    if _is_8bit(ctx):
        nb = blocks(ctx.n, BLOCK) * FP32
        return {"state1": ctx.n, "state2": ctx.n, "absmax1": nb, "absmax2": nb}
    return {"state1": ctx.n * FP32, "state2": ctx.n * FP32}


def _one_state(ctx: ParamCtx) -> dict[str, int]:
    if _is_8bit(ctx):
        return {"state1": ctx.n, "absmax1": blocks(ctx.n, BLOCK) * FP32}
    return {"state1": ctx.n * FP32}


def _ademamix(ctx: ParamCtx) -> dict[str, int]:
    # state1 holds both EMAs: shape (2, *param.shape).
    if _is_8bit(ctx):
        nb = blocks(ctx.n, BLOCK) * FP32
        return {"state1": 2 * ctx.n, "absmax1": 2 * nb, "state2": ctx.n, "absmax2": nb}
    return {"state1": 2 * ctx.n * FP32, "state2": ctx.n * FP32}


def _qmaps(inv: Inventory, args: Mapping[str, Any]) -> dict[str, int]:
    if args["optim_bits"] != 8:
        return {}
    return {"qmap_dynamic": QMAP_BYTES, "qmap_udynamic": QMAP_BYTES}


def _spec(name: str, cls: str, state, family: str, *, bits: int, paged: bool, cpu: bool = True,
          cpu_note: str = "", arg_types=None, extra_defaults=None) -> OptimizerSpec:
    defaults = {"optim_bits": bits, "min_8bit_size": MIN_8BIT_SIZE, **(extra_defaults or {})}
    if "rmsprop" not in name:
        defaults["is_paged"] = paged
    return OptimizerSpec(name=name, family=family, cls=f"bitsandbytes.optim.{cls}", package="bitsandbytes",
                         defaults=defaults, arg_types=arg_types or {}, state=state, shared=_qmaps,
                         runs_on_cpu=cpu, cpu_note=cpu_note,
                         description=f"bitsandbytes {cls} {bits}-bit{' paged' if paged else ''}")


_ADEMAMIX_ARGS = {"beta1": float, "beta2": float, "beta3": float, "alpha": float, "eps": float,
                  "t_alpha": int, "t_beta3": int}
_PAGED_CPU = "paged bitsandbytes optimizers need CUDA managed memory for AdEMAMix"

SPECS = [
    _spec("adamw_bnb_8bit", "AdamW", _two_state, "adam-8bit", bits=8, paged=False),
    _spec("adamw_8bit", "AdamW", _two_state, "adam-8bit", bits=8, paged=False),
    _spec("paged_adamw_8bit", "AdamW", _two_state, "adam-8bit", bits=8, paged=True),
    _spec("paged_adamw_32bit", "AdamW", _two_state, "adam", bits=32, paged=True),
    _spec("ademamix", "AdEMAMix", _ademamix, "ademamix", bits=32, paged=False, arg_types=_ADEMAMIX_ARGS),
    _spec("ademamix_8bit", "AdEMAMix", _ademamix, "ademamix", bits=8, paged=False, arg_types=_ADEMAMIX_ARGS),
    _spec("paged_ademamix_32bit", "AdEMAMix", _ademamix, "ademamix", bits=32, paged=True, cpu=False,
          cpu_note=_PAGED_CPU, arg_types=_ADEMAMIX_ARGS),
    _spec("paged_ademamix_8bit", "AdEMAMix", _ademamix, "ademamix", bits=8, paged=True, cpu=False,
          cpu_note=_PAGED_CPU, arg_types=_ADEMAMIX_ARGS),
    _spec("lion_8bit", "Lion", _one_state, "lion", bits=8, paged=False),
    _spec("lion_32bit", "Lion", _one_state, "lion", bits=32, paged=False),
    _spec("paged_lion_8bit", "Lion", _one_state, "lion", bits=8, paged=True),
    _spec("paged_lion_32bit", "Lion", _one_state, "lion", bits=32, paged=True),
    _spec("rmsprop_bnb", "RMSprop", _one_state, "rmsprop", bits=32, paged=False),
    _spec("rmsprop_bnb_8bit", "RMSprop", _one_state, "rmsprop", bits=8, paged=False),
    _spec("rmsprop_bnb_32bit", "RMSprop", _one_state, "rmsprop", bits=32, paged=False),
]
