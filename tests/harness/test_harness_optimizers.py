"""Every CPU-capable optimizer runs a real, measured Trainer job on tiny-llama (in this process, for speed):
status ok, measured optimizer state equal to the estimate, phases ordered and non-zero where they must be,
step 0 vs steady state visible, and the record valid against the schema."""
from __future__ import annotations

import pytest

from optimem.estimators import REGISTRY
from optimem.harness.launcher import execute
from optimem.harness.record import validate
from optimem.harness.scenario import RunConfig
from optimem.harness.trackers.phases import PHASE_ORDER

pytestmark = pytest.mark.slow  # real Trainer runs or processes throughout: the inner loop (-m 'not slow') skips this file

CPU_OPTIMIZERS = [s for s in REGISTRY.values() if s.availability == "ok" and s.runs_on_cpu]
TOLERANCE = 0.005


def _config(spec) -> RunConfig:
    return RunConfig(optim=spec.name, model="tiny-llama", steps=3, warmup=2,
                     optim_target_modules="all-linear" if spec.needs_target_modules else None)


_RECORDS: dict[str, dict] = {}


def record_for(spec) -> dict:
    if spec.name not in _RECORDS:
        _RECORDS[spec.name] = execute(_config(spec), isolate=False)
    return _RECORDS[spec.name]


@pytest.mark.parametrize("spec", CPU_OPTIMIZERS, ids=lambda s: s.name)
def test_run_measures_state_like_the_estimate(spec):
    record = record_for(spec)
    assert record["status"] == "ok", record["reason"] + "\n" + (record.get("detail") or "")
    validate(record)
    measured = record["measured"]["optimizer_state_bytes"]
    predicted = record["predicted"]["bytes"]["optimizer_state"]
    if measured == 0:
        assert predicted == 0
    else:
        assert abs(predicted - measured) / measured <= TOLERANCE, (
            f"{spec.name}: measured {measured} B {record['measured']['optimizer_state']['by_key']}, "
            f"predicted {predicted} B {record['predicted']['state_breakdown']}")
    assert record["measured"]["parameters_bytes"] == record["predicted"]["bytes"]["weights"]


@pytest.mark.parametrize("spec", CPU_OPTIMIZERS, ids=lambda s: s.name)
def test_phases_ordered_and_step0_vs_steady(spec):
    record = record_for(spec)
    assert record["status"] == "ok", record["reason"]
    m = record["measured"]
    phases = m["phases"]
    assert list(phases) == [p for p in PHASE_ORDER if p in phases]
    assert set(PHASE_ORDER) <= set(phases), sorted(phases)
    weights = m["parameters_bytes"]
    assert weights > 0
    # After model load exactly the parameters and buffers are alive.
    assert phases["model_load"]["end_bytes"] == weights + m["buffers_bytes"]
    for name in PHASE_ORDER[2:]:
        ph = phases[name]
        assert ph["peak_bytes"] >= ph["end_bytes"] > 0
        assert ph["peak_bytes"] >= weights
        assert ph["rss"]["peak_bytes"] > 0
    for kind in ("step0", "steady"):
        # The forward builds activations on top of what was alive; backward peaks above the forward's end.
        assert phases[f"{kind}.forward"]["peak_bytes"] > phases[f"{kind}.forward"]["tensors"]["start_bytes"]
        assert phases[f"{kind}.backward"]["peak_bytes"] >= phases[f"{kind}.forward"]["end_bytes"]
        assert phases[f"{kind}.forward"]["tensors"]["breakdown_at_end"]["activations"] > 0
    state = m["optimizer_state_bytes"]
    before = m["optimizer_state_bytes_before_first_step"]
    fwd0, fwd1 = phases["step0.forward"], phases["steady.forward"]
    # The tensor accountant's optimizer-state figure is the walker's, before and after the first step.
    assert fwd0["tensors"]["breakdown_at_peak"]["optimizer_state"] == before
    assert fwd1["tensors"]["breakdown_at_peak"]["optimizer_state"] == state
    assert m["optimizer_state_bytes_after_step"][0] == state
    # Step 0 has no (lazily created) optimizer state yet: the steady forward peak is higher by exactly the state
    # created in step 0 (give or take a few bytes of Trainer bookkeeping).
    grown = fwd1["peak_bytes"] - fwd0["peak_bytes"]
    assert abs(grown - (state - before)) <= 64, (grown, state, before)
    # Gradients: all of them at the end of backward, unless fused into backward (LOMO) or consumed one by one.
    grads_at_end = phases["step0.backward"]["tensors"]["breakdown_at_end"]["gradients"]
    if spec.keeps_gradients and not spec.layerwise:
        assert grads_at_end == weights == m["gradients_bytes"]
    else:
        assert grads_at_end == 0
    # Throughput over the step after warmup.
    tp = m["throughput"]
    assert tp["measured_steps"] == 1 and tp["samples_per_s"] > 0 and tp["step_time_s"]["p50"] > 0
    assert tp["optimizer_step_time_s"]["p50"] >= 0


def test_local_jsonl_data_and_other_architectures(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(f'{{"text": "line {i}: the quick brown fox jumps over the lazy dog"}}'
                              for i in range(20)))
    for model in ("tiny-gpt2", "tiny-t5"):
        record = execute(RunConfig(optim="adamw_torch", model=model, data=str(data), steps=2, warmup=1), isolate=False)
        validate(record)
        assert record["status"] == "ok", record["reason"]
        m = record["measured"]
        assert m["optimizer_state_bytes"] == record["predicted"]["bytes"]["optimizer_state"]
        assert m["phases"]["steady.forward"]["peak_bytes"] - m["phases"]["step0.forward"]["peak_bytes"] >= \
            m["optimizer_state_bytes"] - 4096  # a few KiB of data batch and Trainer bookkeeping
        assert record["config"]["data"] == str(data)
