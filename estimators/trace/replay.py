"""Replay a fitted micro-step log on the simulator (:class:`~estimators.memsim.Sim`).

Every allocation of the log becomes a simulator storage of its polynomial size, every free a release; the
simulator's phase bookkeeping records the live bytes at each local maximum, per category (allocations in a
forward phase are ``act``, the rest ``tmp``). At a parameter's post-accumulate-grad point its gradient storage
becomes ``param.grad`` (category ``grad``) and the ``post_accumulate`` hook runs (layer-wise optimizers step
there and drop the gradient); at its tensor-hook point the ``pre_accumulate`` hook runs (LOMO's update). The
trace itself ran without those hooks, so a gradient they drop early is simply no longer there when the log
would have kept it.
"""
from __future__ import annotations

from collections.abc import Callable

from ..memsim import Param, Sim
from .events import ALLOC, FREE, GRAD, EventLog
from .step import PRE_ACC


def replay(sim: Sim, log: EventLog, params: list[Param | None], on_mark: Callable[[int, int], None]) -> None:
    """Replay ``log`` on ``sim``. ``params``: the simulator's parameter for each parameter index of the trace
    (None for frozen ones); ``on_mark(code, arg)`` is called at each marker (phase ends)."""
    sts: list = [None] * log.n_alloc
    sizes = [tuple(int(x) for x in row) for row in log.sizes.tolist()]
    kinds = log.kind.tolist()
    A = log.a.tolist()
    Bv = log.b.tolist()
    ai = 0
    alloc, decref = sim.alloc, sim.decref
    hooks = sim.hooks
    for i, k in enumerate(kinds):
        if k == ALLOC:
            sts[A[i]] = alloc(sizes[ai])
            ai += 1
        elif k == FREE:
            st = sts[A[i]]
            if st is not None:
                sts[A[i]] = None
                decref(st)
        elif k == GRAD:
            p = params[A[i]]
            sid = Bv[i]
            if sid >= 0:
                st = sts[sid]
                sts[sid] = None
                if p is None:  # a leaf the step made (not a parameter): keep it as a transient
                    continue
                sim.recat(st, "grad")
                p.grad = st
            hook = hooks.get("post_accumulate")
            if hook is not None and p is not None:
                hook(sim, p)
        else:
            code, arg = A[i], Bv[i]
            if code == PRE_ACC:
                pre = hooks.get("pre_accumulate")
                if pre is not None and params[arg] is not None:
                    pre(sim, params[arg])
            else:
                on_mark(code, arg)


__all__ = ["replay"]
