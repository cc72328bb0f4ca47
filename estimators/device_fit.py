"""Whether a setup fits a GPU by what the device holds: the caching allocator's replayed reserve plus the CUDA
context against the memory the GPU reports (bytes).

For one process on a CUDA device the estimate replays the step's allocations through the caching allocator
(``estimators/allocator.py``): the step fits when its ``max_memory_reserved`` (cuBLAS workspace included) fits
the GPU's reported memory less its CUDA context (the GPU catalog's ``context_gib``), or, replayed with that
capacity, the allocator's cache flushes and retries get every allocation through, as the allocator does before
it raises out-of-memory. No headroom fraction is assumed there. The replay models one process: sharded setups (DDP, ZeRO, FSDP) keep the tensor-peak budget with
its headroom (:meth:`~optimem.estimators.gpus.GPU.budget`).

The searches use the cheap tensor-peak search first: reserved memory is never below the tensor peak, so the
largest micro-batch (or sequence) whose tensor peak fits the usable memory bounds the answer from above, and
only a few replays below that bound decide it.
"""
from __future__ import annotations

import functools
from dataclasses import replace

from .estimate import estimate
from .gpus import GPU
from .search import bisect
from .setup import TrainingSetup
from .step_memory import max_micro_batch, max_seq_len, step_memory


def by_reserve(setup: TrainingSetup) -> bool:
    """Whether ``setup`` is fitted by the replayed reserve (one process on CUDA) rather than a headroom budget."""
    return setup.sharding == "none" and setup.num_processes == 1 and setup.estimate_device == "cuda"


@functools.lru_cache(maxsize=65536)
def reserved_on(setup: TrainingSetup, batch: int, capacity: int) -> int | None:
    """The caching allocator's most reserved bytes for micro-batch ``batch`` of ``setup`` within ``capacity`` bytes
    (:meth:`~optimem.estimators.estimate.Estimate.reserve_within`; None: it runs out of memory there)."""
    return estimate(setup, batch_size=batch, device="cuda").reserve_within(capacity)


def fits_on(setup: TrainingSetup, batch: int, gpu: GPU, headroom: float) -> bool:
    """Whether micro-batch ``batch`` of ``setup`` fits ``gpu``: one process on CUDA, the caching allocator's
    replay runs within the reported memory less the context; sharded, the per-GPU tensor peak within the
    headroom budget."""
    if by_reserve(setup):
        return reserved_on(setup, batch, gpu.usable_bytes) is not None
    return step_memory(setup, batch).peak <= gpu.budget(headroom)


def budget_of(setup: TrainingSetup, gpu: GPU, headroom: float) -> int:
    """What the fit compares with: usable memory for the reserve, else the headroom budget (bytes)."""
    return gpu.usable_bytes if by_reserve(setup) else gpu.budget(headroom)


def _walk_down(ok, start: int) -> int:
    """The largest ``n`` in ``1..start`` with ``ok(n)`` (monotone: true up to some point), checking ``start``
    first and galloping down from it: few calls when the answer is near ``start``."""
    if start < 1:
        return 0
    if ok(start):
        return start
    hi, step = start, 1  # invariant: not ok(hi)
    while True:
        lo = hi - step
        if lo < 1:
            if not ok(1):
                return 0
            lo = 1
            break
        if ok(lo):
            break
        hi, step = lo, step * 2
    return bisect(ok, lo, hi)


def max_micro_batch_on(setup: TrainingSetup, gpu: GPU, headroom: float) -> int:
    """The largest micro-batch of ``setup`` that fits ``gpu`` (:func:`fits_on`; 0: not even 1)."""
    if not by_reserve(setup):
        return max_micro_batch(setup, gpu.budget(headroom))
    bound = max_micro_batch(setup, gpu.usable_bytes)
    return _walk_down(lambda b: fits_on(setup, b, gpu, headroom), bound)


def max_seq_len_on(setup: TrainingSetup, batch: int, gpu: GPU, headroom: float, limit: int | None = None) -> int:
    """The longest sequence of ``setup`` at micro-batch ``batch`` that fits ``gpu`` (0: not even 1 token)."""
    if not by_reserve(setup):
        return max_seq_len(setup, batch, gpu.budget(headroom), limit)
    bound = max_seq_len(setup, batch, gpu.usable_bytes, limit)
    return _walk_down(lambda n: fits_on(replace(setup, seq_len=n), batch, gpu, headroom), bound)


__all__ = ["budget_of", "by_reserve", "fits_on", "max_micro_batch_on", "max_seq_len_on", "reserved_on"]
