"""The synthetic samples' token ids (``estimators/sample_tokens``): one rule for the harness's dataset and the
tracer's batch -- an encoder-decoder's samples end with its EOS (BART-style classifiers pool it), a config with no
vocabulary draws byte ids -- and a boolean mask index with known values traces (BART's ``hidden[eos_mask]``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from optimem.estimators.sample_tokens import BYTE_VOCAB, closing_token, vocab_size


def test_closing_token_is_an_encoder_decoders_eos_inside_its_vocabulary():
    assert closing_token(SimpleNamespace(is_encoder_decoder=True, eos_token_id=2, vocab_size=99)) == 2
    assert closing_token(SimpleNamespace(is_encoder_decoder=True, eos_token_id=[1, 5], vocab_size=99)) == 1
    assert closing_token(SimpleNamespace(is_encoder_decoder=False, eos_token_id=2, vocab_size=99)) is None
    assert closing_token(SimpleNamespace(is_encoder_decoder=True, eos_token_id=None, vocab_size=99)) is None
    assert closing_token(SimpleNamespace(is_encoder_decoder=True, eos_token_id=500, vocab_size=99)) is None


def test_vocab_size_falls_back_to_the_text_config_then_bytes():
    assert vocab_size(SimpleNamespace(vocab_size=99)) == 99
    assert vocab_size(SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=77))) == 77
    canine = SimpleNamespace(get_text_config=lambda: SimpleNamespace())  # CANINE reads code points: no vocab_size
    assert vocab_size(canine) == BYTE_VOCAB


def test_the_harness_dataset_and_the_trace_batch_close_samples_alike():
    from optimem.estimators.trace.model import ModelFacts
    from optimem.estimators.trace.step import real_batch
    from optimem.harness.scenario import SyntheticTokens

    data = SyntheticTokens(4, 16, 99, 0, True, num_labels=3, closing=2)
    assert all(int(data[i]["input_ids"][-1]) == 2 for i in range(4))
    assert all(int(x) != 2 for x in data[0]["input_ids"][:-1])
    facts = ModelFacts(False, False, True, 99, "sdpa", 3, "input_ids", closing_token=2)
    batch = real_batch(facts, 2, 16, "sequence-classification")
    assert batch["input_ids"][:, -1].tolist() == [2, 2] and batch["labels"].shape == (2,)
    assert real_batch(ModelFacts(False, False, False, 99, "sdpa", 2, "input_ids"), 2, 16, None)["input_ids"][
        :, -1].min() >= 3


def test_a_boolean_mask_index_with_known_values_traces():
    from optimem.estimators.trace.tensor import Recorder, TraceMode, TraceTensor, from_meta, from_real, set_recorder

    old = set_recorder(Recorder())
    try:
        hidden = from_meta(torch.empty(2, 16, 8, device="meta"))  # computed from the weights: no values
        ids = from_real(torch.randint(3, 99, (2, 16)))
        ids._v[:, -1] = 2
        with TraceMode():
            mask = ids.eq(2)
            picked = hidden[mask, :]
        assert isinstance(picked, TraceTensor) and tuple(picked.shape) == (2, 8)
    finally:
        set_recorder(old)


@pytest.mark.parametrize("model_type", ["bart"])
def test_a_bart_classifier_estimates_within_one_percent_of_its_real_step(model_type):
    """Issue 27: BART-style classifiers failed on the harness's EOS-less samples; now each sample ends with EOS
    and the estimate follows the classifier's ``hidden[eos_mask]``."""
    pytest.importorskip("transformers")
    from optimem.harness.zoo import run_one

    row = run_one(model_type, "sequence-classification", "adamw_torch", False)
    assert row["class"] in ("exact", "within 1%"), row
