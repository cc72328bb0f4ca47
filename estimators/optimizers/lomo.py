"""LOMO and AdaLomo (lomo-optim 0.1.1): updates fused into backward, no stored gradients.

Read from lomo_optim and checked against the real optimizers (tests/estimators/test_state_exact_lowrank.py):

* ``Lomo`` keeps no tensor at all: each gradient is consumed in a hook (upcast to an fp32 temporary for
  16-bit parameters, then freed). The Trainer never calls ``grad_norm()`` (no ``clip_grad_norm``), so
  ``grad_norms`` / ``clip_coef`` stay empty.
* ``AdaLomo`` builds its whole state in ``__init__``, outside ``.state``, for every parameter
  ``model.named_parameters()`` yields (frozen ones too, tied ones once): fp32 ``exp_avg_sq_row`` of
  ``shape[0]`` and ``exp_avg_sq_col`` of ``shape[1]`` for a parameter of 2 or more dimensions, fp32
  ``exp_avg_sq`` of ``shape[0]`` for a 1-D one, whatever the parameter dtype; no fp32 master copies.
  Each tensor is created with ``.cuda()``: CUDA only.
"""
from __future__ import annotations

from .spec import FP32, OptimizerSpec, ParamCtx


def _lomo(ctx: ParamCtx) -> dict[str, int]:
    return {}


def _adalomo(ctx: ParamCtx) -> dict[str, int]:
    shape = ctx.row.stored_shape  # a bitsandbytes 4-bit weight is a packed (n/2, 1) tensor
    if len(shape) == 1:
        return {"exp_avg_sq": shape[0] * FP32}
    return {"exp_avg_sq_row": shape[0] * FP32, "exp_avg_sq_col": shape[1] * FP32}


SPECS = [
    OptimizerSpec(name="lomo", family="lomo", cls="lomo_optim.Lomo", package="lomo_optim", pip="lomo-optim",
                  state=_lomo, keeps_gradients=False, description="LOMO: fused SGD update in backward"),
    OptimizerSpec(name="adalomo", family="lomo", cls="lomo_optim.AdaLomo", package="lomo_optim", pip="lomo-optim",
                  state=_adalomo, keeps_gradients=False, runs_on_cpu=False, state_container="attributes",
                  state_for_frozen=True,
                  cpu_note="AdaLomo creates its state with .cuda() in __init__: CUDA only (the same code runs "
                           "on CPU once .cuda() is a no-op)",
                  description="AdaLomo: factored fp32 second moment for every parameter, kept as optimizer "
                              "attributes"),
]
