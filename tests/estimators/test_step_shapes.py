"""Optimizer-step rules on weights that are not 2-D matrices, checked against real CPU Trainer steps of zoo configs:
Adafactor's factored second moment of a 3-D expert weight (its column factor is ``shape[:-2] + shape[-1:]``), and
AdamW's decay groups when a norm is an ``nn.LayerNorm`` subclass (GOT-OCR2's SAM neck: the previous parameter's
``denom`` is alive beside the next one's temporaries)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type,task,optim", [("qwen3_moe", "causal-lm", "adafactor"),
                                                   ("got_ocr2", "image-text-to-text", "adamw_torch")])
def test_optimizer_step_of_conv_and_expert_weights(model_type, task, optim):
    from optimem.harness.zoo import run_one

    row = run_one(model_type, task, optim, False)
    assert row["class"] == "exact", row
