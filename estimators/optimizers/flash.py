"""FlashOptim optimizers (``flash_*``, flashoptim 0.1.4): not Trainer names; optimem passes them through
``optimizer_cls_and_kwargs`` (``optimem.harness.scenario.flash_optimizer_cls_and_kwargs``).

Layout, read from ``flashoptim/optimizers.py`` (0.1.4) and checked on CPU by ``tests/estimators/test_flash_formulas.py``
(the real state-creation code run with the Triton launches stubbed out):

* Every quantized state (``FlashOptimizer._ensure_state_initialized`` -> ``_MaybeQuantizedTensor`` ->
  ``quantize()``): codes ``empty_like(param, int8)`` (signed: exp_avg, momentum_buffer) or ``uint8``
  (exp_avg_sq), N bytes, plus ``torch.empty(ceil(N / 32), float16)`` scales: one fp16 scale per 32-element
  group, the last group padded (no other per-tensor extras). With ``quantize=False`` the state is kept
  unquantized in the parameter's dtype (``set_data``: ``data.to(storage_dtype=param.dtype)``).
* ``error_bits`` (the master-weight extension): ``master_weight_bits`` gives a master byte width
  (``_BITS_TO_BYTES``: None -> 0, 24 -> 3, 32 -> 4); a parameter gets ``width - param.element_size()``
  error bytes per element when that is positive: int8 (1 B) for 16-bit params at 24 bits, int16 (2 B) at
  32 bits, nothing for fp32 params or ``master_weight_bits=None``.
* FlashAdam/FlashAdamW: exp_avg (int8) + exp_avg_sq (uint8, sqrt-companded), and ``step``: a 0-dim
  int64 tensor created on the CPU (8 B, host memory even when training on CUDA).
* FlashLion: exp_avg (int8). FlashSGD/FlashSGDW: ``momentum_buffer`` (int8) only when momentum > 0
  (constructor default momentum=0.0, and the Trainer passes none): by default no state but error_bits.
* Coupled vs decoupled weight decay (Adam/AdamW, SGD/SGDW) changes no state.
* ``FlashOptimizer.__init__`` raises ValueError when every parameter it gets is fp32 and
  ``master_weight_bits`` is not None (unless FLASHOPTIM_ALLOW_INEFFECTIVE_MASTER_WEIGHT_BITS is set);
  the default is 24, so fp32 training needs ``optim_args="master_weight_bits=None"``. optimem raises the
  same way (a UserError), also when that variable is set (the state is then that of None).
* Without CUDA the constructor raises NotImplementedError unless quantize=False, master_weight_bits=None
  and fused=False (the unfused PyTorch path, which then runs on CPU).
* Every parameter with a gradient gets its state at its first step (``step_param``); all parameters of
  a Trainer model do.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from ..params import Inventory
from .spec import OptimizerSpec, ParamCtx, blocks, parse_bool

GROUP = 32
"""Elements per quantization group (``quantize(group_size=32)``, ``_fused_*_step(group_size=32)``)."""
FP16 = 2
STEP_BYTES = 8
"""FlashAdam's ``step``: ``torch.tensor(0, dtype=torch.int64, device="cpu")``."""
MASTER_BYTES = {None: 0, 24: 3, 32: 4}
"""flashoptim's ``_BITS_TO_BYTES``."""
ALLOW_ENV = "FLASHOPTIM_ALLOW_INEFFECTIVE_MASTER_WEIGHT_BITS"


def master_weight_bits(value: str) -> int | None:
    """optim_args value for ``master_weight_bits``: 24, 32 or None (flashoptim's _VALID_MASTER_WEIGHT_BITS)."""
    v = str(value).strip().lower()
    if v in ("none", "null"):
        return None
    bits = int(v)
    if bits not in (24, 32):
        raise ValueError(f"master_weight_bits must be 24, 32 or None, got {value!r}")
    return bits


master_weight_bits.__name__ = "24, 32 or None"


def quantized_state_bytes(ctx: ParamCtx) -> int:
    """One FlashOptim state tensor: int8/uint8 codes + fp16 scale per 32 elements, or the param dtype."""
    if ctx.args.get("quantize", True):
        return ctx.n + blocks(ctx.n, GROUP) * FP16
    return ctx.n * ctx.s


def error_bits_bytes(ctx: ParamCtx) -> int:
    """Bytes of ``error_bits`` for one parameter (0: none is created)."""
    extra = MASTER_BYTES[ctx.args.get("master_weight_bits", 24)] - ctx.s
    return ctx.n * extra if extra > 0 else 0


def _with_error_bits(ctx: ParamCtx, state: dict[str, int]) -> dict[str, int]:
    err = error_bits_bytes(ctx)
    return {**state, "error_bits": err} if err else state


def _adam(ctx: ParamCtx) -> dict[str, int]:
    q = quantized_state_bytes(ctx)
    return _with_error_bits(ctx, {"exp_avg": q, "exp_avg_sq": q, "step": STEP_BYTES})


def _lion(ctx: ParamCtx) -> dict[str, int]:
    return _with_error_bits(ctx, {"exp_avg": quantized_state_bytes(ctx)})


def _sgd(ctx: ParamCtx) -> dict[str, int]:
    # FlashSGD._quantized_state_spec: momentum_buffer only when some group has momentum > 0.
    state = {"momentum_buffer": quantized_state_bytes(ctx)} if ctx.args.get("momentum", 0.0) > 0 else {}
    return _with_error_bits(ctx, state)


def _check(name: str):
    """Constructor checks of the real optimizer, raised as UserError (run through ``shared``: it sees the
    whole inventory, as ``FlashOptimizer.__init__`` sees every parameter the Trainer passes)."""

    def shared(inv: Inventory, args: Mapping[str, Any]) -> dict[str, int]:
        bits = args.get("master_weight_bits", 24)
        trainable = [r for r in inv.rows if r.trainable]
        if bits is not None and all(r.dtype == "fp32" for r in trainable):
            # Not skipped when ALLOW_ENV is set: estimates are cached, so they must not depend on the
            # environment; with it set the state is exactly that of master_weight_bits=None.
            raise UserError(f"{name} raises ValueError with fp32 parameters and master_weight_bits={bits} "
                            "(the default is 24; error bits need 16-bit parameters): pass optim_args "
                            f"'master_weight_bits=None' (same state as with {ALLOW_ENV} set) or store the "
                            "parameters in bf16/fp16")
        if args.get("nesterov") and (args.get("momentum", 0.0) <= 0 or args.get("dampening", 0.0) != 0):
            raise UserError(f"{name} raises ValueError: nesterov=True needs momentum > 0 and dampening=0")
        return {}

    return shared


_CPU = ("CUDA only with its defaults (Triton kernels); on CPU only with optim_args "
        "'quantize=False,master_weight_bits=None,fused=False' (states then in the parameter dtype)")
# Constructor keyword arguments that optim_args may set. `weight_decay` is left out: the Trainer's two
# param groups always carry their own weight_decay, which overrides the constructor's. `betas` is a tuple
# the "k=v,k=v" optim_args string cannot express.
_COMMON = {"master_weight_bits": master_weight_bits, "quantize": parse_bool, "compress_state_dict": parse_bool,
           "check_numerics": parse_bool, "fused": parse_bool}
_ADAM_ARGS = {**_COMMON, "eps": float}
_SGD_ARGS = {**_COMMON, "momentum": float, "dampening": float, "nesterov": parse_bool}
_DEFAULTS = {"master_weight_bits": 24, "quantize": True}


def _flash(name, cls, state, family, description, arg_types, extra_defaults=None):
    return OptimizerSpec(name=name, family=family, cls=f"flashoptim.{cls}", package="flashoptim",
                         defaults={**_DEFAULTS, **(extra_defaults or {})}, arg_types=dict(arg_types),
                         state=state, shared=_check(name), runs_on_cpu=False, cpu_note=_CPU, trainer_name=False,
                         host_keys=frozenset({"step"}), description=description)


SPECS = [
    _flash("flash_adamw", "FlashAdamW", _adam, "adam-8bit", "FlashOptim AdamW (quantized states)",
           {**_ADAM_ARGS, "decouple_lr": parse_bool}),
    _flash("flash_adam", "FlashAdam", _adam, "adam-8bit", "FlashOptim Adam (quantized states)", _ADAM_ARGS),
    _flash("flash_sgd", "FlashSGD", _sgd, "sgd", "FlashOptim SGD", _SGD_ARGS, {"momentum": 0.0}),
    _flash("flash_sgdw", "FlashSGDW", _sgd, "sgd", "FlashOptim SGDW",
           {**_SGD_ARGS, "decouple_lr": parse_bool}, {"momentum": 0.0}),
    _flash("flash_lion", "FlashLion", _lion, "lion", "FlashOptim Lion (quantized momentum)",
           {**_COMMON, "decouple_lr": parse_bool}),
]
