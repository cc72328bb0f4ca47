"""torch.optim optimizers and transformers' own Adafactor, as the Trainer builds them."""
from __future__ import annotations

import math

from .spec import FP32, OptimizerSpec, ParamCtx, parse_bool

ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def _adam(ctx: ParamCtx) -> dict[str, int]:
    # exp_avg / exp_avg_sq in the parameter's dtype; `step` a 0-dim fp32 tensor.
    return {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s, "step": FP32}


def _sgd(ctx: ParamCtx) -> dict[str, int]:
    # momentum_buffer only exists when momentum != 0 (the Trainer passes none).
    return {"momentum_buffer": ctx.n * ctx.s} if ctx.args.get("momentum", 0.0) != 0 else {}


def _adagrad(ctx: ParamCtx) -> dict[str, int]:
    return {"sum": ctx.n * ctx.s, "step": FP32}


def _rmsprop(ctx: ParamCtx) -> dict[str, int]:
    out = {"square_avg": ctx.n * ctx.s, "step": FP32}
    if ctx.args.get("momentum", 0.0) > 0:
        out["momentum_buffer"] = ctx.n * ctx.s
    if ctx.args.get("centered", False):
        out["grad_avg"] = ctx.n * ctx.s
    return out


def _adafactor(ctx: ParamCtx) -> dict[str, int]:
    # transformers.optimization.Adafactor upcasts 16-bit grads to fp32 before creating state, so every
    # state tensor is fp32. Factored (>= 2-D): row = shape[:-1], col = shape[:-2] + shape[-1:].
    shape = ctx.row.shape
    out: dict[str, int] = {}
    if ctx.args.get("beta1") is not None:
        out["exp_avg"] = ctx.n * FP32
    if len(shape) >= 2:
        out["exp_avg_sq_row"] = math.prod(shape[:-1]) * FP32
        out["exp_avg_sq_col"] = math.prod(shape[:-2]) * shape[-1] * FP32
    else:
        out["exp_avg_sq"] = ctx.n * FP32
    out["RMS"] = FP32
    return out


def _unsupported(name: str, cls: str, reason: str, *, family: str = "adam", package: str | None = None,
                 availability: str = "unsupported", trainer_name: bool = True) -> OptimizerSpec:
    return OptimizerSpec(name=name, family=family, cls=cls, package=package, availability=availability,
                         reason=reason, runs_on_cpu=False, trainer_name=trainer_name)


SPECS = [
    OptimizerSpec(name="adamw_torch", family="adam", cls="torch.optim.AdamW", defaults=dict(ADAM_DEFAULTS),
                  state=_adam, description="PyTorch AdamW (foreach on CUDA)"),
    OptimizerSpec(name="adamw_torch_fused", family="adam", cls="torch.optim.AdamW",
                  defaults={**ADAM_DEFAULTS, "fused": True}, state=_adam,
                  description="PyTorch fused AdamW; the Trainer's default optimizer"),
    OptimizerSpec(name="adafactor", family="adafactor", cls="transformers.optimization.Adafactor",
                  defaults={"scale_parameter": False, "relative_step": False, "beta1": None}, state=_adafactor,
                  description="transformers Adafactor, factored second moment, no first moment"),
    OptimizerSpec(name="sgd", family="sgd", cls="torch.optim.SGD", defaults={"momentum": 0.0},
                  arg_types={"momentum": float, "dampening": float, "weight_decay": float, "nesterov": parse_bool},
                  state=_sgd, description="PyTorch SGD (no momentum unless optim_args sets it)"),
    OptimizerSpec(name="adagrad", family="adagrad", cls="torch.optim.Adagrad",
                  arg_types={"lr_decay": float, "weight_decay": float, "eps": float}, state=_adagrad,
                  description="PyTorch Adagrad; state created when the optimizer is built"),
    OptimizerSpec(name="rmsprop", family="rmsprop", cls="torch.optim.RMSprop",
                  defaults={"momentum": 0.0, "centered": False},
                  arg_types={"momentum": float, "alpha": float, "eps": float, "weight_decay": float,
                             "centered": parse_bool},
                  state=_rmsprop, description="PyTorch RMSprop"),
    _unsupported("adamw_torch_xla", "torch_xla.amp.syncfree.AdamW",
                 "adamw_torch_xla needs a TPU/XLA device and torch_xla, which optimem does not target",
                 package="torch_xla"),
    _unsupported("adamw_torch_npu_fused", "torch_npu.optim.NpuFusedAdamW",
                 "adamw_torch_npu_fused needs an Ascend NPU and torch_npu, which optimem does not target",
                 package="torch_npu"),
    _unsupported("adamw_anyprecision", "torchdistx.optimizers.AnyPrecisionAdamW",
                 "adamw_anyprecision needs torchdistx, which has no release for current torch on PyPI",
                 package="torchdistx"),
    _unsupported("adamw_apex_fused", "apex.optimizers.FusedAdam",
                 "adamw_apex_fused was removed from transformers; use adamw_torch_fused (same state: 8 bytes "
                 "per fp32 parameter)", availability="removed", trainer_name=False),
    _unsupported("adamw_hf", "transformers.AdamW",
                 "adamw_hf was removed from transformers; use adamw_torch (same state: exp_avg + exp_avg_sq)",
                 availability="removed", trainer_name=False),
]
