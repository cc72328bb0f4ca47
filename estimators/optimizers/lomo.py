"""LOMO and AdaLomo (lomo-optim): updates fused into backward, no stored gradients."""
from __future__ import annotations

import math

from .spec import FP32, OptimizerSpec, ParamCtx


def _lomo(ctx: ParamCtx) -> dict[str, int]:
    return {}


def _adalomo(ctx: ParamCtx) -> dict[str, int]:
    shape = ctx.row.shape
    if len(shape) >= 2:
        return {"exp_avg_sq_row": math.prod(shape[:-1]) * FP32, "exp_avg_sq_col": shape[-1] * FP32}
    return {"exp_avg_sq": ctx.n * FP32}


SPECS = [
    OptimizerSpec(name="lomo", family="lomo", cls="lomo_optim.Lomo", package="lomo_optim", pip="lomo-optim",
                  state=_lomo, keeps_gradients=False, description="LOMO: fused SGD update in backward"),
    OptimizerSpec(name="adalomo", family="lomo", cls="lomo_optim.AdaLomo", package="lomo_optim", pip="lomo-optim",
                  state=_adalomo, keeps_gradients=False, runs_on_cpu=False, state_container="attributes",
                  state_for_frozen=True,
                  cpu_note="AdaLomo creates its state with .cuda() when it is built: CUDA only",
                  description="AdaLomo: factored second moment, kept as optimizer attributes"),
]
