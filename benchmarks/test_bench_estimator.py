"""Speed of the estimator: inventory build (cold and cached), one estimate, a 10,000-config sweep, and the
meta-model-per-call approach of ``accelerate estimate-memory`` on the same config, in the same run.

Targets (issue 6): 70B inventory < 2 s cold, a full estimate < 1 ms warm, 10,000 estimates < 10 s.
"""
import itertools
import os
import subprocess
import sys

import pytest

from optimem.estimators import estimate, names
from optimem.estimators.catalog import resolve
from optimem.estimators.inventory import _inventory_cached, build_config, build_inventory

BIG = {"8b": "meta-llama/Meta-Llama-3-8B", "70b": "meta-llama/Llama-3.1-70B"}


def _cold(model: str):
    _inventory_cached.cache_clear()
    return build_inventory(model)


@pytest.mark.parametrize("size", sorted(BIG))
def test_inventory_cold(benchmark, size, monkeypatch):
    """A fresh inventory (model built on the meta device; the on-disk cache off), modules already imported."""
    monkeypatch.setenv("OPTIMEM_NO_CACHE", "1")
    build_inventory(BIG[size])  # imports transformers' model module once, outside the timing
    inv = benchmark.pedantic(_cold, args=(BIG[size],), rounds=5, iterations=1)
    benchmark.extra_info["num_params"] = inv.num_params


@pytest.mark.parametrize("size", sorted(BIG))
def test_inventory_from_disk_cache(benchmark, size):
    """The inventory read back from the on-disk cache (a new process's first build_inventory, imports aside)."""
    build_inventory(BIG[size])  # stores it
    inv = benchmark.pedantic(_cold, args=(BIG[size],), rounds=5, iterations=1)
    benchmark.extra_info["num_params"] = inv.num_params


@pytest.mark.parametrize("size", sorted(BIG))
def test_inventory_cached(benchmark, size):
    build_inventory(BIG[size])
    benchmark(build_inventory, BIG[size], "bf16")


def test_inventory_70b_fresh_process(benchmark):
    """A whole new Python process that imports optimem and builds the 70B inventory (imports included; the
    on-disk cache off)."""
    code = "from estimators import build_inventory; build_inventory('meta-llama/Llama-3.1-70B')"
    env = dict(os.environ, OPTIMEM_NO_CACHE="1")
    benchmark.pedantic(subprocess.run, args=([sys.executable, "-c", code],), kwargs={"check": True,
                       "capture_output": True, "env": env}, rounds=3, iterations=1)


def test_inventory_70b_fresh_process_cached(benchmark):
    """The same with the on-disk cache warm: no torch, no transformers."""
    code = "from estimators import build_inventory; build_inventory('meta-llama/Llama-3.1-70B')"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    benchmark.pedantic(subprocess.run, args=([sys.executable, "-c", code],), kwargs={"check": True,
                       "capture_output": True}, rounds=3, iterations=1)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit", "galore_adamw"])
def test_estimate_warm(benchmark, optim):
    kw = {"optim_target_modules": "all-linear"} if optim.startswith("galore") else {}
    estimate(BIG["8b"], optim, dtype="bf16", **kw)
    counter = itertools.count(1)
    benchmark(lambda: estimate(BIG["8b"], optim, dtype="bf16", batch_size=next(counter) % 64 + 1, **kw))


def test_sweep_10000_estimates(benchmark):
    """10,000 estimates: every estimable optimizer x batch sizes x sequence lengths, 8B model, bf16."""
    optims = [n for n in names(include_unavailable=False)
              if not n.startswith("flash_")][:25]
    batches, seqs = range(1, 21), (128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
                                   10240, 12288, 14336, 16384, 20480, 24576, 28672, 32768, 49152, 65536)
    configs = list(itertools.product(optims, batches, seqs))[:10_000]
    assert len(configs) == 10_000

    def sweep():
        _inventory_cached.cache_clear()
        inv = build_inventory(BIG["8b"])
        for optim, b, s in configs:
            kw = {"optim_target_modules": "all-linear"} if ("galore" in optim or "apollo" in optim) else {}
            estimate(inv, optim, dtype="bf16", batch_size=b, seq_len=s, **kw)

    benchmark.pedantic(sweep, rounds=3, iterations=1)
    benchmark.extra_info["configs"] = len(configs)


def _accelerate_style(model: str) -> dict:
    """What ``accelerate estimate-memory`` does per call, minus its Hub lookup: a meta model from the config,
    ``calculate_maximum_sizes``, then its Adam training rule."""
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModel

    config = build_config(resolve(model))
    with init_empty_weights():
        m = AutoModel.from_config(config)
    total, _ = calculate_maximum_sizes(m)
    return estimate_training_usage(total, "float32")


def test_accelerate_estimate_memory_approach(benchmark):
    _accelerate_style(BIG["8b"])
    out = benchmark(_accelerate_style, BIG["8b"])
    benchmark.extra_info["adam_fp32_optimizer_bytes"] = out["optimizer"]
