"""Responsiveness of ``bench serve``: a warm request answered server-side (issue 24: under 100 ms).

The page's opening form (Llama-3-8B in bf16 with bf16 autocast, three optimizers, three GPUs: the estimate table,
the chart, the largest micro-batch and the longest sequence per GPU, the commands), answered by
``optimem.harness.ui.views.answer`` once the model is traced: the same form again, and a form whose micro-batch
changes every round (each a value not asked before: the sequence search runs anew, as when a slider moves).
Then the whole round trip through Gradio (HTTP, queue, pre- and post-processing) on 127.0.0.1.
"""
from __future__ import annotations

import itertools
import os
import socket

import pytest

from optimem.harness.ui.app import DEFAULT_GPUS, DEFAULTS
from optimem.harness.ui.form import Form
from optimem.harness.ui.views import answer


def _form(**changes) -> Form:
    return Form({**DEFAULTS, **changes}, gpus=list(DEFAULT_GPUS))


@pytest.fixture(autouse=True)
def _load(benchmark):
    """The machine's 1-minute load average before and after (the CI-class machine is shared: a fact of the run)."""
    before = os.getloadavg()[0]
    yield
    benchmark.extra_info["load_average_1m"] = [round(before, 2), round(os.getloadavg()[0], 2)]


@pytest.fixture(scope="module")
def warm():
    ans = answer(_form())  # traces the model, fills the caches
    assert not ans.error, ans.error
    return ans


def test_answer_same_form(benchmark, warm):
    ans = benchmark(answer, _form())
    assert ans.estimate_rows == warm.estimate_rows


def test_answer_new_batch(benchmark, warm):
    batches = itertools.count(2)
    ans = benchmark.pedantic(lambda: answer(_form(batch_size=next(batches))), rounds=20, iterations=1)
    assert not ans.error


def test_http_round_trip(benchmark, warm):
    gradio_client = pytest.importorskip("gradio_client")
    from optimem.harness.ui.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch("127.0.0.1", port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        values = [DEFAULTS[k] if k in DEFAULTS else None for k in
                  ("model", "config", "task", "dtype", "mixed_precision", "batch_size", "seq_len", "grad_accum",
                   "gradient_checkpointing", "lora", "quantize", "optim", "gpus", "num_processes", "sharding")]
        values[12] = list(DEFAULT_GPUS)
        batches = itertools.count(100)

        def call():
            values[5] = next(batches)
            return client.predict(*values, api_name="/update")

        out = benchmark.pedantic(call, rounds=10, iterations=1, warmup_rounds=1)
        assert out[0] == ""  # no inline error
    finally:
        demo.close()
