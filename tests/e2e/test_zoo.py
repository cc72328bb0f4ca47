"""The transformers zoo (issue 27): the stored tiny configs cover every registered type of the zoo's tasks for the
installed transformers, a fixed stratified sample of them is traced and checked against a real CPU Trainer step
(``python -m optimem.harness.validate --zoo`` runs them all: results/zoo_cpu.md), and a trace that fails says
whether the model fails on its own (with its error) or the tracer has a gap -- and ``bench run`` still runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from optimem.estimators.zoo import TASK_MAPPINGS, load_index, registered_types, zoo_config_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = (("llama", "causal-lm"), ("qwen3_moe", "causal-lm"), ("bert", "masked-lm"),
          ("roberta", "sequence-classification"), ("t5", "seq2seq-lm"), ("mamba", "causal-lm"),
          ("openai-gpt", "causal-lm"), ("encoder-decoder", "seq2seq-lm"))
"""One type per stratum: a dense GQA decoder, a routed MoE, an encoder as masked LM and as classifier, an
encoder-decoder (each about 8 s on one CPU core); and one of each tracer gap closed for the zoo: a scan over tokens
traced at its sequence length (Mamba), a run whose peak is the model's construction (GPT-1's mask buffers), an
encoder no gradient reaches whose activations autograd still keeps (a BERT pair without cross-attention)."""


def _bad_deepseek(tmp_path: Path) -> Path:
    """A hand-shrunk DeepSeek-V3 config whose expert groups do not fit its experts: transformers builds it, and its
    router fails on real tensors (``topk`` over more groups than there are)."""
    cfg = json.loads((ROOT / "estimators" / "configs" / "tiny-deepseek-v3.json").read_text())
    cfg.update(n_routed_experts=6, n_group=4, topk_group=2)
    path = tmp_path / "deepseek-bad.json"
    path.write_text(json.dumps(cfg))
    return path


def test_zoo_covers_every_registered_type_of_the_installed_transformers():
    import transformers

    index = load_index()
    assert index["transformers"] == transformers.__version__, "regenerate: python -m optimem.estimators.zoo"
    for task in TASK_MAPPINGS:
        assert index["tasks"][task] == registered_types(task)
    made = [t for t, e in index["types"].items() if e["config"]]
    assert len(made) >= 0.95 * len(index["types"])
    assert all(zoo_config_path(t).is_file() for t in made)


@pytest.mark.parametrize("model_type,task", SAMPLE, ids=[f"{t}-{k}" for t, k in SAMPLE])
def test_zoo_sample_within_one_percent_of_a_real_step(model_type, task):
    from optimem.harness.zoo import run_one

    row = run_one(model_type, task, "adamw_torch", False)
    assert row["class"] in ("exact", "within 1%"), row
    assert abs(row["peak_error"]) <= 0.01


def test_a_model_that_fails_on_its_own_gets_its_own_error(tmp_path):
    """Not the tracer's: the same step on real CPU tensors fails, and the message carries that error."""
    from optimem.estimators import estimate
    from optimem.estimators.errors import TraceFailure

    with pytest.raises(TraceFailure) as info:
        estimate(str(_bad_deepseek(tmp_path)), "adamw_torch", batch_size=2, seq_len=32)
    assert info.value.kind == "model"
    msg = str(info.value)
    assert "fails on its own" in msg and "RuntimeError" in msg and "\n" not in msg


def test_a_tracer_gap_is_named_as_one():
    """JetMoE's router hands Python its per-expert token counts (``Tensor.tolist`` of values computed from the
    weights): the tracer refuses it, and the same step runs on real tensors -- a tracer gap, said so."""
    from optimem.estimators import estimate
    from optimem.estimators.errors import TraceFailure

    with pytest.raises(TraceFailure) as info:
        estimate(str(zoo_config_path("jetmoe")), "adamw_torch", batch_size=2, seq_len=32)
    assert info.value.kind == "tracer"
    assert "Tensor.tolist" in str(info.value) and "a tracer gap" in str(info.value)


def test_state_a_step_leaves_for_the_next_is_traced():
    """RecurrentGemma keeps each layer's recurrent and convolution state on its modules; every step frees the
    previous step's and leaves its own: traced (as many freed as left), counted from their creation, said in the
    notes -- exact against the harness's real CPU step."""
    from optimem.harness.zoo import run_one

    row = run_one("recurrent_gemma", "causal-lm", "adamw_torch", False)
    assert row["class"] == "exact", row


def test_bench_run_reports_the_real_job_when_the_estimate_fails(tmp_path):
    """The estimate's failure is kept in the record (``run.estimate_error``) and the real job still runs: here the
    model's own error is the run's reason."""
    from optimem.harness.launcher import execute
    from optimem.harness.run_config import RunConfig

    cfg = RunConfig(model=str(_bad_deepseek(tmp_path)), optim="adamw_torch", batch_size=2, seq_len=32, steps=2,
                    warmup=1, device="cpu")
    rec = execute(cfg, isolate=False)
    assert rec["predicted"] is None
    assert "fails on its own" in rec["run"]["estimate_error"]
    assert rec["status"] == "error" and "selected index k out of range" in rec["reason"]
