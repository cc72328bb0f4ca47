"""The event log of one traced micro-step, as plain data, and the polynomial fit of its sizes.

A log is four parallel arrays: ``kind`` (:data:`ALLOC`, :data:`FREE`, :data:`MARK`, :data:`GRAD`), ``a`` and
``b`` (an allocation's storage id and -; a free's storage id; a marker's code and argument; a gradient's
parameter index and storage id, -1 when that storage was born before the log) and, per allocation, its size
in bytes as coefficients of the basis ``(1, B, S, B*S, S*S, B*S*S)`` (``sizes``, one row per allocation, in
order). Storage ids are local to the log (0, 1, ... in allocation order).

:func:`fit_logs` turns logs of the same step traced at several ``(B, S)`` into one: the event sequences must
be identical (same ops in the same order: only sizes may differ), and every allocation's size is solved
exactly (integer coefficients) from the points, then checked against a point the fit did not use.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..memsim import NB, basis

ALLOC, FREE, MARK, GRAD = 0, 1, 2, 3
_KIND = {"a": ALLOC, "f": FREE, "m": MARK, "g": GRAD}
FWD_END = 1
BWD_END = 2
PRE_ACC = 3
"""Marker codes (``MARK`` events): the model's forward returned, ``backward()`` returned, a parameter's tensor
hook ran (its index in ``b``)."""


class FitError(Exception):
    """The traces at different shapes do not line up (the model takes a different path at another batch or
    sequence length) or a size is not a polynomial of the basis."""


class SequenceMismatch(FitError):
    """The traces of a region do not run the same operations in the same order."""


@dataclass
class EventLog:
    """See the module docstring. ``survivors``: ids of storages born in the log and alive at its end that are
    not gradients (the step leaves them behind)."""

    kind: np.ndarray
    a: np.ndarray
    b: np.ndarray
    sizes: np.ndarray
    survivors: tuple[int, ...] = ()
    carried: tuple[int, ...] = ()
    """Sizes (bytes) of storages born before the log and freed in it (left out of the events): state an earlier
    step left on a module, replaced by this one (only a raw log has them; see ``trace_region``)."""

    def __len__(self) -> int:
        return int(len(self.kind))

    @property
    def n_alloc(self) -> int:
        return int(len(self.sizes))

    def same_sequence(self, other: EventLog) -> bool:
        return (len(self) == len(other) and np.array_equal(self.kind, other.kind) and np.array_equal(self.a, other.a)
                and np.array_equal(self.b, other.b))


def _canonical(events: list[tuple]) -> list[tuple]:
    """Runs of consecutive frees sorted by storage id: storages let go together (a dict or a frame cleared)
    may go in another order at another shape, and the order inside a run changes no live total between
    allocations."""
    out: list[tuple] = []
    run: list[tuple] = []
    for e in events:
        if e[0] == "f":
            run.append(e)
            continue
        if run:
            out.extend(sorted(run, key=lambda x: x[1]))
            run = []
        out.append(e)
    out.extend(sorted(run, key=lambda x: x[1]))
    return out


def from_events(events: list[tuple], shapes: list | None = None) -> tuple[EventLog, np.ndarray]:
    """An :class:`EventLog` (sizes not yet fitted: zero) and the allocation sizes in bytes, from a
    :class:`~optimem.estimators.trace.tensor.Recorder`'s raw events; ``shapes``, when given, receives each allocation's
    ``(element size, shape or None)``."""
    events = _canonical(events)
    born = {e[1] for e in events if e[0] == "a"}
    carried = tuple(int(e[2]) for e in events if e[0] == "f" and e[1] not in born)
    if carried:
        events = [e for e in events if not (e[0] == "f" and e[1] not in born)]
    ids: dict[int, int] = {}
    kind = np.empty(len(events), dtype=np.int8)
    a = np.empty(len(events), dtype=np.int64)
    b = np.zeros(len(events), dtype=np.int64)
    nbytes = []
    live: set[int] = set()
    grads: set[int] = set()
    for i, e in enumerate(events):
        k, x, y = e[0], e[1], e[2]
        kk = _KIND[k]
        kind[i] = kk
        if kk == ALLOC:
            sid = ids[x] = len(ids)
            a[i] = sid
            nbytes.append(y)
            live.add(sid)
            if shapes is not None:
                shapes.append(e[3] if len(e) > 3 else (0, None))
        elif kk == FREE:
            sid = ids[x]
            a[i] = sid
            live.discard(sid)
        elif kk == GRAD:
            a[i] = x
            sid = ids.get(y, -1) if y is not None else -1
            b[i] = sid
            if sid >= 0:
                grads.add(sid)
        else:
            a[i] = x
            b[i] = y
    survivors = tuple(sorted(live - grads))
    return EventLog(kind, a, b, np.zeros((len(nbytes), NB), dtype=np.int64), survivors, carried), \
        np.asarray(nbytes, np.int64)


def _inverse(points: list[tuple[int, int]], cols: list[int]) -> tuple[list[list[int]], int]:
    """Integer matrix ``A`` and denominator ``D`` with ``A / D`` the inverse of the basis matrix of ``points``
    restricted to the basis columns ``cols``."""
    n = len(cols)
    m = [[Fraction(basis(b, s)[c]) for c in cols] for b, s in points]
    inv = [[Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    for col in range(n):
        piv = next((r for r in range(col, n) if m[r][col] != 0), None)
        if piv is None:
            raise FitError("the trace points do not determine the polynomial")
        m[col], m[piv] = m[piv], m[col]
        inv[col], inv[piv] = inv[piv], inv[col]
        p = m[col][col]
        m[col] = [x / p for x in m[col]]
        inv[col] = [x / p for x in inv[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
                inv[r] = [x - f * y for x, y in zip(inv[r], inv[col])]
    den = 1
    for row in inv:
        for x in row:
            den = den * x.denominator // np.gcd(den, x.denominator)
    return [[int(x * den) for x in row] for row in inv], den


def fit_sizes(points: list[tuple[int, int]], sizes: list[np.ndarray], cols: list[int]) -> np.ndarray:
    """Integer coefficients (rows: allocations, columns: the full basis) with ``sizes[i] == coef @ basis(points[i])``
    for every point; ``cols``: the basis columns that may be non-zero (as many as points)."""
    A, den = _inverse(points, cols)
    y = np.stack(sizes, axis=1).astype(object)  # (n_alloc, n_points), Python ints: no overflow
    num = y.dot(np.array(A, dtype=object).T)  # (n_alloc, n_cols)
    if any(int(v) % den for v in num.ravel()):
        raise FitError("an allocation's size is not a polynomial in batch and sequence length")
    coef = np.zeros((len(sizes[0]), NB), dtype=np.int64)
    for j, c in enumerate(cols):
        coef[:, c] = (num[:, j] // den).astype(np.int64)
    return coef


_POW = ((0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2))
"""Basis column -> (power of B, power of S)."""
_COL = {p: i for i, p in enumerate(_POW)}


def fit_shapes(points: list[tuple[int, int]], shapes: list[list], cols: list[int]) -> np.ndarray | None:
    """Sizes from the allocations' *shapes*: every dimension is fitted on its own as a polynomial over the
    basis columns ``cols`` (degree one in B and in S: ``1, B, S, B*S``), the size is the element size times
    the product of the dimensions. Four traces (two for batch 1) then suffice where fitting sizes needs six
    (three), since ``S*S`` terms come from two dimensions of length ``S``. None when that does not work (a
    storage that is not exactly its tensor's elements, a dimension that is not such a polynomial, a product
    outside the basis): the caller fits sizes from more traces then."""
    n = len(shapes[0])
    rows: list[tuple[int, int]] = []  # (allocation, dimension) -> row of the dims matrix
    values: list[list[int]] = [[] for _ in points]
    item: list[int] = []
    for i in range(n):
        e0 = shapes[0][i]
        if e0[1] is None:
            return None
        rank = len(e0[1])
        for p in range(len(points)):
            e = shapes[p][i]
            if e[1] is None or len(e[1]) != rank or e[0] != e0[0]:
                return None
            values[p].extend(e[1])
        item.append(e0[0])
        rows.extend((i, j) for j in range(rank))
    if not rows:
        return np.zeros((n, NB), dtype=np.int64)
    try:
        dims = fit_sizes(points, [np.asarray(v, dtype=np.int64) for v in values], cols)
    except FitError:
        return None
    coef = np.zeros((n, NB), dtype=np.int64)
    polys: list[dict] = [{(0, 0): it} for it in item]
    for (i, _), d in zip(rows, dims.tolist()):
        acc: dict = {}
        for (pb, ps), c in polys[i].items():
            for col, dc in enumerate(d):
                if dc:
                    key = (pb + _POW[col][0], ps + _POW[col][1])
                    acc[key] = acc.get(key, 0) + c * dc
        polys[i] = acc
    for i, poly in enumerate(polys):
        for key, c in poly.items():
            if not c:
                continue
            col = _COL.get(key)
            if col is None:
                return None
            coef[i, col] = c
    return coef


def fit_logs(logs: list[EventLog], nbytes: list[np.ndarray], points: list[tuple[int, int]], cols: list[int],
             check: tuple[EventLog, np.ndarray, tuple[int, int]] | None = None, coef: np.ndarray | None = None) -> EventLog:
    """One log whose sizes are polynomials (see the module docstring). ``check``: a log traced at another
    point, which the fitted sizes must reproduce to the byte; ``coef``: sizes already fitted (from shapes)."""
    first = logs[0]
    for other in logs[1:] + ([check[0]] if check else []):
        if not first.same_sequence(other):
            raise SequenceMismatch("the step runs different operations at different batch sizes or sequence lengths")
    if coef is None:
        coef = fit_sizes(points, nbytes, cols)
    if check is not None:
        _, got, (b, s) = check
        want = coef @ np.array(basis(b, s), dtype=np.int64)
        if not np.array_equal(want, got):
            bad = int(np.argmax(want != got))
            raise FitError(f"allocation {bad}: fitted {int(want[bad])} bytes at batch {b} x seq {s}, traced "
                           f"{int(got[bad])}")
    return EventLog(first.kind, first.a, first.b, coef, first.survivors)


__all__ = ["ALLOC", "BWD_END", "FREE", "FWD_END", "GRAD", "MARK", "NB", "PRE_ACC", "EventLog", "FitError", "basis", "fit_logs", "fit_shapes",
           "fit_sizes", "from_events"]
