"""A small simulator of what PyTorch keeps in memory during one training step.

The estimator never runs a model on real tensors. Its forward and backward come from a trace of the real
model (``estimators/trace``), replayed here storage by storage; the Trainer-level parts of a step (the batch
the dataloader fetches, the optimizer's step programs in ``estimators/steps.py``, ``zero_grad``) allocate and
free :class:`St` storages on the same :class:`Sim`, so every phase's peak is measured against one running
total, split by category.

Sizes are not numbers but polynomials in the batch size ``B`` and sequence length ``S``: a tuple of the
coefficients of ``(1, B, S, B*S, S*S, B*S*S)`` in bytes (everything else -- hidden size, heads, vocabulary,
dtype -- is fixed by the model and the precision, so it is folded into the coefficients). One simulation per
model and setting therefore answers every shape of its region: the live bytes at every local maximum are
recorded as such vectors, dominated ones are dropped, and the peak for a concrete ``(B, S)`` is the largest
dot product. All figures are bytes.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

NB = 6
CATS = ("weights", "state", "grad", "act", "tmp", "other")
"""Categories of live bytes: parameters and buffers, optimizer state, parameter gradients, tensors born in
a forward phase (saved activations, logits, the batch), transients of backward and optimizer steps, and
long-lived odds and ends (the Trainer's loss accumulator)."""
_COUNTED = frozenset({"act", "tmp"})
"""Categories whose storages are counted one by one (``Sim.live_n``: live activations and transients, for
the CUDA allocator's per-allocation rounding); parameters, gradients and state are counted exactly from
the inventory instead."""
BASIS = ("1", "B", "S", "B*S", "S*S", "B*S*S")
_INT64_SAFE = 1 << 62
"""Below this, a sum of int64 products cannot wrap around (the bound :meth:`PhaseResult._exact` checks)."""
Vec = tuple  # (c, b, s, bs, ss, bss)
ZERO: Vec = (0, 0, 0, 0, 0, 0)


def vec(c: int = 0, b: int = 0, s: int = 0, bs: int = 0, ss: int = 0, bss: int = 0) -> Vec:
    """A size in bytes: ``c + b*B + s*S + bs*B*S + ss*S*S + bss*B*S*S``."""
    return (c, b, s, bs, ss, bss)


def vadd(a: Vec, b: Vec) -> Vec:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5])


def vsub(a: Vec, b: Vec) -> Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3], a[4] - b[4], a[5] - b[5])


def basis(b: int, s: int) -> Vec:
    return (1, b, s, b * s, s * s, b * s * s)


def veval(v: Vec, b: int, s: int) -> int:
    return v[0] + v[1] * b + v[2] * s + v[3] * b * s + v[4] * s * s + v[5] * b * s * s


# ------------------------------------------------------------------------------------------------- objects
class St:
    """One storage: ``size`` (bytes, a vector), reference count, category (``act`` born in a forward,
    ``grad`` a parameter's gradient, ``tmp`` anything else)."""

    __slots__ = ("size", "refs", "cat")

    def __init__(self, size: Vec, cat: str):
        self.size = size
        self.refs = 1
        self.cat = cat


class Var:
    """A Python-visible tensor of the Trainer-level code (a batch tensor): its storage."""

    __slots__ = ("st", "size", "alive")

    def __init__(self, st: St | None, size: Vec):
        self.st = st
        self.size = size
        self.alive = True


class Param:
    """A parameter: its ``size`` in bytes (a vector), element size ``es``, whether it is ``trainable``, and
    the storage of its ``.grad`` once accumulated (None otherwise)."""

    __slots__ = ("name", "size", "trainable", "grad", "es")

    def __init__(self, name: str, size: int, trainable: bool = True, es: int = 4):
        self.name = name
        self.es = es
        self.size = vec(size)
        self.trainable = trainable
        self.grad: St | None = None


class CandBlock:
    """Many candidates at once, as arrays: ``tot`` (k, NB), ``cats`` (k, len(CATS), NB), ``count`` (k,) (what a
    vectorized replay records between two markers)."""

    __slots__ = ("tot", "cats", "count")

    def __init__(self, tot, cats, count):
        self.tot, self.cats, self.count = tot, cats, count


class PhaseResult:
    """What one simulated phase saw: the live bytes at every local maximum, as ``(total, per-category)``
    vectors (categories in :data:`CATS` order; candidates that another dominates component-wise are
    dropped), and the live bytes at its end (same form). ``candidates``: snapshots ``(total, per-category,
    live allocations)`` and :class:`CandBlock` s."""

    __slots__ = ("tot", "cats", "count", "end", "_cmax", "_obj")

    def __init__(self, candidates: list, end: tuple):
        snaps = [c for c in candidates if not isinstance(c, CandBlock)]
        blocks = [c for c in candidates if isinstance(c, CandBlock)]
        tot = np.array([c[0] for c in snaps], dtype=np.int64).reshape(-1, NB)
        cats = np.array([c[1] for c in snaps], dtype=np.int64).reshape(-1, len(CATS), NB)
        count = np.array([c[2] if len(c) > 2 else 0 for c in snaps], dtype=np.int64)
        if blocks:
            tot = np.concatenate([tot] + [b.tot for b in blocks])
            cats = np.concatenate([cats] + [b.cats for b in blocks])
            count = np.concatenate([count] + [b.count for b in blocks])
        self.tot, self.cats, self.count = _prune(tot, cats, count)
        self.end = end

    @property
    def candidates(self) -> list:
        """The kept candidates (one :class:`CandBlock`), to merge into another phase's."""
        return [CandBlock(self.tot, self.cats, self.count)]

    def peak(self, b: int, s: int) -> tuple[int, tuple]:
        """``(peak bytes, (total, per-category) at the peak)`` for batch ``b`` and sequence ``s``."""
        x = basis(b, s)
        i = self.argmax(x)
        return self.at(i, x)[0], (tuple(int(v) for v in self.tot[i]),
                                  tuple(tuple(int(v) for v in c) for c in self.cats[i]))

    def _exact(self, x):
        """``(tot, cats, x)`` as arrays whose dot products are exact: int64 while no product or sum can pass
        2**63, else Python integers (dtype object; slower, for shapes like a batch of 10**12)."""
        xs = [int(v) for v in x]
        if not hasattr(self, "_cmax"):
            self._cmax = max(int(np.abs(self.tot).max(initial=0)), int(np.abs(self.cats).max(initial=0)))
        if self._cmax * sum(abs(v) for v in xs) < _INT64_SAFE:
            return self.tot, self.cats, np.array(xs, dtype=np.int64)
        if not hasattr(self, "_obj"):
            self._obj = (self.tot.astype(object), self.cats.astype(object))
        return self._obj[0], self._obj[1], np.array(xs, dtype=object)

    def argmax(self, x) -> int:
        """Index of the peak candidate for the basis values ``x`` (:func:`basis`: a tuple or a vector)."""
        tot, _, xv = self._exact(x)
        return int((tot @ xv).argmax())

    def at(self, i: int, x) -> tuple[int, list[int], int]:
        """(total, bytes per category, live activation/transient allocations) of candidate ``i`` for basis
        values ``x``."""
        tot, cats, xv = self._exact(x)
        return int(tot[i] @ xv), [int(v) for v in cats[i] @ xv], int(self.count[i])


def _prune(tot, cats, count):
    """Drop duplicates and candidates dominated component-wise by one of the largest ones (sizes are never
    negative, so a dominated candidate is never the peak for any batch shape)."""
    if len(tot) <= 1:
        return tot, cats, count
    tot, idx = np.unique(tot, axis=0, return_index=True)
    cats, count = cats[idx], count[idx]
    order = np.argsort(-tot.sum(axis=1), kind="stable")
    tot, cats, count = tot[order], cats[order], count[order]
    keep = np.ones(len(tot), dtype=bool)
    for start in range(0, len(tot), 64):
        top = tot[start:start + 64][keep[start:start + 64]]
        if not len(top):
            continue
        dom = (tot[:, None, :] <= top[None, :, :]).all(-1)  # dom[i, j]: candidate i <= top j
        same = (tot[:, None, :] == top[None, :, :]).all(-1)
        keep &= ~(dom & ~same).any(1)
    return tot[keep], cats[keep], count[keep]


# ------------------------------------------------------------------------------------------------- the simulator
class Sim:
    """See the module docstring. Callers allocate and free storages (:meth:`alloc`, :meth:`decref`), mark
    phases (:meth:`phase`) and read :attr:`results`; ``hooks`` (``pre_accumulate`` / ``post_accumulate``:
    ``fn(sim, param)``) run where a replayed backward delivers a parameter's gradient."""

    def __init__(self):
        self.live = [0] * NB
        self.live_cat = {c: [0] * NB for c in CATS}
        self.rising = False
        self.cands: list = []
        self.results: dict[str, PhaseResult] = {}
        self.phase_name: str | None = None
        self.params: dict[str, Param] = {}
        self.in_forward = False
        self.hooks: dict[str, Callable] = {}
        self.live_n = 0

    # ---------------------------------------------------------------- bytes
    def _add(self, st: St, sign: int) -> None:
        s = st.size
        live = self.live
        lc = self.live_cat[st.cat]
        for i in range(NB):
            live[i] += sign * s[i]
            lc[i] += sign * s[i]
        if st.cat in _COUNTED:
            self.live_n += sign

    def _snap(self) -> tuple:
        lc = self.live_cat
        return (tuple(self.live), tuple(tuple(lc[c]) for c in CATS), self.live_n)

    def alloc(self, size: Vec, cat: str | None = None) -> St:
        """A new storage of ``size`` bytes (reference count 1)."""
        st = St(size, cat or ("act" if self.in_forward else "tmp"))
        self._add(st, +1)
        self.rising = True
        return st

    def incref(self, st: St | None) -> None:
        if st is not None:
            st.refs += 1

    def decref(self, st: St | None) -> None:
        if st is None:
            return
        st.refs -= 1
        if st.refs == 0:
            if self.rising:
                self.cands.append(self._snap())
                self.rising = False
            self._add(st, -1)

    def tmp(self, *sizes: Vec) -> None:
        """Allocate storages and free them again in reverse order (a formula's temporaries)."""
        sts = [self.alloc(s) for s in sizes]
        for st in reversed(sts):
            self.decref(st)

    def recat(self, st: St, cat: str) -> None:
        self._add(st, -1)
        st.cat = cat
        self._add(st, +1)

    # ---------------------------------------------------------------- phases
    def phase(self, name: str | None) -> None:
        """End the current phase (recording its result) and start ``name``."""
        if self.phase_name is not None:
            if self.rising:
                self.cands.append(self._snap())
            self.cands.append(self._snap())  # the phase's start and end levels matter too
            self.results[self.phase_name] = PhaseResult(self.cands, self._snap())
        self.phase_name = name
        self.cands = [self._snap()]
        self.rising = False
        self.in_forward = bool(name) and name.endswith("forward")

    # ---------------------------------------------------------------- parameters and tensors
    def param(self, name: str, nbytes: int, trainable: bool = True, es: int = 4) -> Param:
        p = self.params.get(name)
        if p is None:
            p = self.params[name] = Param(name, nbytes, trainable, es)
        return p

    def const(self, size: Vec, cat: str | None = None) -> Var:
        """A tensor held by Python (a batch tensor): allocated now."""
        return Var(self.alloc(size, cat), size)

    def drop(self, *vs: Var | None) -> None:
        """Python lets go of these tensors (a variable rebound or a function returning)."""
        for v in vs:
            if v is not None and v.alive:
                v.alive = False
                self.decref(v.st)

    def zero_grad(self) -> None:
        for p in self.params.values():
            if p.grad is not None:
                self.decref(p.grad)
                p.grad = None


__all__ = ["BASIS", "CATS", "CandBlock", "NB", "Param", "PhaseResult", "Sim", "St", "Var", "ZERO", "basis", "vadd", "veval",
           "vec", "vsub"]
