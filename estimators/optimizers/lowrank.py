"""GaLore and APOLLO (low-rank projected states), plain and layer-wise, as the Trainer builds them.

Read from galore-torch 1.0 and apollo-torch 1.0.3 and checked against the real optimizers (see
tests/estimators/test_state_exact_lowrank.py). The Trainer projects only ``nn.Linear`` weights whose module name
matches ``optim_target_modules`` (the parameter-group with ``rank``); every other parameter gets the base
optimizer's plain state. For a targeted (m, n) weight, k = min(m, n):

* Which side is projected (``proj_type``): ``std`` projects from the right (ortho (r, n), low-rank
  gradient (m, r)) when m >= n, else from the left (ortho (m, r), gradient (r, n)); ``reverse_std`` the
  opposite; ``right`` / ``left`` always that side; ``full`` (SVD only) both sides, gradient (r, r).
* GaLore's SVD projector (GaLore, APOLLO ``proj=svd``): r = the number of singular vectors kept, i.e.
  ``len(range(k)[:rank])`` = min(rank, k): a rank above min(m, n) is silently capped. The projector of
  an fp32 gradient is a *view* of the SVD factor (Vh: k x n, or U: m x k), keeping that whole storage
  alive; a 16-bit gradient's projector is a cast copy of just r rows / columns.
* APOLLO's random projector (``proj=random``, the Trainer default): r = rank, NOT capped; a fresh
  Gaussian (r, n) or (m, r) in the gradient dtype; the low-rank moments follow, so a rank above
  min(m, n) makes the moments larger than the weight. APOLLO also keeps ``scaled_grad`` (the 0-dim norm
  of the last scaled gradient, gradient dtype) per targeted weight; ``scale_type`` changes no state.
* GaLoreAdafactor upcasts 16-bit gradients to fp32 *before* projecting: its projector, row and column
  factors are always fp32 (the projector a view of the fp32 SVD factor).
* GaLoreAdamW8bit (bitsandbytes ``Optimizer2State`` with ``percentile_clipping=100`` landing on
  ``max_unorm``): bnb state of the projected shape (8-bit when it has >= 4096 elements) + a 4-byte fp32
  ``unorm_vec`` for every parameter with state + the optimizer's two 1 KiB quantization maps, built in
  ``__init__`` (one pair per optimizer: per parameter in the layer-wise variant).
* Layer-wise: one optimizer per parameter (``model.named_parameters()``, frozen ones too) behind
  ``LayerWiseDummyOptimizer``, whose single parameter ``torch.randn(1, 1)`` (fp32, 4 B, on the CPU) is
  the only tensor the Trainer's own optimizer holds.
"""
from __future__ import annotations

from ..errors import UserError
from .bnb import BLOCK, MIN_8BIT_SIZE, QMAP_BYTES
from .spec import FP32, LAYERWISE_DUMMY_BYTES, OptimizerSpec, ParamCtx, blocks  # noqa: F401 (re-exported)
from .torch_builtin import _adafactor

UNORM_VEC_BYTES = FP32
"""bitsandbytes ``init_state``: ``unorm_vec = torch.zeros((1,))`` when ``max_unorm > 0`` (GaLoreAdamW8bit: 100)."""


def positive_int(value) -> int:
    v = int(value)
    if v < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return v


positive_int.__name__ = "a positive integer"


def _choice(*allowed: str):
    def conv(value) -> str:
        v = str(value)
        if v not in allowed:
            raise ValueError(f"{value!r} is not one of {allowed}")
        return v

    conv.__name__ = "one of " + ", ".join(allowed)
    return conv


GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
GALORE_ARGS = {"rank": positive_int, "update_proj_gap": positive_int, "scale": float,
               "proj_type": _choice(*GALORE_PROJ_TYPES)}
APOLLO_DEFAULTS = {"rank": 128, "proj": "random", "scale_type": "channel", "update_proj_gap": 200, "scale": 1.0,
                   "proj_type": "std"}
APOLLO_ARGS = {"rank": positive_int, "proj": _choice("random", "svd"), "scale_type": _choice("channel", "tensor"),
               "update_proj_gap": positive_int, "scale": float, "proj_type": _choice(*GALORE_PROJ_TYPES)}


def projection_side(m: int, n: int, proj_type: str) -> str:
    """``right``, ``left`` or ``full``: how the projector multiplies an (m, n) gradient."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left", "full"):
        return proj_type
    raise UserError(f"proj_type={proj_type!r} is not one of {', '.join(GALORE_PROJ_TYPES)}")


def svd_rank(m: int, n: int, rank: int) -> int:
    """Singular vectors GaLore's SVD projector keeps: ``U[:, :rank]`` of k = min(m, n) columns."""
    return len(range(min(m, n))[:rank])


def _low_rank_shape(m: int, n: int, r: int, side: str) -> tuple[int, int]:
    if side == "right":
        return m, r
    if side == "left":
        return r, n
    return r, r


def _svd_projector_bytes(m: int, n: int, r: int, side: str, grad_size: int) -> int:
    """Storage the SVD projector keeps alive. fp32 gradient: views of the whole fp32 SVD factors
    (Vh: k x n for the right side, U: m x k for the left). 16-bit: cast copies of r rows / columns."""
    k = min(m, n)
    if grad_size == FP32:
        return {"right": k * n, "left": m * k, "full": m * k + k * n}[side] * FP32
    return {"right": r * n, "left": m * r, "full": m * r + r * n}[side] * grad_size


def galore_projection(ctx: ParamCtx, grad_size: int | None = None,
                      project_back: bool = True) -> tuple[tuple[int, int], int]:
    """(low-rank gradient shape, projector bytes) for a targeted weight under GaLore's SVD projector;
    ``grad_size``: element size of the gradient that is projected (default: the parameter's).
    ``project_back``: the optimizer maps the update back (GaLore; APOLLO does not)."""
    m, n = ctx.row.shape[0], ctx.row.shape[1]
    side = projection_side(m, n, ctx.args["proj_type"])
    r = svd_rank(m, n, int(ctx.args["rank"]))
    if project_back and ctx.args["proj_type"] == "reverse_std" and m < n and r == m:
        # GaLoreProjector.project_back('reverse_std') picks ortho @ low when low.shape[0] <= low.shape[1]:
        # (r, n) @ (m, r) with r == m < n is a shape error at the first step.
        raise UserError(f"proj_type=reverse_std fails in GaLore's project_back for {ctx.row.name} {m}x{n} "
                        f"when rank >= {m} (shape error at the first step); use rank < {m} or proj_type=std")
    gs = ctx.s if grad_size is None else grad_size
    return _low_rank_shape(m, n, r, side), _svd_projector_bytes(m, n, r, side, gs)


def projected_shape(ctx: ParamCtx) -> tuple[int, int]:
    """The low-rank gradient (and moment) shape of a targeted weight under GaLore's SVD projector."""
    return galore_projection(ctx)[0]


def _plain_adam(ctx: ParamCtx) -> dict[str, int]:
    return {"exp_avg": ctx.n * ctx.s, "exp_avg_sq": ctx.n * ctx.s}


def galore_adamw(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return _plain_adam(ctx)
    (pm, pn), proj = galore_projection(ctx)
    return {"exp_avg": pm * pn * ctx.s, "exp_avg_sq": pm * pn * ctx.s, "projector": proj}


def _bnb8(n: int) -> dict[str, int]:
    """bitsandbytes 2-state blockwise state of an n-element tensor (+ the 4-byte ``unorm_vec``)."""
    if n >= MIN_8BIT_SIZE:
        nb = blocks(n, BLOCK) * FP32
        out = {"state1": n, "state2": n, "absmax1": nb, "absmax2": nb}
    else:
        out = {"state1": n * FP32, "state2": n * FP32}
    out["unorm_vec"] = UNORM_VEC_BYTES
    return out


def galore_adamw_8bit(ctx: ParamCtx) -> dict[str, int]:
    # GaLoreAdamW8bit swaps p.data for a tensor of the projected shape before bnb's init_state, so the
    # 8-bit threshold and the block count are those of the projected gradient.
    if not ctx.targeted:
        return _bnb8(ctx.n)
    (pm, pn), proj = galore_projection(ctx)
    return {**_bnb8(pm * pn), "projector": proj}


def galore_adafactor(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return _adafactor(ctx)
    (pm, pn), proj = galore_projection(ctx, grad_size=FP32)
    return {"exp_avg_sq_row": pm * FP32, "exp_avg_sq_col": pn * FP32, "RMS": FP32, "projector": proj}


def apollo_adamw(ctx: ParamCtx) -> dict[str, int]:
    if not ctx.targeted:
        return _plain_adam(ctx)
    m, n = ctx.row.shape[0], ctx.row.shape[1]
    if ctx.args["proj"] == "svd":
        (pm, pn), proj = galore_projection(ctx, project_back=False)
    else:
        side = projection_side(m, n, ctx.args["proj_type"])
        if side == "full":
            raise UserError("APOLLO's random projector does not implement proj_type=full (NotImplementedError "
                            "at the first step); use proj=svd or another proj_type")
        r = int(ctx.args["rank"])
        pm, pn = _low_rank_shape(m, n, r, side)
        proj = (r * n if side == "right" else m * r) * ctx.s
    if ctx.args["scale_type"] == "channel":
        # grad_scaling_factor = norm(low-rank update, dim=d) / norm(low-rank grad, dim=d) with d = 1 when
        # m >= n, else 0, multiplied into the full (m, n) gradient: the kept dimension must be m (d = 1)
        # or n (d = 0), or 1. Only the std side always satisfies that.
        kept = pm if m >= n else pn
        if kept not in ((m if m >= n else n), 1):
            raise UserError(f"APOLLO scale_type=channel with proj_type={ctx.args['proj_type']} fails for "
                            f"{ctx.row.name} {m}x{n} (shape error at the first step); use proj_type=std or "
                            "scale_type=tensor")
    return {"exp_avg": pm * pn * ctx.s, "exp_avg_sq": pm * pn * ctx.s, "projector": proj, "scaled_grad": ctx.s}


def _qmaps(inv, args):
    """The two quantization maps every GaLoreAdamW8bit builds in ``__init__`` (one pair per optimizer)."""
    return {"qmap_dynamic": QMAP_BYTES, "qmap_udynamic": QMAP_BYTES}


def _galore(name, cls, state, family, *, layerwise=False, cpu=True, cpu_note="", shared=None, availability="ok",
            reason=""):
    return OptimizerSpec(name=name, family=family, cls=f"galore_torch.{cls}", package="galore_torch",
                         pip="galore-torch", defaults=dict(GALORE_DEFAULTS), arg_types=dict(GALORE_ARGS),
                         state=state, shared=shared, runs_on_cpu=cpu, cpu_note=cpu_note,
                         needs_target_modules=True, layerwise=layerwise, availability=availability, reason=reason,
                         state_container="optimizer_dict" if layerwise else "state",
                         description=f"GaLore {cls}{' layer-wise' if layerwise else ''}")


_CUDA_SYNC = ("GaLoreAdamW8bit.step() calls torch.cuda.synchronize() after every parameter: CUDA only "
              "(the same code runs on CPU once that call is a no-op)")
_AF_LW = ("galore_adafactor_layerwise cannot run in the Trainer on any device: transformers passes "
          "scale_parameter=False/relative_step=False only for galore_adafactor, so each per-parameter "
          "GaLoreAdafactor of the layer-wise variant is built with lr and relative_step=True and raises "
          "'Cannot combine manual `lr` and `relative_step=True` options'; use galore_adafactor")

SPECS = [
    _galore("galore_adamw", "GaLoreAdamW", galore_adamw, "galore"),
    _galore("galore_adamw_8bit", "GaLoreAdamW8bit", galore_adamw_8bit, "galore", cpu=False, cpu_note=_CUDA_SYNC,
            shared=_qmaps),
    _galore("galore_adafactor", "GaLoreAdafactor", galore_adafactor, "galore"),
    _galore("galore_adamw_layerwise", "GaLoreAdamW", galore_adamw, "galore", layerwise=True),
    _galore("galore_adamw_8bit_layerwise", "GaLoreAdamW8bit", galore_adamw_8bit, "galore", layerwise=True,
            cpu=False, cpu_note=_CUDA_SYNC, shared=_qmaps),
    _galore("galore_adafactor_layerwise", "GaLoreAdafactor", galore_adafactor, "galore", layerwise=True,
            cpu=False, availability="unsupported", reason=_AF_LW),
    OptimizerSpec(name="apollo_adamw", family="apollo", cls="apollo_torch.APOLLOAdamW", package="apollo_torch",
                  pip="apollo-torch", defaults=dict(APOLLO_DEFAULTS), arg_types=dict(APOLLO_ARGS),
                  state=apollo_adamw, needs_target_modules=True, description="APOLLO AdamW"),
    OptimizerSpec(name="apollo_adamw_layerwise", family="apollo", cls="apollo_torch.APOLLOAdamW",
                  package="apollo_torch", pip="apollo-torch", defaults=dict(APOLLO_DEFAULTS),
                  arg_types=dict(APOLLO_ARGS), state=apollo_adamw, needs_target_modules=True, layerwise=True,
                  state_container="optimizer_dict", description="APOLLO AdamW layer-wise"),
]
