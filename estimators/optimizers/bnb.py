"""bitsandbytes optimizers (8-bit blockwise and 32-bit, paged or not) as the Trainer builds them.

Read from bitsandbytes 0.50.2 (``optim/optimizer.py``, ``optim/ademamix.py``, ``optim/lion.py``,
``optim/rmsprop.py``) and transformers 5.23 (``trainer_optimizer._get_bitsandbytes_optimizer``,
``Trainer.create_optimizer``); exact through a real ``Trainer`` on CPU for every name, tiny-llama /
tiny-gpt2 / tiny-t5, fp32 and bf16 (tests/estimators/test_state_exact_core.py).

* The Trainer passes ``optim_bits=8`` when "8bit" is in the name, else 32, and ``is_paged`` for
  ``paged_*`` (not for RMSprop, which has no paged variant). ``min_8bit_size`` stays 4096.
* 8-bit state applies to a parameter with at least ``min_8bit_size`` elements that is not an
  ``nn.Embedding`` weight (for 8-bit classes the Trainer registers every ``nn.Embedding`` weight with
  ``optim_bits=32``; a weight tied to an embedding is the same tensor, so it stays 32-bit too).
  8-bit state: uint8 codes (n bytes) + one fp32 absmax per 256-element block (ceil(n/256) * 4 bytes).
  Otherwise fp32 state whatever the parameter dtype (n * 4 bytes).
* The quantization maps are created on the host once per optimizer whenever ``optim_bits == 8`` (even if
  no parameter gets 8-bit state): ``dynamic`` (signed) and ``udynamic`` (unsigned), 256 fp32 each (1 KiB).
  The first 8-bit parameter moves them to its device; one-state optimizers (Lion, RMSprop) build both but
  move only ``dynamic``, so on CUDA their ``udynamic`` stays in host memory.
* ``step`` is a Python int (0 bytes); ``unorm_vec`` only exists with ``max_unorm > 0``, which the
  Trainer never passes.
* Paged variants on CUDA put state of parameters with >= 1e5 elements in CUDA managed memory (same
  bytes; torch sees it as a CPU tensor). On CPU they fall back to plain tensors, except AdEMAMix's
  double buffer (see ``_PAGED_ADEMAMIX_CPU``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from ..params import Inventory
from .spec import FP32, OptimizerSpec, ParamCtx, blocks

MIN_8BIT_SIZE = 4096
BLOCK = 256
QMAP_BYTES = 256 * FP32
PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages a state buffer only for parameters with at least this many elements."""


def rejected_arg(name: str, reason: str):
    """An ``arg_types`` converter for an ``optim_args`` key the Trainer forwards but the run cannot use:
    estimating it raises a UserError saying why, as the real run would fail."""

    def convert(value: str):
        raise UserError(f"optim_args {name}={value!r}: {reason}")

    convert.__name__ = f"no_{name}"
    return convert


def _is_8bit(ctx: ParamCtx) -> bool:
    return (ctx.args["optim_bits"] == 8 and ctx.n >= ctx.args.get("min_8bit_size", MIN_8BIT_SIZE)
            and not ctx.row.in_embedding)


def _two_state(ctx: ParamCtx) -> dict[str, int]:
    """AdamW: 8-bit: state1 + state2 uint8 (n bytes each) + absmax1 + absmax2 (ceil(n/256) * 4 bytes
    each); 32-bit: state1 + state2 fp32 (4n bytes each)."""
    if _is_8bit(ctx):
        nb = blocks(ctx.n, BLOCK) * FP32
        return {"state1": ctx.n, "state2": ctx.n, "absmax1": nb, "absmax2": nb}
    return {"state1": ctx.n * FP32, "state2": ctx.n * FP32}


def _one_state(ctx: ParamCtx) -> dict[str, int]:
    """Lion / RMSprop: 8-bit: state1 uint8 (n bytes) + absmax1 (ceil(n/256) * 4 bytes); 32-bit: state1
    fp32 (4n bytes)."""
    if _is_8bit(ctx):
        return {"state1": ctx.n, "absmax1": blocks(ctx.n, BLOCK) * FP32}
    return {"state1": ctx.n * FP32}


def _ademamix(ctx: ParamCtx) -> dict[str, int]:
    """AdEMAMix: state1 holds both EMAs, shape (2, *param.shape); state2 the second moment.
    8-bit: state1 2n bytes + absmax1 (2, ceil(n/256)) fp32, state2 n bytes + absmax2 ceil(n/256) fp32;
    32-bit: state1 8n bytes, state2 4n bytes."""
    if _is_8bit(ctx):
        nb = blocks(ctx.n, BLOCK) * FP32
        return {"state1": 2 * ctx.n, "absmax1": 2 * nb, "state2": ctx.n, "absmax2": nb}
    return {"state1": 2 * ctx.n * FP32, "state2": ctx.n * FP32}


def _qmaps(*, one_state: bool):
    def shared(inv: Inventory, args: Mapping[str, Any]) -> dict[str, int]:
        """The two 256-entry fp32 quantization maps (1024 bytes each) every 8-bit optimizer builds, on the
        host. The first parameter that gets 8-bit state moves them to its device (a one-state optimizer moves
        only ``dynamic``); the ``*_host`` keys are those left in host memory."""
        if args["optim_bits"] != 8:
            return {}
        moved = any(_is_8bit(ParamCtx(r, args)) for r in inv.rows if r.trainable)
        dynamic = "qmap_dynamic" if moved else "qmap_dynamic_host"
        udynamic = "qmap_udynamic" if moved and not one_state else "qmap_udynamic_host"
        return {dynamic: QMAP_BYTES, udynamic: QMAP_BYTES}

    return shared


def _spec(name: str, cls: str, state, family: str, *, bits: int, paged: bool, cpu: bool = True,
          cpu_note: str = "", arg_types=None, extra_defaults=None) -> OptimizerSpec:
    defaults = {"optim_bits": bits, "min_8bit_size": MIN_8BIT_SIZE, **(extra_defaults or {})}
    if "rmsprop" not in name:
        defaults["is_paged"] = paged
    return OptimizerSpec(name=name, family=family, cls=f"bitsandbytes.optim.{cls}", package="bitsandbytes",
                         defaults=defaults, arg_types=arg_types or {}, state=state,
                         shared=_qmaps(one_state=state is _one_state), runs_on_cpu=cpu, cpu_note=cpu_note,
                         host_keys=frozenset({"qmap_dynamic_host", "qmap_udynamic_host"}),
                         description=f"bitsandbytes {cls} {bits}-bit{' paged' if paged else ''}")


_ADEMAMIX_ARGS = {"beta1": float, "beta2": float, "beta3": float, "alpha": float, "eps": float,
                  "t_alpha": int, "t_beta3": int}

# transformers passes rmsprop_bnb* optim_args to bitsandbytes' RMSprop unconverted (strings): bnb compares
# them with floats (TypeError), and ``centered`` is truthy whatever its text ("Centered RMSprop is not
# supported!"). Every key below makes the real run fail, so the estimate refuses it with the reason.
_RMSPROP_STRING = ("transformers passes rmsprop_bnb optim_args to bitsandbytes as strings and the run fails "
                   "(TypeError: '<=' not supported between 'float' and 'str'); leave optim_args out")
_RMSPROP_ARGS = {key: rejected_arg(key, _RMSPROP_STRING) for key in
                 ("alpha", "eps", "weight_decay", "momentum", "min_8bit_size")}
_RMSPROP_ARGS["centered"] = rejected_arg(
    "centered", "transformers passes it to bitsandbytes' RMSprop as a non-empty string, which is truthy, and "
    "bitsandbytes raises 'Centered RMSprop is not supported!'; leave it out")

_PAGED_ADEMAMIX_CPU = ("on CPU, bitsandbytes (0.50) allocates the paged AdEMAMix (2, *shape) state1 of any "
                       "parameter with >= 100000 elements in CUDA managed memory, which fails "
                       "('cget_managed_ptr' not available in CPU-only version); models whose parameters are "
                       "all smaller run on CPU")

SPECS = [
    _spec("adamw_bnb_8bit", "AdamW", _two_state, "adam-8bit", bits=8, paged=False),
    _spec("adamw_8bit", "AdamW", _two_state, "adam-8bit", bits=8, paged=False),
    _spec("paged_adamw_8bit", "AdamW", _two_state, "adam-8bit", bits=8, paged=True),
    _spec("paged_adamw_32bit", "AdamW", _two_state, "adam", bits=32, paged=True),
    _spec("ademamix", "AdEMAMix", _ademamix, "ademamix", bits=32, paged=False, arg_types=_ADEMAMIX_ARGS),
    _spec("ademamix_8bit", "AdEMAMix", _ademamix, "ademamix", bits=8, paged=False, arg_types=_ADEMAMIX_ARGS),
    _spec("paged_ademamix_32bit", "AdEMAMix", _ademamix, "ademamix", bits=32, paged=True, cpu=False,
          cpu_note=_PAGED_ADEMAMIX_CPU, arg_types=_ADEMAMIX_ARGS),
    _spec("paged_ademamix_8bit", "AdEMAMix", _ademamix, "ademamix", bits=8, paged=True, cpu=False,
          cpu_note=_PAGED_ADEMAMIX_CPU, arg_types=_ADEMAMIX_ARGS),
    _spec("lion_8bit", "Lion", _one_state, "lion", bits=8, paged=False),
    _spec("lion_32bit", "Lion", _one_state, "lion", bits=32, paged=False),
    _spec("paged_lion_8bit", "Lion", _one_state, "lion", bits=8, paged=True),
    _spec("paged_lion_32bit", "Lion", _one_state, "lion", bits=32, paged=True),
    _spec("rmsprop_bnb", "RMSprop", _one_state, "rmsprop", bits=32, paged=False, arg_types=_RMSPROP_ARGS),
    _spec("rmsprop_bnb_8bit", "RMSprop", _one_state, "rmsprop", bits=8, paged=False, arg_types=_RMSPROP_ARGS),
    _spec("rmsprop_bnb_32bit", "RMSprop", _one_state, "rmsprop", bits=32, paged=False, arg_types=_RMSPROP_ARGS),
]
