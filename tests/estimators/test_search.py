"""estimators.search.largest: the largest n with ok(n), for a predicate true up to a point."""
from __future__ import annotations

import pytest

from optimem.estimators.search import largest


@pytest.mark.parametrize("answer", [0, 1, 2, 3, 7, 8, 9, 100, 4095, 4096])
def test_largest_finds_the_boundary_with_few_calls(answer):
    calls = []

    def ok(n):
        calls.append(n)
        return n <= answer

    assert largest(ok, 4096) == answer
    assert len(calls) <= 2 * max(answer, 2).bit_length() + 2
    assert all(1 <= n <= 4096 for n in calls)


def test_largest_stops_at_the_limit_and_passes_exceptions_through():
    assert largest(lambda n: True, 1000) == 1000

    def unknown(n):
        raise LookupError("cannot say")

    with pytest.raises(LookupError):
        largest(unknown, 10)
