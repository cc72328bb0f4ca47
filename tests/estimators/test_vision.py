"""Vision-language fine-tunes (``--task image-text-to-text``): the image-token count read from the model's own code,
the frozen-tower and LoRA-on-the-language-model setups, and one real CPU Trainer step against the estimate."""
from __future__ import annotations

import re

import pytest

from optimem.estimators.catalog import resolve
from optimem.estimators.inventory import build_inventory
from optimem.estimators.peft_model import adapter_inventory
from optimem.estimators.setup import TrainingSetup
from optimem.estimators.trace.images import layout, real_batch, spec_for
from optimem.estimators.vision import freeze_pattern
from optimem.estimators.zoo import ZOO_DIR

TASK = "image-text-to-text"


def _zoo(t: str) -> str:
    return str(ZOO_DIR / f"{t}.json")


@pytest.mark.parametrize("model_type, tokens, form", [
    ("llava", 16, "plain"),      # CLIP: (16 / 4)^2 patches, the CLS token dropped ("default" feature strategy)
    ("gemma3", 4, "plain"),      # SigLIP patches average-pooled to mm_tokens_per_image = 4
    ("idefics3", 4, "nested"),   # 16 patches, pixel shuffle by scale_factor 2
    ("qwen2_vl", 4, "flat"),     # a 4 x 4 patch grid merged 2 x 2
])
def test_image_tokens_come_from_the_model(model_type, tokens, form):
    spec = spec_for(resolve(_zoo(model_type)), TASK, None, 2)
    assert (spec.size, spec.tokens, spec.form) == (16, tokens, form)
    batch = real_batch(spec, 3, 10)
    ids = batch["input_ids"]
    assert ids.shape == (3, 10 + 2 * tokens)
    assert int((ids == spec.image_token).sum()) == 3 * 2 * tokens  # two images' placeholders per sample
    assert bool((batch["labels"][ids == spec.image_token] == -100).all())  # image tokens masked from the loss
    assert int((batch["labels"] == -100).sum()) == 3 * 2 * tokens
    # the estimator's batch layout is the batch's bytes, exactly
    nbytes = {k: v.numel() * v.element_size() for k, v in batch.items()}
    assert nbytes == {k: 3 * (per + tok * 10) for k, per, tok in layout(spec)}


def test_qwen2_vl_grid_and_bigger_images():
    spec = spec_for(resolve(_zoo("qwen2_vl")), TASK, 32, 1)  # 8 x 8 patches -> 4 x 4 merged tokens
    assert spec.tokens == 16
    batch = real_batch(spec, 2, 4)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert tuple(batch["pixel_values"].shape) == (2 * 64, 3 * 2 * 4 * 4)
    assert int(batch["mm_token_type_ids"].sum()) == 2 * 16


@pytest.mark.parametrize("model_type, frozen", [
    ("llava", {"model.vision_tower", "model.multi_modal_projector"}),
    ("idefics3", {"model.vision_model", "model.connector"}),
    ("qwen2_vl", {"model.visual"}),  # its patch merger lives inside `visual`
])
def test_frozen_tower(model_type, frozen):
    for words, parts in (("vision", {p for p in frozen if not re.search("projector|connector", p)}),
                         ("vision,projector", frozen)):
        setup = TrainingSetup(model=_zoo(model_type), task=TASK, freeze=words)
        inv = build_inventory(setup.source, task=TASK).with_frozen(setup.freeze)
        off = {".".join(r.name.split(".")[:2]) for r in inv.rows if not r.trainable}
        assert off == parts
        assert inv.trainable_params == sum(r.numel for r in inv.rows if ".".join(r.name.split(".")[:2]) not in parts)
    assert freeze_pattern("model\\.foo") == "model\\.foo"  # anything else stays a regex


def test_lora_on_the_language_model_only():
    setup = TrainingSetup(model=_zoo("gemma3"), task=TASK, lora="r=8,target=lm")
    inv = adapter_inventory(setup)
    trained = [r.name for r in inv.rows if r.trainable]
    assert trained and all(".language_model." in n and ".lora_" in n for n in trained)
    assert len(trained) == 2 * 7 * 2  # A and B of q, k, v, o, gate, up, down in each of the 2 layers


@pytest.mark.parametrize("freeze", [None, "vision,projector"], ids=["full", "frozen-tower"])
def test_vlm_estimate_matches_a_real_cpu_step(freeze):
    """The harness's real Trainer step (batch 2 x 64 text tokens, one 16 x 16 image each) measured by the exact
    tensor accountant against ``estimate()``, LLaVA fully fine-tuned (its unused last CLIP layer gets no gradient
    but keeps its activations) and with its vision tower and projector frozen: the peak and every phase."""
    from optimem.harness.validate import Case, measure, predict

    case = Case(_zoo("llava"), "adamw_torch", 2, 64, False, task=TASK, freeze=freeze)
    payload = measure(case)
    assert payload["status"] == "ok", payload.get("reason")
    measured = int(payload["measured"]["peaks"]["tensor_peak_bytes"])
    predicted, phases, _ = predict(case)
    assert abs(predicted - measured) / measured <= 0.01
    compared = [n for n in payload["measured"]["phases"] if n in phases]
    assert len(compared) >= 6  # step 0 and steady: forward, backward, optimizer step (and the model load)
    for name in compared:
        ph = payload["measured"]["phases"][name]
        assert abs(phases[name] - ph["peak_bytes"]) / ph["peak_bytes"] <= 0.001, name


def test_bench_estimate_of_a_vlm(capsys):
    """The command line: the image-text-to-text head (not the config's default class) and the keywords in the
    settings line."""
    from optimem.harness.cli import main

    code = main(["estimate", "--model", _zoo("llava"), "--task", TASK, "--optim", "adamw_torch", "--device", "cpu",
                 "--freeze", "vision,projector", "--batch-size", "2", "--seq-len", "64", "--images-per-sample", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "22.37K trainable" in out and "frozen vision,projector" in out and "2 image(s)" in out
