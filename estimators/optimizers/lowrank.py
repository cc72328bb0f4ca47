"""GaLore and APOLLO (low-rank projected states), plain and layer-wise.

Only ``nn.Linear`` weights whose module name matches ``optim_target_modules`` are projected; every other
trainable parameter gets the base optimizer's plain state. For a targeted (m, n) weight the projected
gradient is (m, r) when m >= n, else (r, n), with r capped at min(m, n).
"""
from __future__ import annotations

from .bnb import BLOCK, MIN_8BIT_SIZE, QMAP_BYTES
from .spec import FP32, OptimizerSpec, ParamCtx, blocks
from .torch_builtin import _adafactor

GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
GALORE_ARGS = {"rank": int, "update_proj_gap": int, "scale": float, "proj_type": str}
APOLLO_DEFAULTS = {"rank": 128, "proj": "random", "scale_type": "channel", "update_proj_gap": 200, "scale": 1.0,
                   "proj_type": "std"}
APOLLO_ARGS = {"rank": int, "proj": str, "scale_type": str, "update_proj_gap": int, "scale": float,
               "proj_type": str}


def projected_shape(ctx: ParamCtx) -> tuple[int, int]:
    m, n = ctx.row.shape[0], ctx.row.shape[1]
    r = min(int(ctx.args["rank"]), m, n)
    return (m, r) if m >= n else (r, n)


def _galore_projector(ctx: ParamCtx) -> int:
    """Bytes the GaLore projector keeps alive for one targeted weight.

    fp32 parameters: the projector is a slice (view) of the fp32 SVD factor, keeping the whole
    min(m, n) x min(m, n) storage alive. 16-bit parameters: a cast copy of r x min(m, n).
    """
    m, n = ctx.row.shape[0], ctx.row.shape[1]
    k = min(m, n)
    r = min(int(ctx.args["rank"]), k)
    if ctx.row.dtype == "fp32":
        return k * k * FP32
    return r * k * ctx.s


def _plain_adam(ctx: ParamCtx) -> dict[str, int]:
    return {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s}


def galore_adamw(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return _plain_adam(ctx)
    pm, pn = projected_shape(ctx)
    return {"exp_avg": pm * pn * ctx.s, "exp_avg_sq": pm * pn * ctx.s, "projector": _galore_projector(ctx)}


def _bnb8(n: int, s: int) -> dict[str, int]:
    if n >= MIN_8BIT_SIZE:
        nb = blocks(n, BLOCK) * FP32
        return {"state1": n, "state2": n, "absmax1": nb, "absmax2": nb}
    return {"state1": n * FP32, "state2": n * FP32}


def galore_adamw_8bit(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return _bnb8(ctx.n, ctx.s)
    pm, pn = projected_shape(ctx)
    return {**_bnb8(pm * pn, ctx.s), "projector": _galore_projector(ctx)}


def galore_adafactor(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return _adafactor(ctx)
    pm, pn = projected_shape(ctx)
    return {"exp_avg_sq_row": pm * FP32, "exp_avg_sq_col": pn * FP32, "RMS": FP32,
            "projector": _galore_projector(ctx)}


def apollo_adamw(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return {**_plain_adam(ctx)}
    m, n = ctx.row.shape[0], ctx.row.shape[1]
    pm, pn = projected_shape(ctx)
    r = min(int(ctx.args["rank"]), m, n)
    ortho = (r * n if m >= n else m * r) * ctx.s
    return {"exp_avg": pm * pn * ctx.s, "exp_avg_sq": pm * pn * ctx.s, "projector": ortho}


def _qmaps(inv, args):
    return {"qmap_dynamic": QMAP_BYTES, "qmap_udynamic": QMAP_BYTES}


def _galore(name, cls, state, family, *, layerwise=False, cpu=True, cpu_note="", shared=None):
    return OptimizerSpec(name=name, family=family, cls=f"galore_torch.{cls}", package="galore_torch",
                         pip="galore-torch", defaults=dict(GALORE_DEFAULTS), arg_types=dict(GALORE_ARGS),
                         state=state, shared=shared, runs_on_cpu=cpu, cpu_note=cpu_note,
                         needs_target_modules=True, layerwise=layerwise,
                         state_container="optimizer_dict" if layerwise else "state",
                         description=f"GaLore {cls}{' layer-wise' if layerwise else ''}")


_CUDA_SYNC = "galore_adamw_8bit calls torch.cuda.synchronize() in its step: CUDA only"
_AF_LW = ("galore_adafactor_layerwise always raises inside the Trainer (GaLoreAdafactor's step() requires a "
          "closure-free call with grads the layer-wise hook has not set up)")

SPECS = [
    _galore("galore_adamw", "GaLoreAdamW", galore_adamw, "galore"),
    _galore("galore_adamw_8bit", "GaLoreAdamW8bit", galore_adamw_8bit, "galore", cpu=False, cpu_note=_CUDA_SYNC,
            shared=_qmaps),
    _galore("galore_adafactor", "GaLoreAdafactor", galore_adafactor, "galore"),
    _galore("galore_adamw_layerwise", "GaLoreAdamW", galore_adamw, "galore", layerwise=True),
    _galore("galore_adamw_8bit_layerwise", "GaLoreAdamW8bit", galore_adamw_8bit, "galore", layerwise=True,
            cpu=False, cpu_note=_CUDA_SYNC, shared=_qmaps),
    _galore("galore_adafactor_layerwise", "GaLoreAdafactor", galore_adafactor, "galore", layerwise=True,
            cpu=False, cpu_note=_AF_LW),
    OptimizerSpec(name="apollo_adamw", family="apollo", cls="apollo_torch.APOLLOAdamW", package="apollo_torch",
                  pip="apollo-torch", defaults=dict(APOLLO_DEFAULTS), arg_types=dict(APOLLO_ARGS),
                  state=apollo_adamw, needs_target_modules=True, description="APOLLO AdamW"),
    OptimizerSpec(name="apollo_adamw_layerwise", family="apollo", cls="apollo_torch.APOLLOAdamW",
                  package="apollo_torch", pip="apollo-torch", defaults=dict(APOLLO_DEFAULTS),
                  arg_types=dict(APOLLO_ARGS), state=apollo_adamw, needs_target_modules=True, layerwise=True,
                  state_container="optimizer_dict", description="APOLLO AdamW layer-wise"),
]
