"""FlashOptim optimizers (``flash_*``): not Trainer names; optimem passes them through
``optimizer_cls_and_kwargs``. Quantized states with one fp16 scale per 32-element group, and an
error-correction buffer that extends 16-bit parameters to a 24- or 32-bit master weight.
"""
from __future__ import annotations

from .spec import OptimizerSpec, ParamCtx, blocks

GROUP = 32
FP16 = 2


def _q8(n: int) -> int:
    return n + blocks(n, GROUP) * FP16


def _error_bits(ctx: ParamCtx) -> dict[str, int]:
    bits = ctx.args.get("master_weight_bits", 24)
    if ctx.row.dtype == "fp32" or not bits:
        return {}
    return {"error_bits": ctx.n * (1 if bits == 24 else 2)}


def _adam(ctx: ParamCtx) -> dict[str, int]:
    return {"exp_avg": _q8(ctx.n), "exp_avg_sq": _q8(ctx.n), **_error_bits(ctx)}


def _lion(ctx: ParamCtx) -> dict[str, int]:
    return {"exp_avg": _q8(ctx.n), **_error_bits(ctx)}


def _sgd(ctx: ParamCtx) -> dict[str, int]:
    return {**_error_bits(ctx)}


_CPU = "FlashOptim kernels are Triton/CUDA only"
_ARGS = {"master_weight_bits": int}


def _flash(name, cls, state, family, description):
    return OptimizerSpec(name=name, family=family, cls=f"flashoptim.{cls}", package="flashoptim",
                         defaults={"master_weight_bits": 24}, arg_types=dict(_ARGS), state=state,
                         runs_on_cpu=False, cpu_note=_CPU, trainer_name=False, description=description)


SPECS = [
    _flash("flash_adamw", "FlashAdamW", _adam, "adam-8bit", "FlashOptim AdamW (quantized states)"),
    _flash("flash_adam", "FlashAdam", _adam, "adam-8bit", "FlashOptim Adam (quantized states)"),
    _flash("flash_sgd", "FlashSGD", _sgd, "sgd", "FlashOptim SGD"),
    _flash("flash_sgdw", "FlashSGDW", _sgd, "sgd", "FlashOptim SGDW"),
    _flash("flash_lion", "FlashLion", _lion, "lion", "FlashOptim Lion"),
]
