"""GrokAdamW, schedule-free optimizers and torch-optimi's StableAdamW."""
from __future__ import annotations

from .spec import FP32, OptimizerSpec, ParamCtx, parse_bool


def _grok(ctx: ParamCtx) -> dict[str, int]:
    return {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s, "grok_ema": ctx.n * ctx.s}


def _sf_adam(ctx: ParamCtx) -> dict[str, int]:
    return {"z": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s}


def _sf_sgd(ctx: ParamCtx) -> dict[str, int]:
    return {"z": ctx.n * ctx.s}


def _stable(ctx: ParamCtx) -> dict[str, int]:
    out = {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s}
    kahan = ctx.args.get("kahan_sum")
    if kahan or (kahan is None and ctx.row.dtype in ("bf16", "fp16")):
        out["kahan_comp"] = ctx.n * ctx.s
    return out


_SF_ARGS = {"weight_lr_power": float, "r": float}

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
                  pip="torch-optimi", state=_stable, defaults={"kahan_sum": None, "decouple_lr": False},
                  arg_types={"max_lr": float, "kahan_sum": parse_bool, "decouple_lr": parse_bool},
                  description="torch-optimi StableAdamW, Kahan-compensated for 16-bit parameters"),
]
