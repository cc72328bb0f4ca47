"""Phases of a Trainer job and the callback and hooks that mark them.

Phases, in order: ``model_load`` (building the model), ``setup`` (Trainer construction, optimizer
creation), then per optimizer step ``forward`` (from the end of the previous step, so the batch fetch is
in it, to the model's forward returning the loss), ``backward`` (to ``on_pre_optimizer_step``; gradient
clipping included) and ``optimizer_step`` (``optimizer.step()``, the scheduler step and
``zero_grad``). With gradient accumulation a step alternates forward and backward; both are folded into
that step's phase. Step 0 is reported on its own (``step0.*``: no optimizer state exists before its
``optimizer.step()`` for lazily initialised optimizers); steps 1.. are folded into ``steady.*`` (peaks are
the highest seen over those steps, end figures are the last step's).

Every tracker has ``start_phase(name)`` and ``end_phase() -> dict`` (bytes); the recorder calls them all
at every boundary and keeps each tracker's figures under its own key.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import TrainerCallback

PHASE_KINDS: tuple[str, ...] = ("forward", "backward", "optimizer_step")
PHASE_ORDER: tuple[str, ...] = ("model_load", "setup", *(f"step0.{k}" for k in PHASE_KINDS),
                                *(f"steady.{k}" for k in PHASE_KINDS))


class PhaseTracker(Protocol):
    def start_phase(self, name: str) -> None: ...

    def end_phase(self) -> Any: ...


@dataclass
class _Occurrence:
    label: str
    step: int | None
    kind: str
    figures: dict[str, dict] = field(default_factory=dict)
    forward_seen: bool = False


class PhaseRecorder:
    """Runs the phase boundaries for a set of named trackers and folds the occurrences into the
    reported phases (:data:`PHASE_ORDER`). ``primary``: the tracker whose ``peak_bytes`` /
    ``end_bytes`` are the phase's headline figures. ``on_enter(label)`` runs after each phase starts."""

    def __init__(self, trackers: dict[str, PhaseTracker], primary: str,
                 on_enter: Callable[[str], None] | None = None):
        self.trackers = trackers
        self.primary = primary
        self.on_enter = on_enter
        self.current: _Occurrence | None = None
        self.done: list[_Occurrence] = []
        self.step = 0

    @property
    def current_label(self) -> str | None:
        return self.current.label if self.current else None

    def switch(self, kind: str, step: int | None = None) -> None:
        """End the current phase (if any) and start ``kind`` (of ``step`` for per-step kinds)."""
        self.end()
        self.start(kind, step)

    def remove_tracker(self, name: str) -> None:
        """Stop calling tracker ``name`` (its figures so far are kept)."""
        self.trackers.pop(name, None)

    def start(self, kind: str, step: int | None = None) -> None:
        label = kind if step is None else f"step{step}.{kind}"
        self.current = _Occurrence(label, step, kind)
        for tracker in self.trackers.values():
            tracker.start_phase(label)
        if self.on_enter is not None:
            self.on_enter(label)

    def end(self, *, interrupted: bool = False) -> None:
        occ = self.current
        if occ is None:
            return
        try:
            for name, tracker in list(self.trackers.items()):
                figures = tracker.end_phase()
                occ.figures[name] = figures.to_dict() if hasattr(figures, "to_dict") else dict(figures)
        finally:
            self.current = None  # while the trackers end it, ``current`` is still the ending phase
        if interrupted:
            occ.figures["interrupted"] = {"value": True}
        # A forward phase opened at a step's end in which no forward ran (the loop ended) is dropped.
        if occ.kind == "forward" and not occ.forward_seen and not interrupted:
            return
        self.done.append(occ)

    def phases(self) -> dict[str, dict]:
        """The reported phases, in :data:`PHASE_ORDER` (only those that happened)."""
        folded: dict[str, dict] = {}
        counts: dict[str, int] = {}
        for occ in self.done:
            if occ.step is None:
                name = occ.kind
            elif occ.step == 0:
                name = f"step0.{occ.kind}"
            else:
                name = f"steady.{occ.kind}"
            figures = {k: v for k, v in occ.figures.items() if k != "interrupted"}
            folded[name] = figures if name not in folded else _merge_figures(folded[name], figures)
            counts[name] = counts.get(name, 0) + 1
            if "interrupted" in occ.figures:
                folded[name]["interrupted"] = True
        out: dict[str, dict] = {}
        for name in sorted(folded, key=lambda n: PHASE_ORDER.index(n) if n in PHASE_ORDER else len(PHASE_ORDER)):
            figs = folded[name]
            prim = figs.get(self.primary, {})
            entry = {"peak_bytes": int(prim.get("peak_bytes", 0)), "end_bytes": int(prim.get("end_bytes", 0)),
                     "occurrences": counts[name]}
            if figs.pop("interrupted", False):
                entry["interrupted"] = True
            entry.update(figs)
            out[name] = entry
        return out


def _merge_figures(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Fold a later occurrence ``b`` into ``a``: peaks are the max (with the breakdown of the
    occurrence that reached it), counts add up, everything else is the later value."""
    out: dict[str, dict] = {}
    for tracker in {**a, **b}:
        fa, fb = a.get(tracker), b.get(tracker)
        if fa is None or fb is None or not isinstance(fa, dict):
            out[tracker] = fb if fb is not None else fa
            continue
        merged = dict(fb)
        b_wins = fb.get("peak_bytes", 0) >= fa.get("peak_bytes", 0)
        for key, va in fa.items():
            vb = fb.get(key)
            if key == "breakdown_at_peak":
                merged[key] = vb if b_wins else va
            elif key.startswith("start"):
                merged[key] = va
            elif isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                if "peak" in key:
                    merged[key] = max(va, vb)
                elif key in ("alloc_retries", "ooms"):
                    merged[key] = va + vb
        out[tracker] = merged
    return out


class PhaseCallback(TrainerCallback):
    """Marks the Trainer's step boundaries for a :class:`PhaseRecorder`; the model hooks (see
    :func:`attach_model_hooks`) mark forward and backward inside a step.

    ``on_boundary(event, step)`` lets the caller act at ``train_begin``, ``pre_optimizer_step``,
    ``optimizer_step`` and ``step_end`` (timing, pausing a tracker, measuring the optimizer); at
    ``step_end`` it runs between the end of that step's last phase and the start of the next step's."""

    def __init__(self, recorder: PhaseRecorder, on_boundary: Callable[[str, int], None] | None = None):
        self.recorder = recorder
        self.on_boundary = on_boundary or (lambda event, step: None)

    def on_train_begin(self, args, state, control, **kwargs):
        self.on_boundary("train_begin", 0)
        self.recorder.switch("forward", 0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        cur = self.recorder.current
        if cur is None or cur.kind != "optimizer_step":  # a DeepSpeed engine's step may have begun it already
            self.recorder.switch("optimizer_step", self.recorder.step)
        self.on_boundary("pre_optimizer_step", self.recorder.step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.on_boundary("optimizer_step", self.recorder.step)

    def on_step_end(self, args, state, control, **kwargs):
        step = self.recorder.step
        self.recorder.end()
        self.on_boundary("step_end", step)
        self.recorder.step += 1
        self.recorder.start("forward", self.recorder.step)

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.end()


def attach_model_hooks(model: torch.nn.Module, recorder: PhaseRecorder,
                       on_grad: Callable[[torch.Tensor], None] | None = None) -> list:
    """Forward pre/post hooks on the top-level model that switch forward <-> backward, and (if
    ``on_grad``) a post-accumulate-grad hook per parameter. Returns the hook handles."""
    handles = []

    def pre(module, args, kwargs=None):
        cur = recorder.current
        if cur is not None and cur.kind == "backward" and torch.is_grad_enabled():
            recorder.switch("forward", recorder.step)
            cur = recorder.current
        if cur is not None and cur.kind == "forward":
            cur.forward_seen = True

    def post(module, args, output):
        cur = recorder.current
        if cur is not None and cur.kind == "forward" and torch.is_grad_enabled():
            recorder.switch("backward", recorder.step)

    handles.append(model.register_forward_pre_hook(pre))
    handles.append(model.register_forward_hook(post))
    if on_grad is not None:
        seen: set[int] = set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                handles.append(p.register_post_accumulate_grad_hook(on_grad))
    return handles


__all__ = ["PHASE_KINDS", "PHASE_ORDER", "PhaseCallback", "PhaseRecorder", "PhaseTracker", "attach_model_hooks"]
