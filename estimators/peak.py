"""Whole-step peak: the phase model of one Trainer configuration, evaluated for a batch shape.

:func:`step_memory` is what :func:`estimators.estimate` calls. It builds (once per model, precision,
attention implementation, checkpointing, accumulation, trainable set and optimizer; cached) the simulated
phases of a training step, then evaluates them for ``(batch_size, seq_len)``: every phase's peak is the
largest of a handful of polynomials in B and S, so a warm call costs microseconds.

Per phase, bytes at the phase's peak are split as the harness's tensor accountant splits them:
``weights`` (parameters and buffers), ``gradients``, ``optimizer_state``, ``activations`` (tensors born in
a forward: saved activations, logits, the batch), ``temporaries`` (transients of the backward and the
optimizer step) and ``other``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .archs import Arch, Setting, arch_from_config
from .errors import UserError
from .memsim import CATS, PhaseResult, veval
from .phases import PHASES, Run, simulate, simulate_step
from .steps import StepModel

CAT_NAMES = {"weights": "weights", "state": "optimizer_state", "grad": "gradients", "act": "activations",
             "tmp": "temporaries", "other": "other"}
MIXED = {None: 0, "bf16": 2, "fp16": 2}


def arch_for(inv) -> Arch:
    """The model's :class:`~estimators.archs.Arch`, read from its config (cached on the inventory)."""
    arch = inv._cache.get("arch")
    if arch is None:
        from .catalog import resolve
        from .inventory import build_config

        cfg = build_config(resolve(inv.model))
        try:
            arch = arch_from_config(cfg)
        except (AttributeError, TypeError) as exc:
            raise UserError(f"{inv.model}: cannot read the layer shapes from its config ({exc}); activation "
                            "memory needs a decoder-only, GPT-2 or T5 style config") from None
        inv._cache["arch"] = arch
    return arch


def buffers_bytes(arch: Arch, es: int) -> int:
    """Model buffers: Llama-style rotary embeddings keep ``inv_freq`` and ``original_inv_freq``
    (head_dim / 2 elements each, cast with the model)."""
    if arch.family == "decoder":
        return 2 * (arch.head_dim // 2) * es
    return 0


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


@functools.lru_cache(maxsize=256)
def _activation_sim(run: Run, step_key, step: StepModel | None) -> dict[str, PhaseResult]:
    return simulate(run, step)


@functools.lru_cache(maxsize=1024)
def _step_sim(step: StepModel, grads: tuple, base0: tuple, base1: tuple) -> dict[str, PhaseResult]:
    return simulate_step(step, dict(grads), base0, base1)


def _without_grads(snap: tuple) -> tuple:
    total, cats = snap[0], snap[1]
    gi = CATS.index("grad")
    g = cats[gi]
    total = tuple(t - x for t, x in zip(total, g))
    cats = tuple(c if i != gi else (0,) * len(c) for i, c in enumerate(cats))
    return total, cats


def phase_results(inv, setting: Setting, grad_accum: int, step: StepModel, state_total: int,
                  state_init: int) -> dict[str, PhaseResult]:
    """All six phases (forward/backward shifted by the optimizer state alive in them)."""
    arch = arch_for(inv)
    trainable = frozenset(r.name for r in inv.rows if r.trainable)
    all_trainable = len(trainable) == len(inv.rows)
    run = Run(arch, setting, inv.weight_bytes, buffers_bytes(arch, setting.es), grad_accum,
              None if all_trainable else trainable)
    inside = step.grad_mode in ("fused", "layerwise")
    res = _activation_sim(run, id(step) if inside else None, step if inside else None)
    if inside:
        out = dict(res)
    else:
        grads = tuple((r.name, r.nbytes) for r in inv.rows if r.trainable)
        steps = _step_sim(step, grads, _without_grads(res["step0.backward"].end),
                          _without_grads(res["steady.backward"].end))
        out = dict(res)
        out.update(steps)
    if inside:  # the simulation itself creates the per-parameter state (inside the step-0 backward)
        return out, dict.fromkeys(PHASES, state_init)
    return out, {"step0.forward": state_init, "step0.backward": state_init, "step0.optimizer_step": state_init,
                 "steady.forward": state_total, "steady.backward": state_total,
                 "steady.optimizer_step": state_init}


def evaluate(results: dict[str, PhaseResult], offsets: dict, b: int, s: int) -> StepMemory:
    import numpy as np

    from .memsim import basis

    x = np.array(basis(b, s), dtype=np.int64)
    phases: dict = {}
    counts: dict = {}
    best, best_phase = -1, None
    for name in PHASES:
        r = results[name]
        total, cats, n = r.at(r.argmax(x), x)
        extra = offsets.get(name, 0)
        breakdown = dict(zip(_CAT_KEYS, cats))
        breakdown["optimizer_state"] += extra
        phases[name] = {"peak": total + extra, **breakdown}
        counts[name] = n
        if total + extra > best:
            best, best_phase = total + extra, name
    fe = results["forward_end"].end
    acts = veval(fe[1][_ACT], b, s)
    return StepMemory(phases, best, best_phase, acts, counts)


_CAT_KEYS = tuple(CAT_NAMES[c] for c in CATS)
_ACT = CATS.index("act")


__all__ = ["MIXED", "StepMemory", "arch_for", "buffers_bytes", "evaluate",
           "phase_results"]
