"""The zoo rule's second pass (``estimators/zoo_rules``): refusals answered as the class's message says, the generic
sizes it adds, whole-float sizes written as integers, token ids kept inside the vocabulary, a default chosen from the
listed choices; and the configs these make build (issue 27's "no config" rows)."""
from __future__ import annotations

import inspect

import pytest

from optimem.estimators.zoo_rules import (answer_refusal, chosen_defaults, integral_sizes, rope_per_layer_type,
                                          second_pass_sizes, token_ids_in_vocab, widths_to_text)


def test_a_refusal_saying_what_a_size_must_be_sets_it_also_in_a_sub_config():
    kwargs = {"pad_token_id": 0, "text_config": {"hidden_size_per_layer_input": 256, "hidden_size": 32}}
    assert answer_refusal(kwargs, "ValueError: hidden_size_per_layer_input must be 0, got 256", set())
    assert kwargs["text_config"]["hidden_size_per_layer_input"] == 0
    kwargs = {"enable_moe_block": True}
    assert answer_refusal(kwargs, "enable_moe_block must be False, got True", set())
    assert kwargs == {"enable_moe_block": False}


def test_between_below_match_quoted_and_named_refusals():
    kwargs = {"num_attention_heads": 2}
    assert answer_refusal(kwargs, "`index_num_heads` must be between 1 and the number of query heads of key head 0.",
                          {"index_num_heads", "num_attention_heads"})
    assert kwargs["index_num_heads"] == 1  # a size left at its default (12) gets the smallest
    kwargs = {"vocab_size": 99, "blank_token_id": 23862}
    assert answer_refusal(kwargs, "`blank_token_id` (23862) must be a class below `vocab_size` (99).", set())
    assert kwargs["blank_token_id"] == 98
    kwargs = {"hidden_size": 32, "adapter_input_size": 1280}
    assert answer_refusal(kwargs, "adapter_input_size must match hidden_size", set())
    assert kwargs["adapter_input_size"] == 32
    msg = "`head_config.audio_hidden_size` (512) must match `audio_config.hidden_size` (32)."
    kwargs = {"audio_config": {"hidden_size": 32}, "head_config": {"audio_hidden_size": 512}}
    assert answer_refusal(kwargs, msg, set()) and kwargs["head_config"] == {"audio_hidden_size": 32}
    kwargs = {"audio_config": {"hidden_size": 32}}  # a sub-config left at its defaults gets just that size
    assert answer_refusal(kwargs, msg, set()) and kwargs["head_config"] == {"audio_hidden_size": 32}
    kwargs = {"text_config": {"num_kv_shared_layers": 1, "num_hidden_layers": 2, "num_experts_per_tok": 1}}
    assert answer_refusal(kwargs, "All layers in a Gemma 4 Assistant models must be shared. Expected 2. Got 1", set())
    assert kwargs["text_config"]["num_kv_shared_layers"] == 2 and kwargs["text_config"]["num_experts_per_tok"] == 1
    kwargs = {"hidden_act": "gelu", "hidden_size": 32}
    assert answer_refusal(kwargs, "ValueError: Unsupported output gate activation: gelu.", set())
    assert kwargs == {"hidden_size": 32}  # the quoted value given back to the class default
    kwargs = {"head_dim": 16, "hidden_size": 32}
    assert answer_refusal(kwargs, "hidden_size must be divisible by the heads", set())
    assert kwargs == {"head_dim": 16}
    assert not answer_refusal({}, "anything", set())


def _params(**defaults):
    def init(self, **kw):  # noqa: ANN001 - a stand-in config __init__ with these defaults
        pass
    sig = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
                            + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                               for k, v in defaults.items()])
    init.__signature__ = sig
    return dict(inspect.signature(init).parameters)


def test_second_pass_sizes_shrink_what_a_tiny_model_does_not_have():
    params = _params(vocab_size_per_layer_input=262144, num_kv_shared_layers=15, embedding_size=768,
                     per_layer_config={"0": {"a": 1}, "5": {"a": 2}}, type_vocab_size=2, use_cache=True,
                     vocab_size=32000)
    kwargs = {"vocab_size": 99, "num_hidden_layers": 2, "hidden_size": 32}
    assert second_pass_sizes(params, kwargs) == {"vocab_size_per_layer_input": 99, "num_kv_shared_layers": 1,
                                                 "embedding_size": 32, "per_layer_config": {"0": {"a": 1}}}


def test_a_towers_output_width_follows_the_text_hidden_size():
    kwargs = {"text_config": {"hidden_size": 32}, "vision_config": {"adapter_out_dim": 5120, "hidden_size": 16},
              "audio_config": {"hidden_size": 16}}
    assert widths_to_text(kwargs) == {"text_config": {"hidden_size": 32}, "audio_config": {"hidden_size": 16},
                                      "vision_config": {"adapter_out_dim": 32, "hidden_size": 16}}
    assert widths_to_text({"vision_config": {"out_hidden_size": 8}}) == {"vision_config": {"out_hidden_size": 8}}


def test_empty_rope_parameters_get_the_default_under_each_layer_type():
    cfg = {"layer_types": ["full_attention", "full_attention"], "rope_parameters": {}}
    assert rope_per_layer_type(cfg, 50000.0)["rope_parameters"] == {
        "full_attention": {"rope_type": "default", "rope_theta": 50000.0}}
    per_type = rope_per_layer_type({"layer_types": ["sliding_attention"], "rope_parameters": None},
                                   {"sliding_attention": 1e4})
    assert per_type["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    kept = {"layer_types": ["full_attention"], "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}
    assert rope_per_layer_type(kept, 5.0) is kept


def test_whole_floats_ids_and_defaults():
    assert integral_sizes({"max_position_embeddings": 1200.0, "rope_theta": 1200.0, "text_config": {
        "hidden_size": 32.0}}) == {"max_position_embeddings": 1200, "rope_theta": 1200.0, "text_config": {
            "hidden_size": 32}}
    assert type(integral_sizes({"max_position_embeddings": 1200.0})["max_position_embeddings"]) is int
    assert token_ids_in_vocab({"vocab_size": 99, "decoder_start_token_id": 58100}, 0)["decoder_start_token_id"] == 0
    assert token_ids_in_vocab({"vocab_size": 99, "decoder_start_token_id": 2}, 0)["decoder_start_token_id"] == 2
    assert chosen_defaults({"languages": ["en_XX", "de_DE"], "default_language": None})["default_language"] == "en_XX"
    assert chosen_defaults({"default_language": None}) == {"default_language": None}


@pytest.mark.parametrize("model_type", ["kolibri1_1", "musicflamingo", "musicgen"])
def test_second_pass_makes_configs_the_first_could_not(model_type):
    pytest.importorskip("transformers")
    from optimem.estimators.zoo import tiny_config

    cfg = tiny_config(model_type, second=True)
    assert cfg["model_type"] in (model_type, f"{model_type}_decoder")
    if model_type == "musicflamingo":  # its class leaves max_position_embeddings as rope_theta, a float
        def sizes(d):
            for k, v in d.items():
                yield from sizes(v) if isinstance(v, dict) else ([v] if k == "max_position_embeddings" else [])
        assert list(sizes(cfg)) and all(type(v) is int for v in sizes(cfg))
    if model_type == "musicgen":  # its causal LM is the decoder: the composite has none
        assert cfg["model_type"] == "musicgen_decoder" and cfg["architectures"] == ["MusicgenForCausalLM"]
