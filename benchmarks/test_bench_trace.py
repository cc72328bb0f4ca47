"""Speed of the traced whole-step estimate (issue 11): the first estimate of a new config (trace + fit + replay,
modules imported), a warm estimate of any shape, and ``bench plan`` over the GPU catalog.

Targets: first estimate of an 8B config < 5 s, of a 70B config < 20 s; warm estimate < 1 ms; ``bench plan``
not more than 2x slower than before the tracer.
"""
import itertools

import pytest

from optimem.estimators import estimate
from optimem.estimators.inventory import build_inventory

BIG = {"8b": "meta-llama/Meta-Llama-3-8B", "70b": "meta-llama/Llama-3.1-70B"}


def _forget_traces() -> None:
    from optimem.estimators.estimate import _phase_model
    from optimem.estimators.peak import forget_traces

    forget_traces()
    _phase_model.cache_clear()


def _warm_imports(model: str) -> None:
    """Import the model's modeling code and torch's meta tables once, outside the timing."""
    build_inventory(model)
    estimate("tiny-llama", "adamw_torch", batch_size=2, seq_len=32, device="cpu")


@pytest.mark.parametrize("size", sorted(BIG))
@pytest.mark.parametrize("batch", [1, 4])
def test_first_estimate(benchmark, monkeypatch, size, batch):
    """A config never traced before: build the model, trace the region of the asked shape (batch 1: three
    traces; batches from 2: five), fit, replay, evaluate -- bf16 parameters, CUDA, sequence 2048 (the on-disk
    cache off: every round traces)."""
    monkeypatch.setenv("OPTIMEM_NO_CACHE", "1")
    model = BIG[size]
    _warm_imports(model)

    def first():
        _forget_traces()
        return estimate(model, "adamw_torch", dtype="bf16", batch_size=batch, seq_len=2048)

    est = benchmark.pedantic(first, rounds=3, iterations=1)
    benchmark.extra_info["peak_bytes"] = est.bytes["peak"]


def test_warm_estimate_any_shape(benchmark):
    """A cached trace: every call another batch size and sequence length (both regions traced beforehand)."""
    model = BIG["8b"]
    estimate(model, "adamw_torch", dtype="bf16", batch_size=1)
    estimate(model, "adamw_torch", dtype="bf16", batch_size=2)
    shapes = itertools.cycle([(b, s) for b in range(1, 33) for s in (256, 512, 1000, 2048, 4096)])

    def one():
        b, s = next(shapes)
        return estimate(model, "adamw_torch", dtype="bf16", batch_size=b, seq_len=s)

    benchmark(one)


def _plan_args(model: str):
    from optimem.harness.cli import build_parser

    return build_parser().parse_args(["plan", "--model", model, "--gpus", "all", "--no-calibrate"])


def plan_catalog(model: str, cold: bool = True) -> dict:
    """What ``bench plan --model MODEL --gpus all --no-calibrate`` computes (its default optimizers,
    checkpointing searched on and off, every catalog GPU), with the trace caches emptied first when ``cold``."""
    from optimem.estimators import step_memory as SM
    from optimem.harness.commands.plan import build_plan

    if cold:
        _forget_traces()
        SM._step_memory_cached.cache_clear()
    return build_plan(_plan_args(model))


def test_plan_gpu_catalog(benchmark, monkeypatch):
    """``bench plan`` of an 8B model over the whole GPU catalog, traces cold (the on-disk cache off; run the same
    function on the commit before the tracer for the 2x comparison)."""
    monkeypatch.setenv("OPTIMEM_NO_CACHE", "1")
    _warm_imports(BIG["8b"])
    plan = benchmark.pedantic(plan_catalog, args=(BIG["8b"],), rounds=2, iterations=1)
    benchmark.extra_info["rows"] = len(plan["rows"]) if isinstance(plan, dict) and "rows" in plan else None
