"""torchao AdamW4bit / AdamW8bit (``adamw_torch_4bit`` / ``adamw_torch_8bit``).

A state is quantized only when the parameter has >= 4096 elements and its size divides by
``block_size`` (the Trainer passes 256); otherwise it is a plain ``zeros_like`` tensor.
"""
from __future__ import annotations

from .spec import FP32, OptimizerSpec, ParamCtx, parse_bool

MIN_QUANT = 4096


def _low_bit(bits: int):
    qmap_entries = 2 ** bits

    def state(ctx: ParamCtx) -> dict[str, int]:
        block = int(ctx.args["block_size"])
        out = {"step": FP32}
        for key in ("exp_avg", "exp_avg_sq"):
            if ctx.n >= MIN_QUANT and ctx.n % block == 0:
                out[f"{key}.codes"] = ctx.n * bits // 8
                out[f"{key}.scale"] = ctx.n // block * FP32
                out[f"{key}.qmap"] = qmap_entries * FP32
            else:
                out[key] = ctx.n * ctx.s
        return out

    return state


_ARGS = {"block_size": int, "bf16_stochastic_round": parse_bool}

SPECS = [
    OptimizerSpec(name="adamw_torch_8bit", family="adam-8bit", cls="torchao.optim.AdamW8bit", package="torchao",
                  defaults={"block_size": 256, "bf16_stochastic_round": False}, arg_types=_ARGS, state=_low_bit(8),
                  description="torchao AdamW8bit, blockwise dynamic-tree quantization"),
    OptimizerSpec(name="adamw_torch_4bit", family="adam-4bit", cls="torchao.optim.AdamW4bit", package="torchao",
                  defaults={"block_size": 256, "bf16_stochastic_round": False}, arg_types=_ARGS, state=_low_bit(4),
                  description="torchao AdamW4bit"),
]
