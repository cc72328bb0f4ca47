"""The whole-step estimate against real Trainer runs on CPU: predicted peak within 3% of the harness's
measured tensor-accounting peak, every phase within 5%, for 8 optimizers of different families x 3
architectures x 2 shapes x gradient checkpointing on/off, plus the other settings (parameters in bf16,
bf16 autocast, eager attention, gradient accumulation, frozen parameters).

The full matrix (10 optimizers, every setting, both shapes) is ``python -m harness.validate``, whose
table is committed as results/peak_error_cpu.md; this is its CI-sized part (about a minute and a half on
one core).
"""
import pytest

from harness.validate import MODELS, PEAK_TOL, PHASE_TOL, SHAPES, Case, run_case

CORE_OPTIMIZERS = ("adamw_torch", "adafactor", "adamw_bnb_8bit", "galore_adamw", "apollo_adamw", "lomo",
                   "schedule_free_adamw", "galore_adamw_layerwise")
"""Eight families: torch AdamW (single-tensor loop), transformers Adafactor, bitsandbytes 8-bit, GaLore (SVD
projector), APOLLO (random projector), LOMO (update inside the backward), schedule-free (foreach) and a
layer-wise variant (one optimizer per parameter, stepped from a gradient hook)."""

CORE = [Case(m, o, b, s, gc) for m in MODELS for o in CORE_OPTIMIZERS for (b, s) in SHAPES for gc in (False, True)]
SETTINGS = [Case("tiny-llama", "adamw_torch", 2, 64, True, dtype="bf16"),
            Case("tiny-gpt2", "adafactor", 2, 64, False, dtype="bf16"),
            Case("tiny-t5", "adamw_torch", 2, 64, True, mixed_precision="bf16"),
            Case("tiny-llama", "adamw_torch", 2, 64, False, mixed_precision="bf16"),
            Case("tiny-gpt2", "adamw_torch", 2, 64, True, attn="eager"),
            Case("tiny-t5", "adamw_torch", 2, 64, False, attn="eager"),
            Case("tiny-llama", "adamw_torch", 2, 64, False, grad_accum=2),
            Case("tiny-t5", "adamw_torch", 2, 64, True, grad_accum=2),
            Case("tiny-llama", "adamw_torch", 2, 64, True, freeze="embed_tokens|mlp"),
            Case("tiny-gpt2", "adamw_torch", 2, 64, False, freeze="attn"),
            Case("tiny-llama", "lomo", 2, 64, False, dtype="bf16"),
            Case("tiny-t5", "grokadamw", 2, 64, True)]


def _check(case: Case) -> None:
    r = run_case(case)
    assert r.status == "ok", r.reason
    errors = r.phase_errors()
    detail = ", ".join(f"{k} {v:+.3%}" for k, v in errors.items())
    assert abs(r.peak_error) <= PEAK_TOL, f"{case.label}: peak {r.peak_error:+.3%} ({detail})"
    bad = {k: v for k, v in errors.items() if abs(v) > PHASE_TOL}
    assert not bad, f"{case.label}: {detail}"
    assert set(errors) == {"step0.forward", "step0.backward", "step0.optimizer_step", "steady.forward",
                           "steady.backward", "steady.optimizer_step"}


@pytest.mark.parametrize("case", CORE, ids=lambda c: c.label.replace(" ", "-"))
def test_core_matrix(case):
    _check(case)


@pytest.mark.parametrize("case", SETTINGS, ids=lambda c: c.label.replace(" ", "-"))
def test_other_settings(case):
    _check(case)
