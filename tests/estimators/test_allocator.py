"""The CUDA caching allocator's replay (estimators/allocator.py) on sequences whose outcome
c10/cuda/CUDACachingAllocator.cpp decides (round_size, get_allocation_size, get_free_block, should_split,
free_block's merging, the retry after a failed cudaMalloc, expandable segments). Pure Python: no GPU."""
import pytest

from optimem.estimators.allocator import (AllocatorConfig, CachingAllocator, OutOfMemory, allocation_size, replay,
                                          round_size)
from optimem.estimators.errors import UserError

MIB = 1 << 20


def test_round_size_512_and_power2_divisions():
    assert [round_size(n) for n in (1, 512, 513, 1024 + 1)] == [512, 512, 1024, 1536]
    four = AllocatorConfig(roundup_power2_divisions=(4,))
    assert round_size(5 * MIB + 1, four) == 6 * MIB      # 4 MiB..8 MiB in 1 MiB steps
    assert round_size(4 * MIB, four) == 4 * MIB          # a power of two stays
    assert round_size(1200, four) == 1536                # not above 512 x 4: plain 512 rounding


def test_allocation_size_per_pool():
    assert allocation_size(512) == 2 * MIB and allocation_size(MIB) == 2 * MIB
    assert allocation_size(MIB + 512) == 20 * MIB and allocation_size(10 * MIB - 512) == 20 * MIB
    assert allocation_size(10 * MIB) == 10 * MIB and allocation_size(12 * MIB + 512) == 14 * MIB


def test_small_pool_packs_2mib_segments():
    r = replay([("a", i, 1000) for i in range(2048)])   # 2048 x 1024 B = exactly one 2 MiB segment
    assert (r.max_allocated, r.max_reserved, r.segments) == (2 * MIB, 2 * MIB, 1)
    r = replay([("a", i, 1000) for i in range(2049)])
    assert r.max_reserved == 4 * MIB


def test_mid_sizes_share_a_20mib_segment():
    r = replay([("a", 0, 3 * MIB // 2), ("a", 1, 3 * MIB // 2)])
    assert (r.max_reserved, r.segments, r.max_allocated) == (20 * MIB, 1, 3 * MIB)


def test_no_split_when_rest_is_at_most_1mib():
    # a 10 MiB segment, freed, then 9.5 MiB: best fit takes the whole block (rest 0.5 MiB is not split off)
    a = CachingAllocator()
    a.malloc(0, 10 * MIB)
    a.free(0)
    a.malloc(1, 19 * MIB // 2)
    assert a.stats.allocated == 10 * MIB and a.stats.reserved == 10 * MIB


def test_fragmentation_needs_a_new_segment():
    # A, B take 8 MiB each of one 20 MiB segment (rest 4 MiB); A freed: free blocks 8 and 4 MiB, both too small
    r = replay([("a", 0, 8 * MIB), ("a", 1, 8 * MIB), ("f", 0), ("a", 2, 10 * MIB)])
    assert r.max_reserved == 30 * MIB and r.segments == 2
    # freeing B merges A, B and the rest back into the whole 20 MiB block: 10 MiB fits it
    r = replay([("a", 0, 8 * MIB), ("a", 1, 8 * MIB), ("f", 0), ("f", 1), ("a", 2, 10 * MIB)])
    assert r.max_reserved == 20 * MIB and r.segments == 1


def test_best_fit_takes_the_smallest_block():
    a = CachingAllocator()
    for h, n in enumerate((40, 24, 30)):
        a.malloc(h, n * MIB)
    for h in range(3):
        a.free(h)
    a.malloc(9, 23 * MIB)   # fits 24, 30, 40: takes 24 (rest 1 MiB: not split)
    assert a.stats.allocated == 24 * MIB and a.stats.reserved == 94 * MIB


def test_max_split_size_keeps_oversize_blocks_whole():
    tape = [("a", 0, 100 * MIB), ("f", 0), ("a", 1, 30 * MIB)]
    assert replay(tape).max_reserved == 100 * MIB                 # split: 30 MiB out of the cached 100 MiB
    limited = AllocatorConfig.parse("max_split_size_mb:64")
    assert replay(tape, limited).max_reserved == 130 * MIB       # an oversize block never serves a small request
    # an oversize request takes a cached oversize block only when it is less than 20 MiB larger
    assert replay([("a", 0, 100 * MIB), ("f", 0), ("a", 1, 90 * MIB)], limited).max_reserved == 100 * MIB
    assert replay([("a", 0, 100 * MIB), ("f", 0), ("a", 1, 70 * MIB)], limited).max_reserved == 170 * MIB


def test_failed_cudamalloc_frees_the_cache_and_retries():
    tape = [("a", 0, 60 * MIB), ("f", 0), ("a", 1, 70 * MIB)]
    r = replay(tape, capacity=100 * MIB)
    assert (r.max_reserved, r.reserved_end, r.alloc_retries) == (70 * MIB, 70 * MIB, 1)
    assert replay(tape).max_reserved == 130 * MIB
    with pytest.raises(OutOfMemory):
        replay([("a", 0, 60 * MIB), ("a", 1, 70 * MIB)], capacity=100 * MIB)


def test_empty_cache_returns_unsplit_segments():
    r = replay([("a", 0, 60 * MIB), ("a", 1, MIB // 2), ("f", 0), ("f", 1), ("e",)])
    assert r.max_reserved == 62 * MIB and r.reserved_end == 0


def test_expandable_segments_grow_by_20mib_pages():
    cfg = AllocatorConfig.parse("expandable_segments:True")
    r = replay([("a", 0, 30 * MIB), ("a", 1, 5 * MIB)], cfg)
    assert r.max_reserved == 40 * MIB and r.segments == 1     # 2 pages; 5 MiB fits the free 10 MiB at the end
    r = replay([("a", 0, 30 * MIB), ("a", 1, 5 * MIB), ("a", 2, 50 * MIB)], cfg)
    assert r.max_reserved == 100 * MIB                         # the free 5 MiB at the end + 3 more pages
    # the fragmentation case above: the 10 MiB request extends the segment instead of a new 10 MiB cudaMalloc
    r = replay([("a", 0, 8 * MIB), ("a", 1, 8 * MIB), ("f", 0), ("a", 2, 10 * MIB)], cfg)
    assert r.max_reserved == 40 * MIB


def test_alloc_conf_parsing():
    c = AllocatorConfig.parse("max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:4],"
                              "expandable_segments:False,garbage_collection_threshold:0.6")
    assert c.max_split_size == 128 * MIB and c.garbage_collection_threshold == 0.6
    assert c.divisions(100 * MIB) == 1 and c.divisions(300 * MIB) == 1 and c.divisions(600 * MIB) == 2 and c.divisions(4 << 30) == 4
    assert AllocatorConfig.parse("") == AllocatorConfig()
    for bad in ("max_split_size_mb:10", "expandable_segments:yes", "roundup_power2_divisions:3",
                "garbage_collection_threshold:1.5", "nonsense:1", "no colon here"):
        with pytest.raises(UserError):
            AllocatorConfig.parse(bad)
