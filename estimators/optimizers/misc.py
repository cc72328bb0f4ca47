"""GrokAdamW, schedule-free optimizers and torch-optimi's StableAdamW.

Read from grokadamw 0.1.2, schedulefree 1.4.1, torch-optimi 0.3.3 (``optimi/stableadamw.py``,
``optimi/utils.py``) and transformers 5.23 (``trainer_optimizer.py``); exact through a real ``Trainer`` on CPU
for tiny-llama / tiny-gpt2 / tiny-t5, fp32 and bf16 (tests/estimators/test_state_exact_core.py). All figures in bytes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..params import Inventory
from .spec import FP32, OptimizerSpec, ParamCtx

INT32 = 4
TRAINER_PARAM_GROUPS = 2
"""The Trainer always builds two parameter groups (weight decay / no weight decay), even if one is empty."""


def _grok(ctx: ParamCtx) -> dict[str, int]:
    """GrokAdamW keeps, in ``param_groups[i]['state'][p]`` and on the host (``device='cpu'``), exp_avg,
    exp_avg_sq and grok_ema in the parameter's dtype (n*s each); ``step`` is a Python int."""
    return {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s, "grok_ema": ctx.n * ctx.s}


def _sf_adam(ctx: ParamCtx) -> dict[str, int]:
    """AdamWScheduleFree / RAdamScheduleFree: z (a clone of the parameter) and exp_avg_sq, n*s each;
    the per-group counters (k, weight_sum, lr_max...) are Python numbers."""
    return {"z": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s}


def _sf_sgd(ctx: ParamCtx) -> dict[str, int]:
    """SGDScheduleFree: z (a clone of the parameter), n*s."""
    return {"z": ctx.n * ctx.s}


def _stable(ctx: ParamCtx) -> dict[str, int]:
    """torch-optimi StableAdamW, per parameter with a gradient (``_init_state``):

    * exp_avg, exp_avg_sq: ``zeros_like(p)``, n*s each;
    * eps_sq: a 0-dim tensor in the parameter's dtype (s);
    * kahan_comp: ``zeros_like(p)`` (n*s) for a 16-bit parameter unless kahan_sum is False (through the
      Trainer it never is: ``bool("False")`` is True); for an fp32 parameter a uint8[1] placeholder (1) on
      the Triton path, nothing otherwise;
    * mean_square: fp32[1] scratch (4), Triton path only.

    ``triton`` (not an ``optim_args`` key: the Trainer cannot pass it) is whether optimi takes its Triton
    path. optimi 0.3.3 takes it whenever triton is importable (it checks an empty parameter list), which
    is every CUDA install of torch, so the default is True; on a CPU-only install (no triton) it is False.
    """
    out = {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s, "eps_sq": ctx.s}
    triton = ctx.args.get("triton", True)
    if ctx.args.get("kahan_sum") is not False and ctx.row.dtype in ("bf16", "fp16"):
        out["kahan_comp"] = ctx.n * ctx.s
    elif triton:
        out["kahan_comp"] = 1
    if triton:
        out["mean_square"] = FP32
    return out


def _stable_shared(inv: Inventory, args: Mapping[str, Any]) -> dict[str, int]:
    """One 0-dim int32 ``step`` tensor per parameter group (the Trainer's two), created at the first step
    with ``torch.tensor(0, dtype=torch.int32)``: in host memory even when training on CUDA."""
    return {"step": TRAINER_PARAM_GROUPS * INT32}


def trainer_truthy(value: str) -> bool:
    """How transformers' ``_get_stable_adamw`` reads ``kahan_sum`` / ``decouple_lr``: ``bool(string)``,
    so every value given, "False" and "0" included, is True."""
    return bool(value)


_SF_ARGS = {"weight_lr_power": float, "r": float}

_STABLE_CPU = ("on CPU, torch-optimi 0.3.3 picks its Triton kernels whenever triton is importable and the first step "
               "fails ('0 active drivers'); without triton it runs its PyTorch path, whose state is 5 B (fp32) / 4 B "
               "(16-bit) per parameter tensor below this estimate (the Triton path's mean_square and kahan "
               "placeholder)")

SPECS = [
    OptimizerSpec(name="grokadamw", family="adam", cls="grokadamw.GrokAdamW", package="grokadamw", state=_grok,
                  arg_types={"alpha_init": float, "lamb": float, "gamma": float,
                             "grokking_signal_decay_rate": float, "gradient_clipping": float},
                  state_location="host", state_container="param_groups",
                  description="GrokAdamW: state in param_groups, on the host"),
    OptimizerSpec(name="schedule_free_adamw", family="schedule-free", cls="schedulefree.AdamWScheduleFree",
                  package="schedulefree", state=_sf_adam, arg_types=_SF_ARGS, description="Schedule-free AdamW"),
    OptimizerSpec(name="schedule_free_radam", family="schedule-free", cls="schedulefree.RAdamScheduleFree",
                  package="schedulefree", state=_sf_adam, arg_types=_SF_ARGS, description="Schedule-free RAdam"),
    OptimizerSpec(name="schedule_free_sgd", family="schedule-free", cls="schedulefree.SGDScheduleFree",
                  package="schedulefree", state=_sf_sgd, arg_types=_SF_ARGS, description="Schedule-free SGD"),
    OptimizerSpec(name="stable_adamw", family="adam", cls="optimi.StableAdamW", package="optimi",
                  pip="torch-optimi", state=_stable, shared=_stable_shared,
                  defaults={"kahan_sum": None, "decouple_lr": False, "triton": True},
                  arg_types={"max_lr": float, "kahan_sum": trainer_truthy, "decouple_lr": trainer_truthy},
                  cpu_note=_STABLE_CPU, host_keys=frozenset({"step"}),
                  description="torch-optimi StableAdamW, Kahan-compensated for 16-bit parameters"),
]
