"""Whole-step peak: the phase model of one Trainer configuration, evaluated for a batch shape.

:class:`PhaseModel` is what :func:`optimem.estimators.estimate` builds (once per model, precision, attention
implementation, checkpointing, accumulation, trainable set, task and optimizer; cached). For a batch shape it
takes the traced micro-step of the model (``estimators/trace``: the region of shapes holding it, traced when
first asked for) and simulates the phases of a training step on it: every phase's peak is the largest of a
handful of polynomials in B and S, so a warm call costs microseconds.

Per phase, bytes at the phase's peak are split as the harness's tensor accountant splits them:
``weights`` (parameters and buffers), ``gradients``, ``optimizer_state``, ``activations`` (tensors born in
a forward: saved activations, logits, the batch), ``temporaries`` (transients of the backward and the
optimizer step) and ``other``.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

from . import grad_scaler
from .memsim import CATS, PhaseResult, basis, veval
from .phase_cache import cached, inventory_fingerprint
from .phases import PHASES, Run, simulate, simulate_step
from .steps import StepModel
from .trace import data as trace_data
from .trace.setting import TraceSetting
from .trace.events import GRAD

NARROWED = "traced at"
"""What an estimate's note says of a step traced at its own shape (:meth:`PhaseModel.notes`; :func:`narrowed`)."""


def narrowed(notes: list[str]) -> bool:
    """Whether an estimate with these notes traced its step at its own sequence length (a step that changes with
    it: each other length costs a trace of its own)."""
    return any("training step changes with the" in n and NARROWED in n for n in notes)


CAT_NAMES = {"weights": "weights", "state": "optimizer_state", "grad": "gradients", "act": "activations",
             "tmp": "temporaries", "other": "other"}


@dataclass(frozen=True)
class StepMemory:
    """A training step's memory for one batch shape: per phase, the peak and its breakdown (bytes)."""

    phases: dict
    peak: int
    peak_phase: str
    activations: int
    allocations: dict = None
    """Per phase, live activation/transient allocations at its peak (for CUDA's per-block rounding)."""

    def to_dict(self) -> dict:
        return {"phases": self.phases, "peak": self.peak, "peak_phase": self.peak_phase,
                "activations": self.activations}


def _without_grads(snap: tuple) -> tuple:
    total, cats = snap[0], snap[1]
    gi = CATS.index("grad")
    g = cats[gi]
    total = tuple(t - x for t, x in zip(total, g))
    cats = tuple(c if i != gi else (0,) * len(c) for i, c in enumerate(cats))
    return total, cats


class PhaseModel:
    """All six phases of one configuration, per region of batch shapes (see the module docstring).

    ``inv``: the inventory (dtype and frozen flags applied); ``setting``: how the step is traced; ``step``:
    the optimizer's step program; ``state_total`` / ``state_init``: optimizer-state bytes on the device in
    steady steps and from ``__init__``; ``resident``: bytes a library keeps alive on the device through the
    whole run outside the model (``other`` in every phase; :func:`optimem.estimators.peft_model.resident_bytes`)."""

    def __init__(self, inv, source, setting: TraceSetting, grad_accum: int, step: StepModel, state_total: int,
                 state_init: int, cache_parts: dict | None = None, resident: int = 0):
        self.inv = inv
        self.source = source
        self.setting = setting
        self.grad_accum = grad_accum
        self.step = step
        self.state_total = state_total
        self.state_init = state_init
        self.resident = resident
        self._by_region: dict = {}
        self.cache_parts = cache_parts
        """JSON values naming the optimizer side of the simulation (with the trace's key and the region, the
        on-disk key of a region's phases; None: not cached on disk)."""
        self.trace = None  # the StepTrace (optimem.estimators.trace.run), once a region was asked for

    def gradless(self, b: int, s: int) -> tuple[str, ...]:
        """Names of the trainable parameters that the traced step at ``(b, s)`` gives no gradient (a cross-attention
        no encoder output reaches, a module run under ``no_grad``): their ``.grad`` stays None, so torch's optimizers
        (``if p.grad is None: continue``) never make their state. Call after :meth:`at` of that shape."""
        tr = self.trace
        region = tr.region(b, s) if tr is not None else None
        if region is None:
            return ()
        log = region.first
        got = {int(i) for i in log.a[log.kind == GRAD]}
        trainable = {r.name for r in self.inv.rows if r.trainable}
        return tuple(n for i, n in enumerate(tr.params) if n in trainable and i not in got)

    @property
    def inside(self) -> bool:
        return self.step.grad_mode in ("fused", "layerwise")

    @property
    def amp_scaler(self) -> bool:
        """fp16 on CUDA with the optimizer stepping after the backward: the step runs ``GradScaler``."""
        return self.setting.device == "cuda" and self.setting.mixed == "fp16" and self.step.grad_mode == "full"

    def notes(self, b: int | None = None, s: int | None = None) -> list[str]:
        """What the user should know about the estimate (at the batch shape ``(b, s)`` when given)."""
        tr = self.trace
        out = [grad_scaler.NOTE] if self.amp_scaler else []
        if tr is not None and tr.layerdrop:
            out.append(f"LayerDrop ({tr.layerdrop}): each training step skips layers drawn at random; the estimate "
                       "is the step in which every layer runs (the largest)")
        region = tr.region(max(b, 1), max(s, 1)) if tr is not None and b is not None and s is not None else None
        if region is not None and region.first.survivors:
            out.append(f"{self.inv.model} keeps {len(region.first.survivors)} tensors from one training step to the "
                       "next (state on a module, replaced by the next step): counted from their creation on; in a "
                       "steady step the previous step's, alive until the model replaces them, are not")
        if region is not None and tr.depends:
            seq = tr.depends == "seq"
            what, at = ("sequence length", f"sequence length {region.s_lo}") if seq else \
                ("batch size and sequence length", f"batch {region.b_lo} x sequence {region.s_lo}")
            took = f", in {region.seconds:.1f} s" if region.seconds else ""
            out.append(f"{self.inv.model}'s training step changes with the {what} (other operations, or sizes no "
                       f"polynomial fits: a loop over tokens or chunks), so it was {NARROWED} {at} itself{took}; "
                       f"another {what} is traced anew")
        if tr is not None and tr.attn_implementation != self.setting.attn:
            out.insert(0, f"{self.inv.model} runs {tr.attn_implementation} attention (it has no "
                          f"{self.setting.attn} implementation)")
        return out

    def at(self, b: int, s: int) -> tuple[dict[str, PhaseResult], dict[str, int]]:
        """(phase results, optimizer state alive in each phase) for the region holding ``(b, s)``."""
        accum = self.grad_accum > 1 and not self.inside
        tr = self.trace
        region = tr.region(b, s, accum) if tr is not None else None
        if region is None and tr is None:  # traced before, in another process?
            tr = self.trace = _disk_trace(self._disk_key())
            region = tr.region(b, s, accum) if tr is not None else None
        if region is None:
            from .trace.run import step_trace  # lazy: pulls in torch, which importing this module does not

            tr = self.trace = step_trace(self.source, self.setting, b, s, accum, known=tr)
            region = tr.region(b, s, accum)
            _store_trace(self._disk_key(), tr)
        key = (region.b_lo, region.s_lo, region.s_hi)
        hit = self._by_region.get(key)
        if hit is None or hit[0] is not region:
            hit = self._by_region[key] = (region, cached(self._phase_key(region, accum),
                                                         lambda: self._simulate(tr, region)))
        return hit[1]

    def _phase_key(self, region, accum: bool) -> dict | None:
        trace_key = self._disk_key()
        fp = inventory_fingerprint(self.inv)
        if self.cache_parts is None or trace_key is None or fp is None:
            return None
        return {**self.cache_parts, "trace": trace_key.digest, "inventory": fp, "grad_accum": self.grad_accum,
                "region": [region.b_lo, region.b_hi, region.s_lo, region.s_hi, accum]}

    def _disk_key(self):
        return trace_data.disk_key(self.inv.config_hash, getattr(self.source, "peft", None), self.setting)

    def run_at(self, b: int, s: int) -> Run:
        """The :class:`~optimem.estimators.phases.Run` the phases of ``(b, s)`` are simulated from (its region
        traced when first asked for)."""
        self.at(b, s)
        return self._run(self.trace, self.trace.region(b, s, self.grad_accum > 1 and not self.inside))

    def _run(self, tr, region) -> Run:
        inv = self.inv
        rows = {r.name: r for r in inv.rows}
        params = tr.params
        missing = [n for n in params if n not in rows]
        if missing:
            raise RuntimeError(f"trace and inventory of {inv.model} disagree on parameter {missing[0]}")
        return Run(region.first, region.accum if self.grad_accum > 1 else None, params,
                   tuple(rows[n].nbytes for n in params), tuple(rows[n].element_size for n in params),
                   tuple(rows[n].trainable for n in params), inv.weight_bytes + tr.settled_bytes, tr.buffers_bytes,
                   self.grad_accum,
                   label_shape=tr.label_shape, counts_items=tr.counts_items, shifts_labels=tr.shifts_labels,
                   amp_scaler=self.amp_scaler, batch_layout=tuple(getattr(tr, "batch_layout", ())))

    def _simulate(self, tr, region) -> tuple[dict, dict]:
        inv, step = self.inv, self.step
        run = self._run(tr, region)
        res = simulate(run, step) if self.inside else _forward_backward(run, region)
        out = dict(res)
        if self.inside:  # the simulation itself creates the per-parameter state (inside the step-0 backward)
            return out, dict.fromkeys(PHASES, self.state_init)
        grads = tuple((r.name, r.nbytes) for r in inv.rows if r.trainable)
        out.update(_step_sim(step, grads, _without_grads(res["step0.backward"].end),
                             _without_grads(res["steady.backward"].end)))
        init, total = self.state_init, self.state_total
        return out, {"step0.forward": init, "step0.backward": init, "step0.optimizer_step": init,
                     "steady.forward": total, "steady.backward": total, "steady.optimizer_step": init}


_LOADED: dict = {}
"""Traces read from (or written to) the on-disk cache in this process, by key digest: the phase models of one
model and setting (one per optimizer) share one."""


def _disk_trace(k):
    if k is None:
        return None
    st = _LOADED.get(k.digest)
    if st is None:
        st = trace_data.load(k)
        if st is not None:
            _LOADED[k.digest] = st
    return st


def forget_traces() -> None:
    """Drop every trace and simulation held in this process's memory (the on-disk cache stays): the next
    estimate reads the disk, or traces."""
    _LOADED.clear()
    _FB_CACHE.clear()
    _step_sim.cache_clear()
    run = sys.modules.get(f"{__package__}.trace.run")
    if run is not None:
        run._CACHE.clear()


def _store_trace(k, st) -> None:
    if k is not None:
        _LOADED[k.digest] = st
        trace_data.store(k, st)


@functools.lru_cache(maxsize=1024)
def _step_sim(step: StepModel, grads: tuple, base0: tuple, base1: tuple) -> dict[str, PhaseResult]:
    """The optimizer-step phases on top of a backward's end state (cached: regions of batch shapes whose
    backward ends alike share them)."""
    return simulate_step(step, dict(grads), base0, base1)


_FB_CACHE: dict = {}


def _forward_backward(run: Run, region) -> dict[str, PhaseResult]:
    """The forward/backward phases of ``run`` without the optimizer (shared by every optimizer that steps
    after the backward; cached per region and run)."""
    key = (id(region), run.params, run.param_bytes, run.trainable, run.weights_bytes, run.buffers_bytes,
           run.grad_accum, run.label_shape, run.counts_items, run.shifts_labels, run.amp_scaler, run.batch_layout)
    hit = _FB_CACHE.get(key)
    if hit is not None and hit[0] is region:
        return hit[1]
    if len(_FB_CACHE) > 256:
        _FB_CACHE.clear()
    res = simulate(run, None)
    _FB_CACHE[key] = (region, res)
    return res


def evaluate(model: PhaseModel, b: int, s: int) -> StepMemory:
    results, offsets = model.at(b, s)
    x = basis(b, s)  # Python ints: PhaseResult evaluates exactly, in int64 only where that cannot wrap
    phases: dict = {}
    counts: dict = {}
    best, best_phase = -1, None
    for name in PHASES:
        r = results[name]
        total, cats, n = r.at(r.argmax(x), x)
        extra = offsets.get(name, 0)
        breakdown = dict(zip(_CAT_KEYS, cats))
        breakdown["optimizer_state"] += extra
        breakdown["other"] += model.resident
        extra += model.resident
        phases[name] = {"peak": total + extra, **breakdown}
        counts[name] = n
        if total + extra > best:
            best, best_phase = total + extra, name
    tr = model.trace
    if tr is not None and tr.load_peak and model.setting.device == "cpu":  # the model built in the run's memory
        load = {k: 0 for k in _CAT_KEYS}
        load.update(weights=tr.load_end, other=tr.load_peak - tr.load_end)
        phases = {"model_load": {"peak": tr.load_peak, **load}, **phases}
        if tr.load_peak > best:
            best, best_phase = tr.load_peak, "model_load"
    fe = results["forward_end"].end
    acts = veval(fe[1][_ACT], b, s)
    return StepMemory(phases, best, best_phase, acts, counts)


_CAT_KEYS = tuple(CAT_NAMES[c] for c in CATS)
_ACT = CATS.index("act")


