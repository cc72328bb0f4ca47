"""torch.optim optimizers and transformers' own Adafactor, as the Trainer builds them.

Every state function returns ``{state tensor name: bytes}`` for one parameter (bytes = storage bytes).
Verified against torch 2.13 (``torch/optim/{adam,sgd,adagrad,rmsprop}.py``) and transformers 5.23
(``trainer_optimizer.py``, ``optimization.Adafactor``): exact on tiny-llama / tiny-gpt2 / tiny-t5, fp32 and
bf16, through a real ``Trainer`` on CPU (tests/estimators/test_state_exact_core.py).
"""
from __future__ import annotations

import math

from .spec import FP32, OptimizerSpec, ParamCtx

ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
_HOST_STEP = frozenset({"step"})
"""torch keeps ``step`` on the host unless the optimizer is fused or capturable (the Trainer's AdamW,
Adagrad and RMSprop are neither; ``adamw_torch_fused`` keeps it on the parameter's device)."""


def trainer_flag(value: str) -> bool:
    """A boolean ``optim_args`` value read the way transformers' ``_get_sgd`` / ``_get_rmsprop`` read it:
    true only for "true", "1" or "yes" (any case); anything else is false, never an error."""
    return str(value).strip().lower() in ("true", "1", "yes")


def _adam(ctx: ParamCtx) -> dict[str, int]:
    """exp_avg and exp_avg_sq in the parameter's dtype (n*s bytes each) plus ``step``, a 0-dim fp32
    tensor (4 bytes; on the parameter's device when fused, on the host otherwise)."""
    return {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s, "step": FP32}


def _sgd(ctx: ParamCtx) -> dict[str, int]:
    """momentum_buffer (a clone of the gradient: n*s bytes) only when momentum != 0; the Trainer passes
    none unless ``optim_args`` sets it, so plain SGD keeps 0 bytes."""
    return {"momentum_buffer": ctx.n * ctx.s} if ctx.args.get("momentum", 0.0) != 0 else {}


def _adagrad(ctx: ParamCtx) -> dict[str, int]:
    """sum (n*s bytes, created eagerly when the optimizer is built) and a 0-dim fp32 ``step`` (4 bytes)."""
    return {"sum": ctx.n * ctx.s, "step": FP32}


def _rmsprop(ctx: ParamCtx) -> dict[str, int]:
    """square_avg (n*s) and a 0-dim fp32 step (4 bytes); momentum_buffer (n*s) when momentum > 0;
    grad_avg (n*s) when centered."""
    out = {"square_avg": ctx.n * ctx.s, "step": FP32}
    if ctx.args.get("momentum", 0.0) > 0:
        out["momentum_buffer"] = ctx.n * ctx.s
    if ctx.args.get("centered", False):
        out["grad_avg"] = ctx.n * ctx.s
    return out


def _adafactor(ctx: ParamCtx) -> dict[str, int]:
    """transformers' Adafactor upcasts 16-bit gradients to fp32 before creating state, so every state
    tensor is fp32 (4 bytes per element) whatever the parameter dtype. Factored (>= 2-D):
    exp_avg_sq_row = prod(shape[:-1]), exp_avg_sq_col = prod(shape[:-2]) * shape[-1] elements; 1-D:
    exp_avg_sq of n elements. exp_avg (n) only if beta1 is set (the Trainer leaves it None). ``RMS`` is a
    0-dim fp32 tensor after the first step (4 bytes); ``step`` is a Python int (0 bytes)."""
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
                  state=_adam, host_keys=_HOST_STEP, description="PyTorch AdamW (foreach on CUDA)"),
    OptimizerSpec(name="adamw_torch_fused", family="adam", cls="torch.optim.AdamW",
                  defaults={**ADAM_DEFAULTS, "fused": True}, state=_adam,
                  description="PyTorch fused AdamW; the Trainer's default optimizer"),
    OptimizerSpec(name="adafactor", family="adafactor", cls="transformers.optimization.Adafactor",
                  defaults={"scale_parameter": False, "relative_step": False, "beta1": None}, state=_adafactor,
                  description="transformers Adafactor, factored second moment, no first moment"),
    OptimizerSpec(name="sgd", family="sgd", cls="torch.optim.SGD", defaults={"momentum": 0.0},
                  arg_types={"momentum": float, "dampening": float, "weight_decay": float, "nesterov": trainer_flag},
                  state=_sgd, description="PyTorch SGD (no momentum unless optim_args sets it)"),
    OptimizerSpec(name="adagrad", family="adagrad", cls="torch.optim.Adagrad",
                  arg_types={"lr_decay": float, "weight_decay": float, "eps": float}, state=_adagrad,
                  host_keys=_HOST_STEP,
                  description="PyTorch Adagrad; state created when the optimizer is built"),
    OptimizerSpec(name="rmsprop", family="rmsprop", cls="torch.optim.RMSprop",
                  defaults={"momentum": 0.0, "centered": False},
                  arg_types={"momentum": float, "alpha": float, "eps": float, "weight_decay": float,
                             "centered": trainer_flag},
                  state=_rmsprop, host_keys=_HOST_STEP, description="PyTorch RMSprop"),
    _unsupported("adamw_torch_xla", "torch_xla.amp.syncfree.AdamW",
                 "adamw_torch_xla needs a TPU/XLA device and torch_xla, which optimem does not target",
                 package="torch_xla"),
    _unsupported("adamw_torch_npu_fused", "torch_npu.optim.NpuFusedAdamW",
                 "adamw_torch_npu_fused needs an Ascend NPU and torch_npu, which optimem does not target",
                 package="torch_npu"),
    _unsupported("adamw_anyprecision", "torchdistx.optimizers.AnyPrecisionAdamW",
                 "adamw_anyprecision needs torchdistx, which is not published on PyPI and has no build for "
                 "current torch",
                 package="torchdistx"),
    _unsupported("adamw_apex_fused", "apex.optimizers.FusedAdam",
                 "adamw_apex_fused was removed from transformers; use adamw_torch_fused (same state: 8 bytes "
                 "per fp32 parameter)", availability="removed", trainer_name=False),
    _unsupported("adamw_hf", "transformers.AdamW",
                 "adamw_hf was removed from transformers; use adamw_torch (same state: exp_avg + exp_avg_sq)",
                 availability="removed", trainer_name=False),
]
