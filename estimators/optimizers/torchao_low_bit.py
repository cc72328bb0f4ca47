"""torchao AdamW4bit / AdamW8bit (``adamw_torch_4bit`` / ``adamw_torch_8bit``).

Read from torchao 0.18 (``torchao/optim/adam.py``, ``subclass_8bit.py``, ``subclass_4bit.py``) and
transformers 5.23 (``_get_torchao_optimizer``); exact through a real ``Trainer`` on CPU for tiny-llama /
tiny-gpt2 / tiny-t5, fp32 and bf16 (tests/estimators/test_state_exact_core.py).

Per parameter (bytes):

* ``step``: ``torch.tensor(0.0)``, a 0-dim fp32 tensor (4; created on the host even on CUDA).
* ``exp_avg`` and ``exp_avg_sq``: quantized only when the parameter has >= 4096 elements and its size
  divides by ``block_size`` (the Trainer passes 256, for 4-bit too); otherwise a plain ``zeros_like`` in
  the parameter's dtype (n * s). A quantized state is a tensor subclass holding three plain tensors:
  ``codes`` uint8 (8-bit: n; 4-bit: n // 2, two codes per byte), ``scale`` fp32 (n // block_size * 4) and
  its own copy of the quantization map ``qmap`` fp32 (8-bit: 256 * 4 = 1024; 4-bit: 16 * 4 = 64).

Per optimizer: ``_AdamBase.add_param_group`` turns each group's ``lr`` into a 0-dim fp32 tensor, and the
Trainer's LR scheduler stores a clone of it as ``initial_lr`` (torch ``LRScheduler.__init__`` clones tensor
learning rates): 4 + 4 bytes for each of the Trainer's two parameter groups (decay / no decay), 16 in all.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..params import Inventory
from .bnb import rejected_arg
from .spec import FP32, OptimizerSpec, ParamCtx

MIN_QUANT = 4096
TRAINER_PARAM_GROUPS = 2
"""The Trainer always builds two parameter groups (weight decay / no weight decay), even if one is empty."""

_QMAP_ENTRIES = {8: 256, 4: 16}


def trainer_strtobool(value: str) -> bool:
    """``transformers.utils.strtobool``: y/yes/t/true/on/1 -> True, n/no/f/false/off/0 -> False."""
    v = str(value).strip().lower()
    if v in ("y", "yes", "t", "true", "on", "1"):
        return True
    if v in ("n", "no", "f", "false", "off", "0"):
        return False
    raise ValueError(f"invalid truth value {value!r}")


def _low_bit(bits: int):
    qmap_bytes = _QMAP_ENTRIES[bits] * FP32

    def state(ctx: ParamCtx) -> dict[str, int]:
        """{state tensor name: bytes} for one parameter (see the module docstring)."""
        block = int(ctx.args["block_size"])
        out = {"step": FP32}
        quantized = ctx.n >= MIN_QUANT and ctx.n % block == 0
        for key in ("exp_avg", "exp_avg_sq"):
            if quantized:
                out[f"{key}.codes"] = ctx.n * bits // 8
                out[f"{key}.scale"] = ctx.n // block * FP32
                out[f"{key}.qmap"] = qmap_bytes
            else:
                out[key] = ctx.n * ctx.s
        return out

    return state


def _group_lr(inv: Inventory, args: Mapping[str, Any]) -> dict[str, int]:
    """Per-group 0-dim fp32 ``lr`` tensors and the scheduler's ``initial_lr`` clones (bytes)."""
    return {"lr": TRAINER_PARAM_GROUPS * FP32, "initial_lr": TRAINER_PARAM_GROUPS * FP32}


_BLOCK_SIZE_STRING = ("transformers 5.23 passes block_size to torchao unconverted (a string), and the first step "
                      "fails with \"TypeError: unsupported operand type(s) for %: 'int' and 'str'\"; leave it out "
                      "(the Trainer then uses 256)")
_ARGS = {"block_size": rejected_arg("block_size", _BLOCK_SIZE_STRING), "bf16_stochastic_round": trainer_strtobool}
_DEFAULTS = {"block_size": 256, "bf16_stochastic_round": False}
_HOST = frozenset({"step", "lr", "initial_lr"})
"""``torch.tensor(...)`` without a device: these stay in host memory when training on CUDA."""

SPECS = [
    OptimizerSpec(name="adamw_torch_8bit", family="adam-8bit", cls="torchao.optim.AdamW8bit", package="torchao",
                  defaults=dict(_DEFAULTS), arg_types=_ARGS, state=_low_bit(8), shared=_group_lr,
                  host_keys=_HOST,
                  description="torchao AdamW8bit, blockwise dynamic-tree quantization"),
    OptimizerSpec(name="adamw_torch_4bit", family="adam-4bit", cls="torchao.optim.AdamW4bit", package="torchao",
                  defaults=dict(_DEFAULTS), arg_types=_ARGS, state=_low_bit(4), shared=_group_lr,
                  host_keys=_HOST,
                  description="torchao AdamW4bit"),
]
