"""The tracer behind the whole-step estimate (``estimators/trace``): a trace on meta-backed trace tensors books
exactly what the same training step books on real CPU tensors; the fitted polynomials equal a direct trace at a
large shape; untraceable models are refused in one line; the simulator's candidate pruning never drops a peak."""
from __future__ import annotations

import io
import itertools
import json
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optimem.estimators import UserError, estimate
from optimem.estimators.catalog import resolve
from optimem.estimators.inventory import instantiate
from optimem.estimators.memsim import CATS, PhaseResult, basis
from optimem.estimators.trace import step as trace_step
from optimem.estimators.trace.events import _canonical, from_events
from optimem.estimators.trace.meta_kernels import cpp_meta_kernels
from optimem.estimators.trace.model import build_traced_model
from optimem.estimators.trace.data import from_arrays, to_arrays
from optimem.estimators.trace.run import _Tracer, s_bounds, step_trace
from optimem.estimators.trace.setting import TraceSetting
from optimem.estimators.trace.tensor import Recorder, _OpInfo


class _RealBook(TorchDispatchMode):
    """Books real CPU storages with the tracer's :class:`Recorder` (the reference the trace must equal)."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.rec.active and _OpInfo(func).allocates:
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self.rec.book(o)
        return out


def _real_events(model_name: str, b: int, s: int, task=None, gc=False, mixed=None, dtype="fp32", attn="sdpa"):
    """The micro-step on the real model with real tensors (as the harness builds and prepares it)."""
    torch.manual_seed(0)
    model = instantiate(resolve(model_name), device="cpu", dtype=dtype, task=task)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    model.config.use_cache = False
    if gc:
        model.activation_checkpointing_enable()
    model.train()
    _, facts = build_traced_model(resolve(model_name), dtype=dtype, task=task, attn=attn, gc=gc)
    trace_step.wrap_autocast(model, mixed)
    rec = Recorder()
    trace_step.StepHooks(model, rec)
    batch = {k: v._v for k, v in trace_step.make_batch(facts, b, s, task).items()}
    items = trace_step.num_items(facts, [batch])
    original = trace_step.TraceMode
    trace_step.TraceMode = lambda: _RealBook(rec)
    try:
        return trace_step.micro_step(model, facts, batch, items, 1, torch.tensor(0.0), rec)
    finally:
        trace_step.TraceMode = original


CASES = [("tiny-llama", dict(gc=True)), ("tiny-gpt2", dict(dtype="bf16")), ("tiny-t5", dict(attn="eager", mixed="bf16")),
         ("tiny-gemma2", dict(mixed="bf16")), ("tiny-mixtral", {}), ("tiny-deepseek-v3", dict(gc=True)),
         ("tiny-falcon", {}), ("tiny-bert", dict(task="sequence-classification", gc=True)), ("tiny-bart", {})]


@pytest.mark.parametrize("model,kw", CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in CASES])
def test_trace_books_what_the_real_cpu_step_books(model, kw):
    """Every allocation (bytes) and free, in order, and every gradient and phase marker: the same events."""
    real = _real_events(model, 2, 64, **kw)
    setting = TraceSetting(dtype=kw.get("dtype", "fp32"), mixed=kw.get("mixed"), attn=kw.get("attn", "sdpa"),
                           gc=kw.get("gc", False), task=kw.get("task"))
    with cpp_meta_kernels():
        traced, _ = _Tracer(resolve(model), setting).run(2, 64, False)
    assert len(real) > 100 and _canonical(traced) == _canonical(real)


@pytest.mark.slow


def test_fit_equals_a_direct_trace_at_a_large_shape():
    """Llama-3-8B in bf16: the polynomials fitted from batches 2-4 x sequences 16-77 give every allocation of a
    direct trace at batch 16 x sequence 4096, to the byte."""
    source, setting = resolve("meta-llama/Meta-Llama-3-8B"), TraceSetting(dtype="bf16")
    region = step_trace(source, setting, 16, 4096).region(16, 4096)
    assert region.b_lo == 2 and region.s_hi is None
    with cpp_meta_kernels():
        raw, _ = _Tracer(source, setting).run(16, 4096, False)
    log, nbytes = from_events(raw)
    assert log.same_sequence(region.first)
    assert np.array_equal(region.first.sizes @ np.array(basis(16, 4096)), nbytes)
    assert nbytes.sum() > 10 * 2**30


@pytest.mark.parametrize("model,shapes", [("tiny-gemma2", ((3, 40), (5, 48), (1, 200), (6, 333))),
                                          ("tiny-llama", ((1, 300), (1, 1001)))])
@pytest.mark.slow
def test_window_regions_fit_and_batch_one_is_its_own_region(model, shapes):
    """Gemma 2 (sliding window 48): below, at and above the window, and batch 1; Llama at batch 1 (derived from
    the batches-from-2 region with one trace): each region gives a direct trace's sizes."""
    source, setting = resolve(model), TraceSetting()
    assert s_bounds((48,), 30) == (2, 47) and s_bounds((48,), 48) == (48, 48) and s_bounds((48,), 300) == (49, None)
    for b, s in shapes:
        region = step_trace(source, setting, b, s).region(b, s)
        assert region.contains(b, s)
        with cpp_meta_kernels():
            raw, _ = _Tracer(source, setting).run(b, s, False)
        log, nbytes = from_events(raw)
        assert log.same_sequence(region.first), (b, s)
        assert np.array_equal(region.first.sizes @ np.array(basis(b, s)), nbytes), (b, s)


def test_trace_is_plain_data():
    st = step_trace(resolve("tiny-qwen3"), TraceSetting(gc=True), 2, 64, accum=True)
    buf = io.BytesIO()
    np.savez(buf, **to_arrays(st))  # what the on-disk cache stores: plain arrays, no pickled objects
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        back = from_arrays({n: f[n] for n in f.files}, st.key)
    assert back.key == st.key and back.params == st.params and len(back.regions) == len(st.regions)
    r0, r1 = st.regions[0], back.regions[0]
    assert np.array_equal(r0.first.sizes, r1.first.sizes) and r1.accum is not None and r1.accum.same_sequence(r0.accum)


def test_untraceable_model_is_refused_in_one_line(tmp_path):
    """Mixtral with the eager experts loop (``nonzero`` over the router's choice: a shape that depends on
    weights) cannot be traced; the default grouped-GEMM experts can."""
    cfg = json.loads(resolve("tiny-mixtral").path.read_text())
    cfg["experts_implementation"] = "eager"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError) as err:
        estimate(str(path), "adamw_torch", batch_size=2, seq_len=32, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "aten.nonzero" in msg and str(path) in msg and "data-dependent" in msg
    assert estimate("tiny-mixtral", "adamw_torch", batch_size=2, seq_len=32, device="cpu").bytes["peak"] > 0


def test_heads_and_families_estimate_without_notes():
    mlm = estimate("tiny-bert", "adamw_torch", batch_size=2, seq_len=64, device="cpu")
    cls = estimate("tiny-bert", "adamw_torch", batch_size=2, seq_len=64, device="cpu", task="sequence-classification")
    assert cls.num_params != mlm.num_params and cls.bytes["activations"] < mlm.bytes["activations"]
    for model in ("tiny-falcon", "tiny-gpt-neox", "tiny-starcoder2"):
        e = estimate(model, "sgd", batch_size=2, seq_len=64, device="cpu")
        assert not e.notes and e.bytes["peak"] > e.bytes["weights"]
    with pytest.raises(UserError, match="task must be one of causal-lm, masked-lm"):
        estimate("tiny-bert", "sgd", task="token-classification")


def test_pruning_never_drops_a_peak():
    rng = random.Random(0)
    for _ in range(20):
        cands = []
        for _ in range(300):
            t = tuple(rng.choice((0, 0, rng.randint(0, 10 ** 6))) for _ in range(6))
            cands.append((t, tuple((0,) * 6 for _ in CATS), 0))
        r = PhaseResult(cands, cands[-1])
        assert len(r.tot) <= len(cands)
        for b, s in itertools.product((1, 2, 7, 64), (1, 3, 128, 4096)):
            x = basis(b, s)
            best = max(sum(a * c for a, c in zip(t[0], x)) for t in cands)
            assert r.peak(b, s)[0] == best


def _replay_event_by_event(sim, log, params, on_mark):
    """The definition the vectorized replay must equal: every event through the simulator's own methods."""
    from optimem.estimators.trace.events import ALLOC, FREE, GRAD, PRE_ACC

    sts = [None] * log.n_alloc
    sizes = [tuple(int(x) for x in row) for row in log.sizes.tolist()]
    ai = 0
    for k, a, b in zip(log.kind.tolist(), log.a.tolist(), log.b.tolist()):
        if k == ALLOC:
            sts[a] = sim.alloc(sizes[ai])
            ai += 1
        elif k == FREE:
            if sts[a] is not None:
                st, sts[a] = sts[a], None
                sim.decref(st)
        elif k == GRAD:
            p = params[a]
            if b >= 0:
                st, sts[b] = sts[b], None
                sim.recat(st, "grad")
                p.grad = st
            if "post_accumulate" in sim.hooks:
                sim.hooks["post_accumulate"](sim, p)
        elif a == PRE_ACC:
            if "pre_accumulate" in sim.hooks and params[b] is not None:
                sim.hooks["pre_accumulate"](sim, params[b])
        else:
            on_mark(a, b)


@pytest.mark.slow


def test_vectorized_replay_equals_the_event_by_event_replay(monkeypatch):
    """Every phase's peak and breakdown from the vectorized replay equal the event-by-event replay's: for
    checkpointing + accumulation, autocast, a frozen embedding with a classification head, LOMO (a hook before
    each gradient) and a layer-wise optimizer (a step after each)."""
    import optimem.estimators.peak as peak
    import optimem.estimators.phases as phases
    from optimem.estimators.estimate import _phase_model

    cases = [("tiny-llama", "adamw_torch", {"gradient_checkpointing": True, "grad_accum": 2}),
             ("tiny-t5", "adamw_torch", {"mixed_precision": "bf16"}),
             ("tiny-bert", "adamw_torch", {"task": "sequence-classification", "freeze": "embeddings"}),
             ("tiny-gemma2", "lomo", {"dtype": "bf16"}),
             ("tiny-qwen3", "galore_adamw_layerwise", {"optim_target_modules": "all-linear", "gradient_checkpointing": True})]

    def run():
        peak._FB_CACHE.clear()
        _phase_model.cache_clear()
        return [estimate(m, o, batch_size=3, seq_len=100, device="cpu", **kw).phases for m, o, kw in cases]

    fast = run()
    import optimem.estimators.trace.replay as rp

    monkeypatch.setattr(rp, "replay", _replay_event_by_event)
    assert run() == fast

