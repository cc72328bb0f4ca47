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

from .memsim import CATS, ZERO, PhaseResult, Sim, St, vec, veval

_ZERO_SNAP = (ZERO, tuple(ZERO for _ in CATS), 0)
_EMPTY = PhaseResult([], _ZERO_SNAP)


class TapeSim(Sim):
    """A :class:`Sim` that records the sequence of allocations and frees at one ``(b, s)`` (``tape``)."""

    event_by_event = True
    per_parameter = True

    def __init__(self, b: int, s: int, workspace: int = 0):
        super().__init__()
        self.b, self.s = b, s
        self.tape: list[tuple] = []
        self._ids: dict[int, int] = {}
        self._next = 0
        self._workspace = workspace

    def alloc(self, size, cat: str | None = None) -> St:
        st = super().alloc(size, cat)
        n = veval(size, self.b, self.s)
        if n > 0:
            self._ids[id(st)] = self._next
            self.tape.append(("a", self._next, n))
            self._next += 1
        return st

    def decref(self, st: St | None) -> None:
        if st is not None and st.refs == 1:
            h = self._ids.pop(id(st), None)
            if h is not None:
                self.tape.append(("f", h))
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


def step_tape(model, b: int, s: int, workspace: int = 0) -> list[tuple]:
    """The allocation sequence of ``model`` (a :class:`~optimem.estimators.peak.PhaseModel`) at batch ``b`` x
    sequence ``s``: model load, optimizer ``__init__`` state, library residents, step 0 and a steady step."""
    from .phases import simulate

    run = model.run_at(b, s)
    sim = TapeSim(b, s, workspace)
    sim.phase("load")
    if model.state_init:
        sim.alloc(vec(model.state_init), "state")
    if model.resident:
        sim.alloc(vec(model.resident), "other")
    sim.phase(None)
    simulate(run, model.step, sim=sim, both_steps=True)
    return sim.tape


__all__ = ["TapeSim", "step_tape"]
