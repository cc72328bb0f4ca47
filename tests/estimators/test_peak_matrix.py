"""The whole-step estimate against real Trainer runs on CPU: predicted peak within 3% of the harness's
measured tensor-accounting peak, every phase within 5%, for 8 optimizers of different families x 3
architectures x 2 shapes x gradient checkpointing on/off, plus the other settings (parameters in bf16,
bf16 autocast, eager attention, gradient accumulation, frozen parameters).

The architecture families (Qwen3, Gemma 2/3, Mixtral, Qwen3-MoE, DeepSeek-V3, OLMo 2, Falcon, StarCoder2,
GPT-NeoX, Phi-3, BERT with both heads, BART) get one case each, within 1% (peak) and 2% (every phase).

The full matrix (10 optimizers, every setting, both shapes) is ``python -m optimem.harness.validate``, whose
table is committed as results/peak_error_cpu.md; this is its CI-sized part (about a minute and a half on
one core).
"""
import pytest

from optimem.harness.validate import FAMILIES, FAMILY_SHAPE, MODELS, SHAPES, Case, run_case, tolerance

pytestmark = pytest.mark.slow  # real Trainer runs or processes throughout: the inner loop (-m 'not slow') skips this file

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

_ROTATION = ("adamw_torch", "adafactor", "lomo", "galore_adamw_layerwise", "adamw_bnb_8bit", "apollo_adamw",
             "schedule_free_adamw")
FAMILY_SLICE = [Case(m, _ROTATION[i % len(_ROTATION)], *FAMILY_SHAPE, i % 2 == 1,
                     mixed_precision="bf16" if i % 4 in (2, 3) else None, task=task)
                for i, (m, task) in enumerate(FAMILIES)]
"""One case per architecture family of ``python -m optimem.harness.validate --families`` (peak within 1%, every phase
within 2%), optimizers, checkpointing and bf16 autocast rotating over the families."""


def _check(case: Case) -> None:
    r = run_case(case)
    assert r.status == "ok", r.reason
    errors = r.phase_errors()
    detail = ", ".join(f"{k} {v:+.3%}" for k, v in errors.items())
    peak_tol, phase_tol = tolerance(case)
    assert abs(r.peak_error) <= peak_tol, f"{case.label}: peak {r.peak_error:+.3%} ({detail})"
    bad = {k: v for k, v in errors.items() if abs(v) > phase_tol}
    assert not bad, f"{case.label}: {detail}"
    assert set(errors) == {"step0.forward", "step0.backward", "step0.optimizer_step", "steady.forward",
                           "steady.backward", "steady.optimizer_step"}


@pytest.mark.parametrize("case", CORE, ids=lambda c: c.label.replace(" ", "-"))
def test_core_matrix(case):
    _check(case)


@pytest.mark.parametrize("case", SETTINGS, ids=lambda c: c.label.replace(" ", "-"))
def test_other_settings(case):
    _check(case)


@pytest.mark.parametrize("case", FAMILY_SLICE, ids=lambda c: c.label.replace(" ", "-"))
def test_architecture_families(case):
    _check(case)
