"""One search over whole numbers: the largest ``n`` for which a monotone predicate still holds (the largest
batch that fits, the longest sequence, ...). A leaf: no project imports."""
from __future__ import annotations

from collections.abc import Callable


def largest(ok: Callable[[int], bool], limit: int) -> int:
    """The largest ``n`` in ``1..limit`` with ``ok(n)``, for ``ok`` true up to some point and false after it
    (0 when ``ok(1)`` is false): doubling from 1, then bisection, so about ``2 log2(answer)`` calls of ``ok``.
    An exception ``ok`` raises ends the search (callers use one for "cannot say")."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        if ok(limit):
            return limit
        hi = limit
    return bisect(ok, lo, hi)


def bisect(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``n`` in ``lo..hi-1`` with ``ok(n)``, given ``ok(lo)`` and not ``ok(hi)`` (monotone ``ok``)."""
    while hi - lo > 1:  # invariant: ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
