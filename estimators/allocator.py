"""PyTorch's CUDA caching allocator, replayed in pure Python (bytes): what ``max_memory_reserved`` becomes.

A rule written from the source, not a measurement: ``c10/cuda/CUDACachingAllocator.cpp`` (pytorch/pytorch,
``DeviceCachingAllocator``) and ``c10/core/CachingDeviceAllocator.h`` / ``CUDAAllocatorConfig`` of the torch 2.x
line. What it does, and what :class:`CachingAllocator` does the same way:

* ``round_size``: a request is rounded up to a multiple of ``kMinBlockSize`` = 512 B (at least 512), or, with
  ``roundup_power2_divisions`` N > 1 for its size and a size above ``512 * N``, up to the next of N equal
  divisions of its power-of-two interval (``roundup_power2_next_division``; a power of two stays as it is).
* ``get_pool``: rounded sizes up to ``kSmallSize`` = 1 MiB go to the small pool, the rest to the large pool.
* ``get_allocation_size``: a new segment (``cudaMalloc``) is 2 MiB (``kSmallBuffer``) for the small pool,
  20 MiB (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), else the size rounded up to
  2 MiB (``kRoundLarge``).
* ``get_free_block``: best fit -- the smallest free block of the pool at least as large (ties: the lowest
  address; pools are ordered by (stream, size, address)); with ``max_split_size`` a request below it never
  takes a block at or above it, and a request at or above it only takes a block smaller than request +
  20 MiB.
* ``should_split``: the rest of the found block becomes a free block of its own when it is at least 512 B
  (small pool, or expandable segments), or, in the large pool, when the request is below ``max_split_size``
  and the rest is more than 1 MiB; otherwise the whole block is handed out (its ``allocated_bytes`` count
  the whole block).
* ``free_block``: a freed block merges with free neighbours of its segment and goes back to its pool; a
  segment is returned to the driver only by ``empty_cache`` or when ``cudaMalloc`` fails.
* ``malloc``'s retries when ``cudaMalloc`` fails (``capacity`` given): ``release_available_cached_blocks``
  (only with ``max_split_size``: free unsplit cached blocks at or above it, smallest sufficient one first,
  else the largest ones until enough), then ``release_cached_blocks`` (every unsplit cached segment), then
  one more try (``num_alloc_retries``); then out of memory.
* ``garbage_collection_threshold`` (only active when a memory fraction is set, ``set_fraction``: pass
  ``fraction``): before a ``cudaMalloc``, when reserved memory is above threshold x allowed memory, unsplit
  cached large blocks whose age (``get_free_block`` calls since they were cached) is at least the average
  are released until the excess is reclaimed.
* ``expandable_segments``: one segment per pool that grows by mapping 2 MiB (small pool) or 20 MiB (large
  pool) pages at its end (``try_allocate_expandable_block``); splitting keeps any rest of 512 B or more.

Left out (documented, not modelled): several streams (``record_stream`` delays a free until the other stream's
work is done; one stream is assumed), NCCL's and cuDNN's own buffers, CUDA graphs' private pools, IPC, and the
gaps the driver may leave between segments. The result is the allocator's bookkeeping; what ``nvidia-smi``
shows adds the CUDA context (``estimators/cuda_overhead.py``).
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from .errors import UserError

MIB = 1 << 20
K_MIN_BLOCK = 512
K_SMALL_SIZE = MIB
K_SMALL_BUFFER = 2 * MIB
K_LARGE_BUFFER = 20 * MIB
K_MIN_LARGE_ALLOC = 10 * MIB
K_ROUND_LARGE = 2 * MIB
NO_LIMIT = (1 << 64) - 1
"""``max_split_size``'s default (``std::numeric_limits<size_t>::max()``)."""
ROUNDUP_START = MIB
ROUNDUP_INTERVALS = 16
"""``kRoundUpPowerOfTwoStart`` / ``kRoundUpPowerOfTwoIntervals``: per-interval divisions start at 1 MiB."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` options that change what the allocator reserves (sizes in bytes):
    ``max_split_size`` (None: no limit), ``roundup_power2_divisions`` (one number for every size, or 16, one per
    power-of-two interval from 1 MiB up: ``CUDAAllocatorConfig::roundup_power2_divisions``),
    ``expandable_segments``, ``garbage_collection_threshold`` (0: off)."""

    max_split_size: int | None = None
    roundup_power2_divisions: tuple[int, ...] = (0,)
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> AllocatorConfig:
        """Read a ``PYTORCH_CUDA_ALLOC_CONF`` string (``key:value`` pairs separated by commas; the keys that do
        not change reserved memory are accepted and ignored). A malformed value is a :class:`UserError`."""
        if not text or not text.strip():
            return cls()
        out: dict = {}
        for key, value in _pairs(text):
            if key == "max_split_size_mb":
                mb = _number(key, value, int)
                if mb <= K_LARGE_BUFFER // MIB:
                    raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: max_split_size_mb must be more than "
                                    f"{K_LARGE_BUFFER // MIB} (MiB), not {value}")
                out["max_split_size"] = mb * MIB
            elif key == "roundup_power2_divisions":
                out["roundup_power2_divisions"] = _divisions(value)
            elif key == "expandable_segments":
                if value not in ("True", "False"):
                    raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: expandable_segments must be True or False, not {value}")
                out["expandable_segments"] = value == "True"
            elif key == "garbage_collection_threshold":
                t = _number(key, value, float)
                if not 0.0 < t < 1.0:
                    raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: garbage_collection_threshold must be between 0.0 and "
                                    f"1.0 (exclusive), not {value}")
                out["garbage_collection_threshold"] = t
            elif key not in ("backend", "release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
                             "pinned_num_register_threads", "pinned_use_background_threads",
                             "graph_capture_record_stream_reuse", "per_process_memory_fraction"):
                raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: unknown option {key!r} (known: max_split_size_mb, "
                                "roundup_power2_divisions, expandable_segments, garbage_collection_threshold, ...)")
        return cls(**out)

    def divisions(self, size: int) -> int:
        """``roundup_power2_divisions(size)``: the divisions of ``size``'s power-of-two interval."""
        d = self.roundup_power2_divisions
        if len(d) == 1:
            return d[0]
        log_size = size.bit_length() - 1
        start = ROUNDUP_START.bit_length() - 1
        index = log_size - start if log_size > start else 0
        return d[min(index, ROUNDUP_INTERVALS - 1)]

    @property
    def split_limit(self) -> int:
        return NO_LIMIT if self.max_split_size is None else self.max_split_size


def _pairs(text: str) -> list[tuple[str, str]]:
    """``a:1,b:[256:1,>:2]`` -> ``[("a", "1"), ("b", "[256:1,>:2]")]`` (brackets keep their commas)."""
    out = []
    for m in re.finditer(r"\s*([A-Za-z_0-9]+)\s*:\s*(\[[^\]]*\]|[^,]*)\s*(?:,|$)", text):
        out.append((m.group(1), m.group(2).strip()))
    if not out or sum(len(m.group(0)) for m in re.finditer(r"\s*([A-Za-z_0-9]+)\s*:\s*(\[[^\]]*\]|[^,]*)\s*(?:,|$)",
                                                           text)) != len(text):
        raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: cannot read {text!r} (expected key:value pairs separated by "
                        "commas, e.g. expandable_segments:True,max_split_size_mb:128)")
    return out


def _number(key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: {key} must be a number, not {value!r}") from None


def _check_power2(value: str, n: int) -> int:
    if n != 0 and (n < 0 or n & (n - 1)):
        raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: roundup_power2_divisions must be a power of 2, not {value}")
    return n


def _divisions(value: str) -> tuple[int, ...]:
    """``4`` (every size) or ``[256:1,512:2,>:4]`` (interval start in MiB, a power of two -> divisions;
    ``>`` for the intervals after the last one named; the first one named covers the intervals below it, others
    only their own), as ``CUDAAllocatorConfig::parseRoundUpPower2Divisions`` reads them."""
    if not value.startswith("["):
        return (_check_power2(value, _number("roundup_power2_divisions", value, int)),)
    table = [0] * ROUNDUP_INTERVALS
    last = -1
    start = ROUNDUP_START.bit_length() - 1
    for part in filter(None, (p.strip() for p in value[1:-1].split(","))):
        k, _, v = part.partition(":")
        n = _check_power2(v, _number("roundup_power2_divisions", v.strip(), int))
        if k.strip() == ">":
            for i in range(last + 1, ROUNDUP_INTERVALS):
                table[i] = n
            last = ROUNDUP_INTERVALS - 1
            continue
        mb = _number("roundup_power2_divisions", k.strip(), int)
        if mb <= 0 or mb & (mb - 1):
            raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: roundup_power2_divisions' sizes must be powers of 2 (MiB), "
                            f"not {k.strip()}")
        index = max(0, (mb * MIB).bit_length() - 1 - start)
        index = min(index, ROUNDUP_INTERVALS - 1)
        if last < 0:  # the first size named also covers every interval below it
            for i in range(index):
                table[i] = n
        table[index] = n
        last = index
    return tuple(table)


def round_size(size: int, config: AllocatorConfig = AllocatorConfig()) -> int:
    """``round_size``: the bytes a request of ``size`` takes (see the module docstring)."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    div = config.divisions(size)
    if div > 1 and size > K_MIN_BLOCK * div:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)
        step = floor >> (div.bit_length() - 1)
        if step == 0:
            return floor << 1
        low = size & ~(step - 1)
        return size if low == size else low + step
    return -(-size // K_MIN_BLOCK) * K_MIN_BLOCK


def allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc`` gets for a rounded request of ``size``."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


class _Block:
    __slots__ = ("addr", "size", "small", "allocated", "prev", "next", "seg", "age")

    def __init__(self, addr: int, size: int, small: bool, seg: int):
        self.addr, self.size, self.small, self.seg = addr, size, small, seg
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.age = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def key(self) -> tuple[int, int]:
        return (self.size, self.addr)


class OutOfMemory(Exception):
    """The replayed allocator could not get a segment within ``capacity`` (as ``torch.OutOfMemoryError``)."""


@dataclass
class AllocatorStats:
    """The allocator's counters (bytes): current and peak ``allocated`` (blocks handed out, rounded) and
    ``reserved`` (segments held), ``segments`` and ``alloc_retries`` (``num_alloc_retries``)."""

    allocated: int = 0
    reserved: int = 0
    max_allocated: int = 0
    max_reserved: int = 0
    segments: int = 0
    alloc_retries: int = 0
    peaks: dict = field(default_factory=dict)


class CachingAllocator:
    """One device's ``DeviceCachingAllocator`` on one stream (see the module docstring). ``capacity``: bytes
    the driver can give (None: unlimited); ``fraction``: ``set_per_process_memory_fraction`` (what
    ``garbage_collection_threshold`` is relative to)."""

    def __init__(self, config: AllocatorConfig = AllocatorConfig(), capacity: int | None = None,
                 fraction: float | None = None):
        self.config = config
        self.capacity = capacity
        self.allowed = None if fraction is None or capacity is None else int(capacity * fraction)
        self.stats = AllocatorStats()
        self._free: dict[bool, list] = {True: [], False: []}  # pool (small?) -> sorted [(size, addr, block)]
        self._next_addr = 1 << 32
        self._next_seg = 0
        self._live: dict[int, _Block] = {}
        self._expand: dict[bool, _Block | None] = {True: None, False: None}  # expandable: the segment's last block
        self._divisions = any(d > 1 for d in config.roundup_power2_divisions)
        self._limit = config.split_limit
        self._gc = self.allowed is not None and config.garbage_collection_threshold > 0
        self._split_any = config.expandable_segments

    # ------------------------------------------------------------------------------------ pools
    def _insert(self, b: _Block) -> None:
        b.age = 0
        bisect.insort(self._free[b.small], (b.size, b.addr, b))

    def _remove(self, b: _Block) -> None:
        lst = self._free[b.small]
        i = bisect.bisect_left(lst, (b.size, b.addr))
        if i >= len(lst) or lst[i][2] is not b:
            raise AssertionError("allocator replay: a free block is missing from its pool")
        del lst[i]

    # ------------------------------------------------------------------------------------ segments
    def _cuda_malloc(self, nbytes: int) -> bool:
        if self.capacity is not None and self.stats.reserved + nbytes > (self.allowed or self.capacity):
            return False
        self.stats.reserved += nbytes
        self.stats.segments += 1
        self.stats.max_reserved = max(self.stats.max_reserved, self.stats.reserved)
        return True

    def _new_segment(self, nbytes: int, small: bool) -> _Block:
        b = _Block(self._next_addr, nbytes, small, self._next_seg)
        self._next_addr += nbytes + (1 << 30)  # segments never touch: blocks of two segments never merge
        self._next_seg += 1
        return b

    def _release(self, b: _Block) -> None:
        """``release_block``: an unsplit cached segment goes back to the driver."""
        self._remove(b)
        self.stats.reserved -= b.size
        self.stats.segments -= 1

    def _release_available(self, size: int, small: bool) -> bool:
        """``release_available_cached_blocks``: with ``max_split_size``, free oversize cached blocks."""
        limit = self._limit
        if limit == NO_LIMIT:
            return False
        lst = [e[2] for e in self._free[small] if e[2].size >= limit and not e[2].is_split()]
        fit = [b for b in lst if b.size >= size]
        if fit:
            self._release(fit[0])
            return True
        total = 0
        for b in sorted(lst, key=lambda x: (-x.size, -x.addr)):
            if total >= size:
                break
            total += b.size
            self._release(b)
        return total >= size

    def _release_cached(self) -> bool:
        """``release_cached_blocks``: every unsplit cached segment of both pools goes back (expandable
        segments unmap their free pages)."""
        for small in (True, False):
            if self.config.expandable_segments:
                self._unmap_tail(small)
                continue
            for _, _, b in list(self._free[small]):
                if not b.is_split():
                    self._release(b)
        return True

    def _garbage_collect(self) -> None:
        """``garbage_collect_cached_blocks`` (see the module docstring)."""
        threshold = int(self.config.garbage_collection_threshold * self.allowed)
        if self.stats.reserved <= threshold:
            return
        target = self.stats.reserved - threshold
        blocks = [e[2] for e in self._free[False] if not e[2].is_split()]
        if not blocks:
            return
        total_age = sum(b.age for b in blocks)
        count = len(blocks)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            threshold_age = total_age / count
            freed = False
            for b in [e[2] for e in self._free[False]]:
                if not b.is_split() and b.age >= threshold_age:
                    freed = True
                    reclaimed += b.size
                    total_age -= b.age
                    count -= 1
                    self._release(b)

    # ------------------------------------------------------------------------------------ expandable segments
    def _page(self, small: bool) -> int:
        return K_SMALL_BUFFER if small else K_LARGE_BUFFER

    def _expandable_block(self, size: int, small: bool) -> _Block | None:
        """``try_allocate_expandable_block``: map pages at the pool's one segment's end until a free block there
        holds ``size`` (the free block at the end grows; else a new block follows the last one)."""
        tail = self._expand[small]
        have = tail.size if tail is not None and not tail.allocated else 0
        page = self._page(small)
        pages = -(-(size - have) // page) * page
        if not self._cuda_malloc(pages):
            return None
        if tail is not None:
            self.stats.segments -= 1  # still one segment, however many pages it maps
        if tail is None or tail.allocated:
            new = self._new_segment(pages, small) if tail is None else _Block(tail.addr + tail.size, pages, small,
                                                                              tail.seg)
            if tail is not None:
                new.prev, tail.next = tail, new
            self._expand[small] = new
            return new
        self._remove(tail)
        tail.size += pages
        return tail

    def _unmap_tail(self, small: bool) -> None:
        """Free whole pages at the end of the pool's expandable segment go back to the driver."""
        tail = self._expand[small]
        if tail is None or tail.allocated:
            return
        pages = tail.size // self._page(small) * self._page(small)
        if pages:
            self._remove(tail)
            tail.size -= pages
            self.stats.reserved -= pages
            if tail.size:
                self._insert(tail)
            elif tail.prev is not None:
                tail.prev.next = None
                self._expand[small] = tail.prev
            else:
                self._expand[small] = None

    # ------------------------------------------------------------------------------------ malloc / free
    def malloc(self, handle: int, nbytes: int) -> None:
        """Allocate ``nbytes`` for ``handle`` (a tensor storage's id)."""
        if nbytes <= 0:
            return
        size = round_size(nbytes, self.config) if self._divisions else -(-nbytes // K_MIN_BLOCK) * K_MIN_BLOCK
        small = size <= K_SMALL_SIZE
        # get_free_block (inlined: this runs once per allocation)
        lst = self._free[small]
        if self._gc:
            for entry in lst:
                entry[2].age += 1
        i = bisect.bisect_left(lst, (size, -1))
        block = None
        if i < len(lst):
            block = lst[i][2]
            limit = self._limit
            if (size < limit <= block.size) or (size >= limit and block.size >= size + K_LARGE_BUFFER):
                block = None
            else:
                del lst[i]
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = self._alloc_block(size, small, False) \
                or (self._release_available(size, small) and self._alloc_block(size, small, False)) \
                or (self._release_cached() and self._alloc_block(size, small, True))
            if block is None:
                raise OutOfMemory(f"tried to allocate {size} bytes with {self.stats.reserved} reserved")
        rest = block.size - size
        if small or self._split_any:
            split = rest >= K_MIN_BLOCK
        else:
            split = size < self._limit and rest > K_SMALL_SIZE
        if split:
            new = _Block(block.addr, size, small, block.seg)
            prev = block.prev
            new.prev, new.next = prev, block
            if prev is not None:
                prev.next = new
            block.prev = new
            block.addr += size
            block.size = rest
            block.age = 0
            bisect.insort(lst, (rest, block.addr, block))
            block = new
        block.allocated = True
        self._live[handle] = block
        st = self.stats
        st.allocated += block.size
        if st.allocated > st.max_allocated:
            st.max_allocated = st.allocated

    def _alloc_block(self, size: int, small: bool, retry: bool) -> _Block | None:
        if retry:
            self.stats.alloc_retries += 1
        if self.config.expandable_segments:
            return self._expandable_block(size, small)
        seg = allocation_size(size)
        if not self._cuda_malloc(seg):
            return None
        return self._new_segment(seg, small)

    def free(self, handle: int) -> None:
        """Free ``handle``'s block: it merges with free neighbours and is cached in its pool."""
        block = self._live.pop(handle, None)
        if block is None:
            return
        block.allocated = False
        self.stats.allocated -= block.size
        lst = self._free[block.small]
        for other in (block.prev, block.next):
            if other is None or other.allocated:
                continue
            i = bisect.bisect_left(lst, (other.size, other.addr))  # _remove, inlined
            if i >= len(lst) or lst[i][2] is not other:
                raise AssertionError("allocator replay: a free block is missing from its pool")
            del lst[i]
            if other is block.prev:
                block.addr = other.addr
                block.prev = other.prev
                if block.prev is not None:
                    block.prev.next = block
            else:
                block.next = other.next
                if block.next is not None:
                    block.next.prev = block
            if self._expand[block.small] is other:
                self._expand[block.small] = block
            block.size += other.size
        block.age = 0
        bisect.insort(lst, (block.size, block.addr, block))

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: every unsplit cached segment goes back to the driver."""
        self._release_cached()

    def mark(self, name: str) -> None:
        """Record the peaks so far under ``name`` and start counting a new phase's peaks."""
        st = self.stats
        st.peaks[name] = (st.max_allocated, st.max_reserved)


@dataclass(frozen=True)
class Replay:
    """What a replayed sequence did (bytes): the peaks of allocated (rounded blocks) and reserved memory, the
    reserved memory at its end, the number of segments then, and how many allocations needed a retry."""

    max_allocated: int
    max_reserved: int
    reserved_end: int
    segments: int
    alloc_retries: int


def replay(tape, config: AllocatorConfig = AllocatorConfig(), capacity: int | None = None) -> Replay:
    """Replay ``tape`` -- ``("a", handle, nbytes)`` allocations, ``("f", handle)`` frees, ``("e",)``
    ``empty_cache`` -- through :class:`CachingAllocator`. Raises :class:`OutOfMemory` when ``capacity`` is
    exceeded."""
    alloc = CachingAllocator(config, capacity)
    for ev in tape:
        k = ev[0]
        if k == "a":
            alloc.malloc(ev[1], ev[2])
        elif k == "f":
            alloc.free(ev[1])
        elif k == "e":
            alloc.empty_cache()
    return _result(alloc)


def replay_arrays(handles: list[int], is_free: list[bool], sizes: list[int],
                  config: AllocatorConfig = AllocatorConfig(), capacity: int | None = None) -> Replay:
    """:func:`replay` of a sequence given as parallel lists (``sizes``: one per allocation, in order)."""
    alloc = CachingAllocator(config, capacity)
    malloc, free = alloc.malloc, alloc.free
    n = iter(sizes)
    for h, f in zip(handles, is_free):
        if f:
            free(h)
        else:
            malloc(h, next(n))
    return _result(alloc)


def _result(alloc: CachingAllocator) -> Replay:
    st = alloc.stats
    return Replay(st.max_allocated, st.max_reserved, st.reserved, st.segments, st.alloc_retries)


__all__ = ["AllocatorConfig", "CachingAllocator", "OutOfMemory", "Replay", "allocation_size", "replay",
           "replay_arrays", "round_size"]
