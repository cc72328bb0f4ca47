"""Replay a fitted micro-step log on the simulator (:class:`~optimem.estimators.memsim.Sim`).

Every allocation of the log becomes a simulator storage of its polynomial size, every free a release; the
simulator's phase bookkeeping records the live bytes at each local maximum, per category (allocations in a
forward phase are ``act``, the rest ``tmp``). At a parameter's post-accumulate-grad point its gradient storage
becomes ``param.grad`` (category ``grad``) and the ``post_accumulate`` hook runs (layer-wise optimizers step
there and drop the gradient); at its tensor-hook point the ``pre_accumulate`` hook runs (LOMO's update). The
trace itself ran without those hooks, so a gradient they drop early is simply no longer there when the log
would have kept it.

Between two events that need Python -- a marker, a hook point when that hook is set -- the live bytes after
every event are one cumulative sum, and the local maxima the simulator would record one by one are picked
from it: the same candidates and end state as replaying event by event (``tests/estimators/test_trace.py`` checks it).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..memsim import CATS, NB, CandBlock, Param, Sim, St
from .events import ALLOC, FREE, GRAD, MARK, PRE_ACC, EventLog

_ACT, _TMP = CATS.index("act"), CATS.index("tmp")


def replay(sim: Sim, log: EventLog, params: list[Param | None], on_mark: Callable[[int, int], None]) -> None:
    """Replay ``log`` on ``sim``. ``params``: the simulator's parameter for each parameter index of the trace
    (None for frozen ones); ``on_mark(code, arg)`` is called at each marker (phase ends)."""
    if getattr(sim, "event_by_event", False):  # a simulator that follows every storage (the allocator's tape)
        replay_events(sim, log, params, on_mark)
        return
    kind, A, Bv, sizes = log.kind, log.a, log.b, log.sizes
    st_row = np.zeros(log.n_alloc, dtype=np.int64)  # storage id -> its row in ``sizes``
    st_cat = np.zeros(log.n_alloc, dtype=np.int64)
    is_alloc = kind == ALLOC
    rows = np.cumsum(is_alloc) - 1
    st_row[A[is_alloc]] = rows[is_alloc]
    pre, post = sim.hooks.get("pre_accumulate"), sim.hooks.get("post_accumulate")
    needs_python = (kind == MARK) & ((A != PRE_ACC) | (pre is not None))
    if post is not None:
        needs_python |= kind == GRAD
    start = 0
    for end in np.flatnonzero(needs_python).tolist() + [len(kind)]:
        if end > start:
            _segment(sim, kind[start:end], A[start:end], Bv[start:end], sizes, st_row, st_cat, params)
        if end == len(kind):
            break
        k, a, b = int(kind[end]), int(A[end]), int(Bv[end])
        if k == GRAD:
            p = _param(params, a)
            if b >= 0:
                row = sizes[st_row[b]]
                old = CATS[st_cat[b]]
                for j in range(NB):
                    sim.live_cat[old][j] -= int(row[j])
                    sim.live_cat["grad"][j] += int(row[j])
                sim.live_n -= 1
                p.grad = St(tuple(int(x) for x in row), "grad")
            post(sim, p)
        elif a == PRE_ACC:
            if params[b] is not None:
                pre(sim, params[b])
        else:
            on_mark(a, b)
        start = end + 1


SHORT = 24
"""Stretches up to this many events are replayed by a plain loop (numpy's per-call cost is larger there)."""
_MOVING = (CATS.index("act"), CATS.index("tmp"), CATS.index("grad"))
"""The only categories a micro-step's events change."""


def _segment(sim: Sim, kind, A, Bv, sizes, st_row, st_cat, params) -> None:
    """Replay a stretch of events that needs no Python: allocations, frees, gradients without hooks."""
    if len(kind) <= SHORT:
        _segment_loop(sim, kind.tolist(), A.tolist(), Bv.tolist(), sizes, st_row, st_cat, params)
        return
    n = len(kind)
    is_alloc = kind == ALLOC
    is_free = kind == FREE
    is_grad = (kind == GRAD) & (Bv >= 0)
    st_cat[A[is_alloc]] = _ACT if sim.in_forward else _TMP
    sid = np.where(is_grad, Bv, A)
    touched = is_alloc | is_free | is_grad
    sz = np.zeros((n, NB), dtype=np.int64)
    sz[touched] = sizes[st_row[sid[touched]]]
    moving = np.where(st_cat[np.where(touched, sid, 0)] == _ACT, 0, 1)  # act -> 0, tmp -> 1
    sign = np.where(is_alloc, 1, np.where(is_free | is_grad, -1, 0))
    d_tot = sz * np.where(is_grad, 0, sign)[:, None]
    d3 = np.zeros((n, 3, NB), dtype=np.int64)
    idx = np.arange(n)
    d3[idx, moving] = sz * sign[:, None]
    d3[idx[is_grad], 2] = sz[is_grad]
    tot0 = np.array(sim.live, dtype=np.int64)
    cat0 = np.array([sim.live_cat[c] for c in CATS], dtype=np.int64)
    tot = tot0 + np.cumsum(d_tot, axis=0)
    cat3 = cat0[list(_MOVING)] + np.cumsum(d3, axis=0)
    cnt = sim.live_n + np.cumsum(sign)  # act / tmp storages are counted one by one; a gradient no longer is
    # the simulator snapshots at a free that follows an allocation (a local maximum): the state before it.
    # ``rising`` (an allocation since the last snapshot) as positions: the last allocation before an event
    # is later than the last free; the segment's start counts as one or the other.
    ia, if_ = (-1, -2) if sim.rising else (-3, -1)
    pos = np.arange(n)
    la = np.maximum(np.maximum.accumulate(np.where(is_alloc, pos, ia)), ia)
    lf = np.maximum(np.maximum.accumulate(np.where(is_free, pos, if_)), if_)
    prev_a = np.concatenate(([ia], la[:-1]))
    prev_f = np.concatenate(([if_], lf[:-1]))
    trig = np.flatnonzero(is_free & (prev_a > prev_f))
    if len(trig):
        before = trig - 1
        first = before < 0
        b = np.maximum(before, 0)
        t_rows = np.where(first[:, None], tot0, tot[b])
        c_rows = np.broadcast_to(cat0, (len(trig),) + cat0.shape).copy()
        c_rows[:, list(_MOVING)] = np.where(first[:, None, None], cat0[list(_MOVING)], cat3[b])
        n_rows = np.where(first, sim.live_n, cnt[b])
        sim.cands.append(CandBlock(t_rows, c_rows, n_rows))
    sim.live = tot[-1].tolist()
    for j, c in zip(_MOVING, ("act", "tmp", "grad")):
        sim.live_cat[c] = cat3[-1][_MOVING.index(j)].tolist()
    sim.live_n = int(cnt[-1])
    sim.rising = bool(la[-1] > lf[-1])
    for i in np.flatnonzero(is_grad).tolist():
        p = _param(params, int(A[i]))
        p.grad = St(tuple(int(x) for x in sizes[st_row[Bv[i]]]), "grad")


def _segment_loop(sim: Sim, kind: list, A: list, Bv: list, sizes, st_row, st_cat, params) -> None:
    """:func:`_segment` event by event (the same bookkeeping as :meth:`Sim.alloc` / :meth:`Sim.decref`)."""
    live, lc = sim.live, sim.live_cat
    new_cat = _ACT if sim.in_forward else _TMP
    for k, a, b in zip(kind, A, Bv):
        if k == ALLOC:
            st_cat[a] = new_cat
            row = sizes[st_row[a]].tolist()
            tgt = lc[CATS[new_cat]]
            for j in range(NB):
                live[j] += row[j]
                tgt[j] += row[j]
            sim.live_n += 1
            sim.rising = True
        elif k == FREE:
            if sim.rising:
                sim.cands.append(sim._snap())
                sim.rising = False
            row = sizes[st_row[a]].tolist()
            tgt = lc[CATS[st_cat[a]]]
            for j in range(NB):
                live[j] -= row[j]
                tgt[j] -= row[j]
            sim.live_n -= 1
        elif k == GRAD and b >= 0:
            row = sizes[st_row[b]].tolist()
            src, dst = lc[CATS[st_cat[b]]], lc["grad"]
            for j in range(NB):
                src[j] -= row[j]
                dst[j] += row[j]
            sim.live_n -= 1
            _param(params, a).grad = St(tuple(row), "grad")


def replay_events(sim: Sim, log: EventLog, params: list[Param | None], on_mark: Callable[[int, int], None]) -> None:
    """:func:`replay` one event at a time through :meth:`Sim.alloc` / :meth:`Sim.decref` (slower; every storage
    is its own simulator storage, for a simulator that records the sequence): a gradient's storage becomes
    ``param.grad`` (replacing an earlier one, which is released), hooks and markers as in :func:`replay`."""
    pre, post = sim.hooks.get("pre_accumulate"), sim.hooks.get("post_accumulate")
    sizes = log.sizes.tolist()
    live: dict[int, St] = {}
    row = 0
    for k, a, b in zip(log.kind.tolist(), log.a.tolist(), log.b.tolist()):
        if k == ALLOC:
            live[a] = sim.alloc(tuple(sizes[row]))
            row += 1
        elif k == FREE:
            sim.decref(live.pop(a, None))
        elif k == GRAD:
            p = _param(params, a)
            if b >= 0:
                st = live.pop(b)
                if p.grad is not None and p.grad is not st:
                    sim.decref(p.grad)
                sim.recat(st, "grad")
                p.grad = st
            if post is not None:
                post(sim, p)
        elif a == PRE_ACC:
            if pre is not None and params[b] is not None:
                pre(sim, params[b])
        else:
            on_mark(a, b)


def _param(params: list[Param | None], i: int) -> Param:
    p = params[i]
    if p is None:
        raise RuntimeError(f"the trace delivers a gradient to parameter {i}, which the inventory says is frozen")
    return p


__all__ = ["replay", "replay_events"]
