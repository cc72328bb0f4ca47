"""Optimizer-step programs: what each optimizer allocates while it steps, parameter by parameter.

The persistent state of every optimizer is already exact (``estimators/optimizers/``: one formula per
parameter). This module adds *when* that state appears and what the step allocates *besides* it, read from
each package's ``step()``:

* torch's single-tensor loops (what ``foreach=None`` picks on CPU) keep one or two parameter-sized
  temporaries per parameter, the previous parameter's result alive until the next one replaces it
  (``denom`` in Adam: ``sqrt`` + ``div``; ``std`` in Adagrad; ``avg`` in RMSprop); their ``foreach``
  versions (what CUDA picks) allocate one temporary per parameter of the whole group at once; fused
  kernels allocate none;
* transformers' Adafactor squares the gradient (two full-size fp32 tensors), builds the factored update
  (one more) and negates it; 16-bit parameters and gradients are upcast to fp32 copies first;
* GaLore / APOLLO project the gradient (a low-rank tensor), run Adam on it and project back (two full-size
  tensors); GaLore's projector comes from an SVD of the gradient at step 0 (and every ``update_proj_gap``
  steps), APOLLO's from a seeded Gaussian; APOLLO also scales the full gradient;
* GrokAdamW builds ``grad + lamb * grok_ema`` (two full-size tensors) and ``sqrt`` per parameter, with its
  state copied to the device and back around every update when training on an accelerator;
* schedule-free AdamW divides the whole group's second moments at once (``_foreach_div``);
* bitsandbytes' kernels, fused AdamW and SGD allocate nothing visible;
* LOMO updates inside the backward (each gradient is consumed when the next one arrives: at most one
  gradient exists), layer-wise variants step each parameter's own optimizer from a post-accumulate-grad
  hook (state and temporaries appear during the backward, gradients are freed at once).

Every program works on :class:`~optimem.estimators.memsim.Sim` storages, so its transients are measured against
the same live bytes as activations and gradients. All sizes are bytes.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .memsim import Sim, St, vec
from .optimizers import OptimizerSpec, ParamCtx
from .optimizers.lowrank import projection_side

FP32 = 4
_DECAY_FORBIDDEN = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                            r"_norm(?:$|\.)")]


@dataclass(frozen=True)
class PRow:
    """One parameter as an optimizer sees it: name, shape, element size, its state tensors (name ->
    bytes, in creation order), whether it is projected (GaLore/APOLLO)."""

    name: str
    shape: tuple[int, ...]
    es: int
    state: tuple[tuple[str, int], ...]
    targeted: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.es

    @property
    def n32(self) -> int:
        """Bytes of an fp32 tensor of this shape."""
        return self.numel * FP32


def decays(row) -> bool:
    """``Trainer.get_decay_parameter_names``: not in an ``nn.LayerNorm`` (or a subclass), no bias/norm in the
    name."""
    if row.module_class == "LayerNorm" or getattr(row, "layer_norm", False):
        return False
    return not any(p.search(row.name.lower()) for p in _DECAY_FORBIDDEN)


@dataclass
class Frame:
    """The Python locals of an optimizer's step loop: assigning a name frees what it held (after the new
    value exists); ``release`` rebinds it to something not owned (``grad = p.grad``)."""

    sim: Sim
    vars: dict = field(default_factory=dict)

    def new(self, nbytes: int) -> St:
        return self.sim.alloc(vec(nbytes), "tmp")

    def set(self, name: str, st: St | None) -> None:
        old = self.vars.get(name)
        self.vars[name] = st
        if old is not None:
            self.sim.decref(old)

    def release(self, name: str) -> None:
        self.set(name, None)

    def tmp(self, *sizes: int) -> None:
        sts = [self.new(s) for s in sizes]
        for st in reversed(sts):
            self.sim.decref(st)

    def clear(self) -> None:
        for name in list(self.vars):
            self.set(name, None)

    def __enter__(self) -> Frame:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()  # the loop's locals go when the function returns


class StateStore:
    """Optimizer state storages, created once (kept between steps)."""

    def __init__(self, keep: dict):
        self.keep = keep

    def init(self, sim: Sim, row: PRow, keys=None) -> None:
        have = self.keep.setdefault(row.name, {})
        for key, nbytes in row.state:
            if (keys is None or key in keys) and key not in have and nbytes:
                have[key] = sim.alloc(vec(nbytes), "state")

    def has(self, row: PRow, key: str) -> bool:
        return key in self.keep.get(row.name, {})


# ------------------------------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class StepModel:
    """How one optimizer steps: ``groups`` (lists of :class:`PRow` in the order the optimizer visits
    them), the per-group program, and what the Trainer does around it."""

    groups: tuple[tuple[PRow, ...], ...]
    run: Callable
    state_at_init: int = 0
    grad_mode: str = "full"  # full | layerwise | fused
    note: str = ""


def _with_grad(sim: Sim, rows):
    for r in rows:
        p = sim.params.get(r.name)
        if p is not None and p.grad is not None:
            yield r


def each_group(sim: Sim, groups, keep: dict, *, init: bool = True):
    """The prologue every step program shares: per parameter group, ``(store, rows)`` -- the optimizer's
    state store (kept between steps) and the group's parameters that have a gradient, in the optimizer's
    order, with their state created first when ``init`` (torch's ``_init_group``; programs that create
    state parameter by parameter as they go pass ``init=False`` and use the store)."""
    store = StateStore(keep)
    for rows in groups:
        rows = list(_with_grad(sim, rows))
        if init:
            for r in rows:
                store.init(sim, r)
        yield store, rows


def adam_single(sim: Sim, groups, first: bool, keep: dict) -> None:
    """``torch.optim.AdamW`` / ``Adam`` with ``foreach=False`` (CPU's default): ``_init_group`` creates a
    group's state, then per parameter ``denom = (exp_avg_sq.sqrt() / bc2).add_(eps)`` -- the ``sqrt`` and
    the ``div`` exist together, the previous ``denom`` until the new one does."""
    for _, rows in each_group(sim, groups, keep):
        with Frame(sim) as f:
            for r in rows:
                s = f.new(r.nbytes)
                d = f.new(r.nbytes)
                sim.decref(s)
                f.set("denom", d)


def foreach_group(n_lists: int = 1, init: bool = True):
    """A ``foreach`` implementation (what torch picks on CUDA): per group, ``n_lists`` lists of
    parameter-sized temporaries (``torch._foreach_sqrt(exp_avg_sqs)``...), freed when the group is done."""

    def run(sim: Sim, groups, first: bool, keep: dict) -> None:
        for _, rows in each_group(sim, groups, keep, init=init):
            lists = [[sim.alloc(vec(r.nbytes), "tmp") for r in rows] for _ in range(n_lists)]
            for lst in reversed(lists):
                for st in reversed(lst):
                    sim.decref(st)

    return run


def no_temporaries(lazy_per_param: bool = True):
    """Kernels that update in place (fused AdamW, bitsandbytes, SGD): only the state appears."""

    def run(sim: Sim, groups, first: bool, keep: dict) -> None:
        for _ in each_group(sim, groups, keep):
            pass

    return run


def one_temp_single(sim: Sim, groups, first: bool, keep: dict) -> None:
    """Adagrad's ``std = state_sum.sqrt().add_(eps)`` / RMSprop's ``avg = square_avg.sqrt().add_(eps)``:
    one parameter-sized temporary, the previous one alive until the next exists."""
    for _, rows in each_group(sim, groups, keep):
        with Frame(sim) as f:
            for r in rows:
                f.set("t", f.new(r.nbytes))


def adafactor(sim: Sim, groups, first: bool, keep: dict) -> None:
    """transformers' ``Adafactor.step`` (see the module docstring)."""
    f = Frame(sim)
    for store, rows in each_group(sim, groups, keep, init=False):
        for r in rows:
            low = r.es != FP32
            f.release("grad")
            if low:
                f.set("grad", f.new(r.n32))
            store.init(sim, r)
            f.release("p32")
            if low:
                f.set("p32", f.new(r.n32))
            n = r.n32
            pw = f.new(n)
            upd = f.new(n)
            sim.decref(pw)
            f.set("update", upd)
            if len(r.shape) >= 2:
                # update.mean(dim=-1) / mean(dim=-2): shape[:-1] and shape[:-2] + shape[-1:] (a 3-D expert weight's
                # columns are per expert)
                rows_, cols = math.prod(r.shape[:-1]) * FP32, math.prod(r.shape[:-2]) * r.shape[-1] * FP32
                f.tmp(rows_)
                f.tmp(cols)
                rr = f.new(rows_)
                cc = f.new(cols)
                u2 = f.new(n)
                sim.decref(rr)
                sim.decref(cc)
                f.set("update", u2)
            else:
                f.set("update", f.new(n))
            f.tmp(n)  # p_data_fp32.add_(-update)
    f.clear()


def grokadamw(device: str):
    def run(sim: Sim, groups, first: bool, keep: dict) -> None:
        """``GrokAdamW._update_group``: state created per parameter (on the host); on an accelerator the
        three state tensors are copied to the device and back every step; ``grok_grad = grad + lamb *
        grok_ema`` (two tensors, the product freed), ``exp_avg_sq.sqrt()`` (freed after ``addcdiv_``)."""
        for store, rows in each_group(sim, groups, keep, init=False):
            with Frame(sim) as f:
                for r in rows:
                    store.init(sim, r)
                    copies = [f.new(r.nbytes) for _ in range(3)] if device != "cpu" else []
                    m = f.new(r.nbytes)
                    a = f.new(r.nbytes)
                    sim.decref(m)
                    f.set("grok_grad", a)
                    f.tmp(r.nbytes)
                    for c in copies:
                        sim.decref(c)

    return run


def schedule_free(sim: Sim, groups, first: bool, keep: dict) -> None:
    """``AdamWScheduleFree.step`` (foreach): per group, state (``z`` clone, ``exp_avg_sq``) for the group's
    parameters, then ``denom = torch._foreach_div(exp_avg_sq, bc2)``: one temporary per parameter of the
    group, the previous group's list alive until the next one exists."""
    prev: list = []
    for _, rows in each_group(sim, groups, keep):
        cur = [sim.alloc(vec(r.nbytes), "tmp") for r in rows]
        for st in reversed(prev):
            sim.decref(st)
        prev = cur
    for st in reversed(prev):
        sim.decref(st)


def _proj_dims(r: PRow, rank: int, side: str, capped: bool) -> tuple[int, int]:
    """(low-rank gradient elements, projector elements) of a projected (m, n) weight."""
    m, n = r.shape[0], r.shape[1]
    k = min(m, n)
    rr = min(rank, k) if capped else rank
    if side == "right":
        return m * rr, rr * n
    if side == "left":
        return rr * n, m * rr
    return rr * rr, m * rr + rr * n


def lowrank(kind: str, args: dict):
    """GaLore (``kind="galore"``, SVD projector, rank capped at min(m, n)) and APOLLO (``"apollo"``,
    seeded Gaussian projector, rank not capped) AdamW: see the module docstring."""
    rank = int(args.get("rank", 128))
    proj_type = str(args.get("proj_type", "std"))

    def run(sim: Sim, groups, first: bool, keep: dict) -> None:
        f = Frame(sim)
        for store, rows in each_group(sim, groups, keep, init=False):
            for r in rows:
                f.release("grad")
                targeted = r.targeted and len(r.shape) == 2
                es = r.es
                if targeted:
                    m, n = r.shape
                    side = projection_side(m, n, proj_type)
                    lg, pe = _proj_dims(r, rank, side, capped=kind == "galore")
                    if not store.has(r, "projector"):
                        if kind == "galore":
                            _galore_svd(sim, f, r, rank, side, store)
                        else:
                            f.tmp(pe * es)  # randn, then / sqrt(rank)
                            store.init(sim, r, keys=("projector",))
                    f.set("grad", f.new(lg * es))
                    store.init(sim, r, keys=("exp_avg", "exp_avg_sq", "scaled_grad"))
                    d = lg * es
                else:
                    store.init(sim, r)
                    d = r.nbytes
                f.set("denom", f.new(d))
                f.set("norm_grad", f.new(d))
                if targeted:
                    if kind == "galore":
                        full = f.new(r.nbytes)
                        scaled = f.new(r.nbytes)
                        sim.decref(full)
                        f.set("norm_grad", scaled)
                    else:
                        m, n = r.shape
                        vlen = (n if m < n else m) * es
                        f.tmp(vlen, vlen)
                        f.set("factor", f.new(vlen))
                        # scaled_grad = p.grad * factor: the previous parameter's scaled gradient is held
                        # by both `scaled_grad` and `norm_grad` until this assignment
                        f.set("scaled_grad", f.new(r.nbytes))
                        if not first:  # scaled_grad = scaled_grad / limiter
                            f.set("scaled_grad", f.new(r.nbytes))
                        sc = f.vars["scaled_grad"]
                        sim.incref(sc)
                        f.set("norm_grad", sc)
        f.clear()

    return run


def _galore_svd(sim: Sim, f: Frame, r: PRow, rank: int, side: str, store: StateStore) -> None:
    """``GaLoreProjector.get_orthogonal_matrix``: ``torch.linalg.svd`` of the (fp32) gradient (U, S, Vh),
    the scaled factor it builds and drops; the projector (a view of Vh or U for fp32) is kept."""
    m, n = r.shape
    k = min(m, n)
    rr = min(rank, k)
    f32 = r.es != FP32
    mat = f.new(r.n32) if f32 else None
    u = f.new(m * k * FP32)
    s = f.new(k * FP32)
    vh = f.new(k * n * FP32)
    diag = f.new(rr * rr * FP32)
    prod = f.new((m * rr if side == "right" else rr * n) * FP32)
    sim.decref(diag)
    store.init(sim, r, keys=("projector",)) if f32 else None
    sim.decref(prod)
    sim.decref(s)
    if f32:
        sim.decref(u)
        sim.decref(vh)
        sim.decref(mat)
    else:
        # the projector is a view of Vh (right) or U (left): that storage becomes the state
        keep, drop = (vh, u) if side == "right" else (u, vh)
        sim.decref(drop)
        sim.recat(keep, "state")
        store.keep.setdefault(r.name, {})["projector"] = keep


# ------------------------------------------------------------------------------------------------- building
def rows_for(inv, spec: OptimizerSpec, args: dict, targeted: frozenset, device: str = "cpu",
             at_init: bool = False) -> list[PRow]:
    """The trainable parameters with the state each gets on the training device (state kept on the host
    -- GrokAdamW's, torch's non-fused ``step`` counters -- is left out when the device is not the CPU;
    all of it when the optimizer creates it in ``__init__``, ``at_init``)."""
    out = []
    host_all = device != "cpu" and spec.state_location == "host"
    for row in inv.rows:
        if not row.trainable:
            continue
        st = spec.param_state(ParamCtx(row, args, row.name in targeted))
        if host_all or at_init:
            st = {}
        elif device != "cpu":
            st = {k: v for k, v in st.items() if k not in spec.host_keys}
        out.append(PRow(row.name, row.shape, row.element_size, tuple(st.items()), row.name in targeted))
    return out


STATE_AT_INIT = frozenset({"adagrad"})
"""Optimizers that create their per-parameter state in ``__init__`` (torch's Adagrad)."""


def build(spec: OptimizerSpec, args: dict, inv, targeted: frozenset, device: str = "cpu",
          shared_at_init: int = 0) -> StepModel:
    """The :class:`StepModel` of ``spec`` for inventory ``inv`` (dtype and frozen flags applied).
    ``shared_at_init``: state bytes the optimizer builds in ``__init__`` (bitsandbytes' quantization maps,
    the layer-wise dummy)."""
    at_init = spec.name in STATE_AT_INIT
    rows = rows_for(inv, spec, args, targeted, device, at_init)
    by_name = {r.name: r for r in rows}
    decay = [by_name[r.name] for r in inv.rows if r.trainable and decays(r)]
    nodecay = [by_name[r.name] for r in inv.rows if r.trainable and not decays(r)]
    trainer_groups = (tuple(decay), tuple(nodecay))
    name = spec.name
    fam = spec.family
    cuda = device != "cpu"
    if spec.needs_target_modules:
        groups = (tuple(r for r in rows if not r.targeted), tuple(r for r in rows if r.targeted))
    else:
        groups = trainer_groups
    if spec.layerwise:
        groups = tuple((r,) for r in rows)
    init = shared_at_init
    if at_init:
        full = rows_for(inv, spec, args, targeted, device)
        init += sum(n for r in full for _, n in r.state)
    if name == "lomo" or name == "adalomo":
        return StepModel(groups, no_temporaries(), init, grad_mode="fused")
    if spec.needs_target_modules:
        kind = "apollo" if fam == "apollo" else "galore"
        if "adafactor" in name or "8bit" in name:
            run = adafactor if "adafactor" in name else no_temporaries()
        else:
            run = lowrank(kind, args)
        return StepModel(groups, run, init, grad_mode="layerwise" if spec.layerwise else "full")
    if name in ("adamw_torch", "adamw_torch_fused"):
        fused = name.endswith("fused")
        run = no_temporaries() if fused else (foreach_group(1) if cuda else adam_single)
        return StepModel(groups, run, init)
    if name == "sgd":
        return StepModel(groups, no_temporaries(), init)
    if name in ("adagrad", "rmsprop"):
        return StepModel(groups, foreach_group(1) if cuda else one_temp_single, init)
    if name == "adafactor":
        return StepModel(groups, adafactor, init)
    if name == "grokadamw":
        return StepModel(groups, grokadamw(device), init)
    if name.startswith("schedule_free"):
        return StepModel(groups, schedule_free, init)
    if spec.package == "bitsandbytes":
        return StepModel(groups, no_temporaries(), init)
    if name == "stable_adamw":
        return StepModel(groups, adam_single if not cuda else foreach_group(1), init,
                         note="StableAdamW's step temporaries are modelled like torch AdamW's (not validated)")
    return StepModel(groups, no_temporaries(), init,
                     note=f"{name}: step temporaries are not modelled (state only); torch.compile'd steps "
                          "(torchao) and Triton kernels (FlashOptim) allocate outside the tensor accountant's view")


__all__ = ["PRow", "StepModel", "build", "decays", "rows_for"]
