"""What the harness's trackers cost: one CPU training step (forward, backward, AdamW step) of a fixed
~20M-parameter Llama-style model, plain and under each tracker, in the same run.

Targets (issue 6): the CPU tensor-accounting tracker adds < 10% to the step time; the NVML sampler < 1% on a
GPU (measured only where CUDA and NVML exist).
"""
import pytest
import torch

from optimem.estimators.catalog import ModelSource
from optimem.estimators.inventory import instantiate
from optimem.harness.trackers.rss import RssTracker
from optimem.harness.trackers.tensor_accounting import TensorAccountant

from .test_bench_optimizer_step import BENCH_LLAMA

BATCH, SEQ = 4, 128


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("trk") / "config.json"
    path.write_text(json.dumps(BENCH_LLAMA))
    torch.manual_seed(0)
    model = instantiate(ModelSource(str(path), path), device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(3, BENCH_LLAMA["vocab_size"], (BATCH, SEQ))
    batch = {"input_ids": ids, "labels": ids}

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on: every variant measures the steady state
    return model, opt, step


def _classifier(model, opt):
    from optimem.harness.state_walker import measure_optimizer_state  # noqa: F401 (the accountant's own walker)

    def classify():
        params = list(model.parameters())
        return {"parameters": params, "gradients": [p.grad for p in params if p.grad is not None]}

    return classify


def test_step_plain(benchmark, job):
    benchmark.group = "tracker_overhead"
    _, _, step = job
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)


def test_step_tensor_accounting(benchmark, job):
    """The accountant as the worker uses it: one phase per forward / backward / optimizer step."""
    benchmark.group = "tracker_overhead"
    model, opt, _ = job
    ids = torch.randint(3, BENCH_LLAMA["vocab_size"], (BATCH, SEQ))
    acc = TensorAccountant("cpu", classifier=_classifier(model, opt))

    def step():
        acc.start_phase("forward")
        loss = model(input_ids=ids, labels=ids).loss
        acc.end_phase()
        acc.start_phase("backward")
        loss.backward()
        acc.end_phase()
        acc.start_phase("optimizer_step")
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc.end_phase()

    with acc:
        benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    benchmark.extra_info["peak_bytes"] = acc.peak_bytes


def test_step_rss_tracker(benchmark, job):
    """The RSS tracker as the worker uses it: per-phase peaks (on Linux the kernel's VmHWM, reset at each
    phase start; elsewhere a sampler thread)."""
    benchmark.group = "tracker_overhead"
    model, opt, _ = job
    ids = torch.randint(3, BENCH_LLAMA["vocab_size"], (BATCH, SEQ))
    rss = RssTracker()
    rss.start()

    def step():
        rss.start_phase("forward")
        loss = model(input_ids=ids, labels=ids).loss
        rss.end_phase()
        rss.start_phase("backward")
        loss.backward()
        rss.end_phase()
        rss.start_phase("optimizer_step")
        opt.step()
        opt.zero_grad(set_to_none=True)
        rss.end_phase()

    try:
        benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    finally:
        rss.stop()
    benchmark.extra_info["method"] = rss.method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the NVML sampler's overhead is a GPU figure")
def test_step_nvml_sampler_cuda(benchmark, job):
    from optimem.harness.trackers.nvml import NvmlSampler, nvml_available

    if not nvml_available():
        pytest.skip("NVML not available")
    benchmark.group = "tracker_overhead_cuda"
    model, opt, _ = job
    model.cuda()
    ids = torch.randint(3, BENCH_LLAMA["vocab_size"], (BATCH, SEQ), device="cuda")
    opt_cuda = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt_cuda.step()
        opt_cuda.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    sampler = NvmlSampler()
    sampler.start()
    try:
        benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
    finally:
        sampler.stop()
