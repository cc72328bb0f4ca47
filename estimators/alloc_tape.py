"""A training step's allocations and frees, in order, at one batch shape: what the CUDA caching allocator sees.

The phase model (``estimators/peak.py``) keeps sizes as polynomials and live bytes as sums; the allocator
(``estimators/allocator.py``) needs the sequence itself. :func:`step_tape` runs the same simulation
(``estimators/phases.simulate``: the model loaded parameter by parameter, the optimizer's ``__init__`` state,
step 0 and a steady step -- forward, backward, optimizer step, ``zero_grad`` -- with the traced micro-steps
replayed storage by storage) on a :class:`TapeSim` that writes every storage's birth and death as
``("a", id, bytes)`` / ``("f", id)``. The cuBLAS/cuBLASLt workspace (``cublas_workspace`` bytes) is allocated
at the step's first forward, as the first matmul of a stream allocates it through the caching allocator, and
kept. All sizes are bytes.
"""
from __future__ import annotations

from .memsim import CATS, NB, ZERO, PhaseResult, Sim, St, basis, vec
from .phases import simulate
import numpy as np

_ZERO_SNAP = (ZERO, tuple(ZERO for _ in CATS), 0)
_EMPTY = PhaseResult([], _ZERO_SNAP)


class TapeSim(Sim):
    """A :class:`Sim` that records the sequence of allocations and frees (``ops``: ``(handle, size vector)`` for
    an allocation, ``(handle, None)`` for a free; sizes stay polynomials in B and S, as the simulator's)."""

    event_by_event = True
    per_parameter = True

    def __init__(self, workspace: int = 0):
        super().__init__()
        self.ops: list[tuple] = []
        self._ids: dict[int, int] = {}
        self._next = 0
        self._workspace = workspace

    def alloc(self, size, cat: str | None = None) -> St:
        st = super().alloc(size, cat)
        if any(size):
            self._ids[id(st)] = self._next
            self.ops.append((self._next, size))
            self._next += 1
        return st

    def decref(self, st: St | None) -> None:
        if st is not None and st.refs == 1:
            h = self._ids.pop(id(st), None)
            if h is not None:
                self.ops.append((h, None))
        super().decref(st)

    # no candidates, no per-category sums: only the sequence matters here
    def _add(self, st: St, sign: int) -> None:
        pass

    def _snap(self) -> tuple:
        return _ZERO_SNAP

    def phase(self, name: str | None) -> None:
        if self.phase_name is not None:
            self.results[self.phase_name] = _EMPTY
        self.phase_name = name
        self.rising = False
        self.in_forward = bool(name) and name.endswith("forward")
        if self._workspace and name == "step0.forward":
            self.alloc(vec(self._workspace), "other")  # the cuBLAS workspaces, once, for good
            self._workspace = 0


class Tape:
    """A step's allocation sequence for a whole region of batch shapes: ``handles`` (one per event), ``is_free``
    and, per allocation, its size as polynomial coefficients (``sizes``, rows in event order)."""

    def __init__(self, ops: list[tuple]):
        self.handles = [h for h, _ in ops]
        self.is_free = [size is None for _, size in ops]
        self.sizes = np.array([size for _, size in ops if size is not None], dtype=np.int64).reshape(-1, NB)

    def sizes_at(self, b: int, s: int) -> list[int]:
        """Every allocation's bytes at ``(b, s)``, in order (exact: Python integers where int64 could overflow)."""
        vec = basis(b, s)
        top = int(np.abs(self.sizes).max()) if self.sizes.size else 0
        if top * max(map(abs, vec), default=0) * NB < 1 << 62:
            return (self.sizes @ np.array(vec, dtype=np.int64)).tolist()
        return (self.sizes.astype(object) @ np.array(vec, dtype=object)).tolist()

    def at(self, b: int, s: int) -> list[tuple]:
        """The sequence at ``(b, s)``: ``("a", handle, bytes)`` / ``("f", handle)``."""
        n = iter(self.sizes_at(b, s))
        return [("f", h) if free else ("a", h, next(n)) for h, free in zip(self.handles, self.is_free)]


_TAPES: dict = {}


def region_tape(model, b: int, s: int, workspace: int = 0) -> Tape:
    """The :class:`Tape` of ``model`` (a :class:`~optimem.estimators.peak.PhaseModel`) for the region holding
    ``(b, s)``: model load, optimizer ``__init__`` state, library residents, step 0 and a steady step (cached per
    model, region and workspace)."""
    run = model.run_at(b, s)
    key = (id(model), id(run.first), workspace)
    hit = _TAPES.get(key)
    if hit is not None and hit[0] is model and hit[1] is run.first:
        return hit[2]
    sim = TapeSim(workspace)
    sim.phase("load")
    if model.state_init:
        sim.alloc(vec(model.state_init), "state")
    if model.resident:
        sim.alloc(vec(model.resident), "other")
    sim.phase(None)
    simulate(run, model.step, sim=sim, both_steps=True)
    if len(_TAPES) > 64:
        _TAPES.clear()
    tape = Tape(sim.ops)
    _TAPES[key] = (model, run.first, tape)
    return tape


def step_tape(model, b: int, s: int, workspace: int = 0) -> list[tuple]:
    """The allocation sequence of ``model`` at batch ``b`` x sequence ``s`` (:meth:`Tape.at` of its region's
    tape)."""
    return region_tape(model, b, s, workspace).at(b, s)


__all__ = ["Tape", "TapeSim", "region_tape", "step_tape"]
