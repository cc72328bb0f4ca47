"""The phase model: one ``Trainer`` optimizer step, phase by phase, on the simulator.

Phases are the harness's (``harness/trackers/phases.py``): ``step0.forward`` / ``step0.backward`` /
``step0.optimizer_step`` (the first step: optimizers that create their state lazily have none before its
``optimizer.step()``), then ``steady.*`` (every later step). A forward phase runs from the end of the
previous step (so the batch fetch is in it) to the model's forward returning; backward runs to
``on_pre_optimizer_step`` (gradient clipping included); the optimizer step includes the scheduler and
``zero_grad``. With gradient accumulation, a step's forwards and backwards alternate and fold into the
step's two phases.

What lives across phases (the *persistent* bytes): parameters and buffers, gradients between backward and
``zero_grad`` (and across accumulation micro-steps), optimizer state once created, the Trainer's loss
accumulator, the fetched batches (the dataloader prefetches one batch ahead). Each phase adds its
transients: the forward's saved activations and the loss's buffers, the backward's gradient buffers (and
recomputation under checkpointing), the optimizer step's temporaries.

Two simulations make one estimate, both cached: the forward/backward of the model -- the replay of its
traced micro-steps (``estimators/trace``), independent of the optimizer unless it updates inside the backward
(LOMO, layer-wise) -- and the optimizer step on top of the backward's end state. Optimizer state that exists
in a forward or backward is a constant added to it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import grad_scaler
from .memsim import CATS, NB, Param, PhaseResult, Sim, Var, vadd, vec, veval, vsub
from .steps import Frame, StepModel
from .trace.events import BWD_END, FWD_END
from .trace.replay import replay

I64 = 8

PHASES = ("step0.forward", "step0.backward", "step0.optimizer_step", "steady.forward", "steady.backward",
          "steady.optimizer_step")


@dataclass(frozen=True)
class Run:
    """Everything about the run that shapes the forward and backward except the batch shape and the
    optimizer (for ``grad_mode="full"``).

    ``first`` / ``accum``: the traced micro-step logs (``estimators/trace``) with no gradients yet and with
    gradients already accumulated (None when ``grad_accum`` is 1); ``params``: parameter names in the trace's
    order, ``param_bytes`` / ``param_es``: their bytes and element sizes, ``trainable``: which get gradients;
    ``weights_bytes`` / ``buffers_bytes``: the model as stored; ``other_bytes``: long-lived odds and ends (the
    Trainer's loss accumulator, 4 B); ``label_shape``: ``"BS"`` or ``"B"`` (one label per sample);
    ``counts_items``: the Trainer counts label tokens (``num_items_in_batch``), from position 1 when
    ``shifts_labels``; ``amp_scaler``: fp16 on CUDA, the step runs ``GradScaler`` (``estimators/grad_scaler``).
    """

    first: object
    accum: object
    params: tuple[str, ...]
    param_bytes: tuple[int, ...]
    param_es: tuple[int, ...]
    trainable: tuple[bool, ...]
    weights_bytes: int
    buffers_bytes: int
    grad_accum: int = 1
    other_bytes: int = 4
    label_shape: str = "BS"
    counts_items: bool = True
    shifts_labels: bool = True
    amp_scaler: bool = False
    batch_layout: tuple = ()
    """image-text-to-text: the batch's keys as ``(key, bytes per sample, bytes per text token)``; empty: text."""


def _fetch_batch(sim: Sim, label_shape: str = "BS", layout: tuple = ()) -> list[Var]:
    """``default_data_collator`` over ``B`` samples of the harness's synthetic dataset (``input_ids``, a view
    of its token table; ``attention_mask``, ``ones_like``; ``labels``, a ``clone`` of the ids, or a view of the
    label table for one label per sample): the per-sample tensors (``S`` int64 each), the stacked ``(B, S)``
    int64 tensors (``(B,)`` labels), then the per-sample tensors go. With a ``layout`` (image-text-to-text: the
    samples are stored tensors, :mod:`optimem.estimators.trace.images`), just each key's concatenation."""
    if layout:
        return [sim.const(vec(b=per, bs=per_token)) for _, per, per_token in layout]
    per = 2 * I64 if label_shape == "BS" else I64
    per_sample = sim.alloc(vec(bs=per), "act")
    batch = [sim.const(vec(bs=I64)), sim.const(vec(bs=I64)),
             sim.const(vec(bs=I64) if label_shape == "BS" else vec(b=I64))]
    sim.decref(per_sample)
    return batch


def _num_items(sim: Sim, run: Run) -> None:
    """``(labels[..., 1:] != -100).sum()`` over the step's batches: a bool mask and int64 sums."""
    if not run.counts_items:
        return
    labels = [(per, tok) for k, per, tok in run.batch_layout if k == "labels"]
    if labels:  # (B, image tokens + S) int64 labels: a bool mask of its elements (less one per row if shifted)
        per, tok = labels[0][0] // I64, labels[0][1] // I64
        sim.tmp(vec(b=per - (1 if run.shifts_labels else 0), bs=tok))
    elif run.label_shape == "B":
        sim.tmp(vec(b=1))
    else:
        sim.tmp(vec(bs=1, b=-1) if run.shifts_labels else vec(bs=1))


def simulate(run: Run, step: StepModel | None = None, device: str = "cpu", sim: Sim | None = None,
             both_steps: bool = False) -> dict[str, PhaseResult]:
    """Simulate step 0 and one steady step. With ``step`` None the optimizer is left out (its state and
    step are added by :func:`simulate_step`); with a LOMO / layer-wise ``step`` the optimizer runs inside
    the backward. Returns ``{phase: PhaseResult}`` for the forward and backward phases (and the optimizer
    phases when ``step`` is given), plus ``forward_end`` (live bytes at the end of step 0's last forward).
    ``sim``: the simulator to run on (a fresh :class:`Sim` by default; one with ``per_parameter`` set gets each
    parameter as its own storage); ``both_steps``: simulate the steady step too, not only step 0."""
    sim = sim if sim is not None else Sim()
    sim.phase("setup")
    if getattr(sim, "per_parameter", False):  # model.to(device): one storage per parameter
        for nbytes in run.param_bytes:
            sim.alloc(vec(nbytes), "weights")
        if run.weights_bytes > sum(run.param_bytes):
            sim.alloc(vec(run.weights_bytes - sum(run.param_bytes)), "weights")
    else:
        sim.alloc(vec(run.weights_bytes), "weights")
    if run.buffers_bytes:
        sim.alloc(vec(run.buffers_bytes), "weights")
    sim.alloc(vec(run.other_bytes), "other")
    params: list[Param | None] = []
    for name, nbytes, es, tr in zip(run.params, run.param_bytes, run.param_es, run.trainable):
        if tr:
            sim.param(name, nbytes, True, es)
            params.append(sim.params[name])
        else:
            params.append(None)
    keep: dict = {}
    merged: dict[str, list] = {}
    mode = step.grad_mode if step is not None else "full"
    if step is not None and mode == "layerwise":
        by_name = {g[0].name: g for g in step.groups}

        def layerwise_hook(s: Sim, p) -> None:
            group = by_name.get(p.name)
            if group is None or p.grad is None:
                return
            step.run(s, (group,), group[0].name not in keep, keep)
            s.decref(p.grad)
            p.grad = None

        sim.hooks["post_accumulate"] = layerwise_hook
    elif step is not None and mode == "fused":
        def lomo_hook(s: Sim, p) -> None:
            # LOMO's tensor hook runs before this gradient is accumulated: every gradient already there is
            # consumed (upcast to fp32 when 16-bit, the parameter too) and dropped.
            _lomo_consume(s, exclude=p)

        sim.hooks["pre_accumulate"] = lomo_hook

    def close(name):
        sim.phase(None)
        res = sim.results.pop(name)
        if name in merged:
            merged[name][0].extend(res.candidates)
            merged[name][1] = res.end
        else:
            merged[name] = [list(res.candidates), res.end]

    forward_end = None
    scaler: list = []  # GradScaler's _scale and _growth_tracker, once created
    use_scaler = run.amp_scaler and mode == "full"
    scaled = found_inf = None
    batches: list[list] = []
    prefetched: list = []
    # step 0 stands for the steady step too, unless something created in step 0 outlives it (GradScaler's tensors)
    once = (step is None or mode == "full") and not both_steps and not use_scaler
    steps_ = ("step0",) if once else ("step0", "steady")
    for stepname in steps_:
        for micro in range(run.grad_accum):
            sim.phase(f"{stepname}.forward")
            if micro == 0:
                if stepname == "step0":
                    batches = [_fetch_batch(sim, run.label_shape, run.batch_layout) for _ in range(run.grad_accum)]
                else:
                    for b in batches:
                        sim.drop(*b)
                    batches = [prefetched] + [_fetch_batch(sim, run.label_shape, run.batch_layout) for _ in range(run.grad_accum - 1)]
                prefetched = _fetch_batch(sim, run.label_shape, run.batch_layout)
                _num_items(sim, run)
            log = run.accum if micro > 0 and mode == "full" and run.accum is not None else run.first
            last = stepname == "step0" and micro == run.grad_accum - 1

            def on_mark(code: int, arg: int, _name=stepname, _last=last) -> None:
                nonlocal forward_end, scaled
                if code == FWD_END:
                    if _last:
                        forward_end = sim._snap()
                    close(f"{_name}.forward")
                    sim.phase(f"{_name}.backward")
                    if use_scaler:
                        scaled = grad_scaler.scale_loss(sim, scaler)
                elif code == BWD_END and mode == "fused":
                    _lomo_consume(sim, exclude=None)  # fused_backward's final grad_func(0)

            replay(sim, log, params, on_mark)
            if use_scaler:
                sim.decref(scaled)  # backward() returned
                scaled = None
                if micro == run.grad_accum - 1:  # the Trainer's clip: Accelerator.clip_grad_norm_ -> unscale_
                    found_inf = grad_scaler.unscale(sim)
            close(f"{stepname}.backward")
        sim.phase(f"{stepname}.optimizer_step")
        if step is not None and mode == "full":
            step.run(sim, step.groups, stepname == "step0", keep)
        if found_inf is not None:  # scaler.update resets the per-optimizer state
            sim.decref(found_inf)
            found_inf = None
        sim.zero_grad()
        close(f"{stepname}.optimizer_step")
    if once:  # the steady forward and backward are step 0's
        for kind in ("forward", "backward"):
            merged[f"steady.{kind}"] = merged[f"step0.{kind}"]
    out = {name: PhaseResult(c, end) for name, (c, end) in merged.items()}
    out["forward_end"] = PhaseResult([forward_end], forward_end)
    return out


def _lomo_consume(sim: Sim, exclude) -> None:
    """LOMO's ``grad_func``: every gradient present is upcast to fp32 (a copy when 16-bit; the parameter
    too), applied, and dropped."""
    f = Frame(sim)
    for p in list(sim.params.values()):
        if p is exclude or p.grad is None:
            continue
        if p.es != 4:
            n32 = p.size[0] // p.es * 4
            g = f.new(n32)
            sim.decref(p.grad)
            p.grad = None
            f.tmp(n32)
            sim.decref(g)
        else:
            sim.decref(p.grad)
            p.grad = None


def simulate_step(step: StepModel, grads: dict[str, int], base0: tuple, base1: tuple) -> dict[str, PhaseResult]:
    """The optimizer-step phases of a ``grad_mode="full"`` optimizer: on top of ``base0`` / ``base1`` (the
    live bytes at the end of step 0's / a steady backward, gradients excluded, as ``(total, per-category)``)
    the gradients (``grads``: name -> bytes), the state created lazily at step 0 (kept for the steady step)
    and the step's temporaries, then ``zero_grad``."""
    sim = Sim()
    keep: dict = {}
    base_sts: list = []
    for name, base, first in (("step0.optimizer_step", base0, True), ("steady.optimizer_step", base1, False)):
        for stg in base_sts:
            sim.decref(stg)
        base_sts = [sim.alloc(v, c) for c, v in zip(CATS, base[1]) if any(v)]
        for pname, nbytes in grads.items():
            p = sim.params.get(pname) or sim.params.setdefault(pname, Param(pname, nbytes))
            p.grad = sim.alloc(vec(nbytes), "grad")
        sim.phase(name)
        step.run(sim, step.groups, first, keep)
        sim.zero_grad()
        sim.phase(None)
    return {name: sim.results[name] for name in ("step0.optimizer_step", "steady.optimizer_step")}


__all__ = ["CATS", "NB", "PHASES", "Run", "simulate", "simulate_step", "vadd", "veval", "vsub"]
