"""The zoo rule's additions (:func:`optimem.estimators.zoo.tiny_config`): the sizes taken from a type's own
transformers test where the generic sizes build no working model (:data:`TESTER_OVERRIDES`), a few value fixes
every config gets (:func:`integral_sizes`, :func:`token_ids_in_vocab`, :func:`chosen_defaults`: each changes only a
config that would fail), and the second pass -- refusals answered (:func:`answer_refusal`), generic sizes for what
the tester's names miss (:func:`second_pass_sizes`, :func:`widths_to_text`, :func:`rope_per_layer_type`) -- tried only for a type whose
first-pass config builds no model (or one over :data:`optimem.estimators.zoo.MAX_ZOO_PARAMS` parameters), so a type
that built before keeps its config. Importing this module needs no torch or transformers.
"""
from __future__ import annotations

import re

from .model_check import OPTIONAL_SIZES, SIZES

TESTER_OVERRIDES: dict[str, dict] = {
    "blt": {"encoder_hash_byte_group_vocab": 64},
    "blt_global_transformer": {"hidden_size": 64},  # the tester's hidden_size * 2: the local decoder's input
    "blt_local_decoder": {"hidden_size_global": 64},
    "blt_local_encoder": {"hidden_size_global": 64},
    "dbrx": {"attn_config": {"clip_qkv": 8, "kv_n_heads": 2, "rope_theta": 500000},
             "ffn_config": {"ffn_hidden_size": 40, "moe_num_experts": 8, "moe_top_k": 4, "moe_jitter_eps": 0,
                            "moe_loss_weight": 0.05}},
    "dots1": {"n_routed_experts": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},
    "layoutlmv3": {"hidden_size": 36, "num_attention_heads": 4, "coordinate_size": 6, "shape_size": 6,
                   "input_size": 4, "patch_size": 2},
    "lilt": {"hidden_size": 24, "num_attention_heads": 6},
    "longcat_flash": {"hidden_size": 144, "ffn_hidden_size": 288, "expert_ffn_hidden_size": 48, "num_layers": 1,
                      "num_attention_heads": 8, "num_key_value_heads": 8, "kv_lora_rank": 16, "q_lora_rank": 48,
                      "qk_rope_head_dim": 4, "v_head_dim": 8, "qk_nope_head_dim": 8, "head_dim": 4,
                      "n_routed_experts": 4, "zero_expert_num": 2, "moe_topk": 2, "max_position_embeddings": 128},
    "luke": {"entity_vocab_size": 10, "entity_emb_size": 6},
    "mamba2": {"num_heads": 8, "n_groups": 8, "state_size": 2, "head_dim": 8, "chunk_size": 8},
    "mimo_v2_flash": {"num_attention_heads": 4, "intermediate_size": 64, "v_head_dim": 16,
                      "layer_types": ["full_attention", "sliding_attention"]},
    "perceiver": {"num_latents": 10, "d_latents": 20, "d_model": 64, "qk_channels": 20, "v_channels": 20,
                  "num_blocks": 1, "num_self_attends_per_block": 2, "num_self_attention_heads": 1,
                  "num_cross_attention_heads": 1, "output_num_channels": 32, "_label_trainable_num_channels": 16},
    "reformer": {"is_decoder": True, "attention_head_size": 16, "local_attn_chunk_length": 4,
                 "local_num_chunks_before": 1, "local_num_chunks_after": 0, "num_hashes": 1, "feed_forward_size": 32,
                 "axial_pos_shape": [4, 8], "axial_pos_embds_dim": [16, 16], "attn_layers": ["local", "local"]},
    "vibevoice_acoustic_tokenizer_encoder": {"hidden_size": 16, "kernel_size": 3, "num_filters": 4,
                                             "downsampling_ratios": [2], "depths": [1, 1]},  # n_filters in the tester
    "qwen3_5_text": {"layer_types": ["full_attention", "linear_attention"], "linear_conv_kernel_dim": 2,
                     "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 4,
                     "linear_num_value_heads": 8},
}
"""Sizes from a type's own ``ModelTester`` in huggingface/transformers ``tests/models/<type>/test_modeling_<type>.py``
(its ``__init__`` defaults and what its ``get_config`` passes), keyed by the config class's ``model_type`` (a
sub-config's own), for the types whose generic-rule config builds no model, or one over the parameter cap, or
one that fails on its own (LongCat-Flash's MLA ranks, LayoutLMv3's coordinate sizes that must sum to its hidden
size, Qwen3.5's hybrid layers: with the rule's two linear-attention layers its classifier fails); both passes
use them. Only sizes are taken, never a shape the zoo run fixes itself (Perceiver's
tester has ``max_position_embeddings=7`` for its 7-token inputs; the zoo's sequences are 64 tokens)."""

_MUST_BE = re.compile(r"`?(\w+)`? must be (-?\d+|True|False)\b")
_MUST_MATCH_VALUE = re.compile(r"`?([\w.]+)`? \(-?\d+\) must (?:match|equal) `?[\w.]+`? \((-?\d+)\)")
_MUST_MATCH = re.compile(r"`?(\w+)`? must (?:match|equal) `?(\w+)`?")
_BELOW = re.compile(r"`?(\w+)`? \(\d+\) must be [^.]*?below `?(\w+)`? \((\d+)\)")
_EXPECTED = re.compile(r"Expected (-?\d+)\. Got (-?\d+)")
_BETWEEN = re.compile(r"`?(\w+)`? must be between (\d+) and")
_QUOTED = re.compile(r"[:=] *'?\"?([\w.-]+)'?\"?\.?$")


def _literal(text: str):
    return {"True": True, "False": False}.get(text, int(text) if text.lstrip("-").isdigit() else text)


def _set_path(kwargs: dict, path: str, value) -> bool:
    """Set the dotted ``path`` (``head_config.audio_hidden_size``) in ``kwargs``, else its last name anywhere."""
    *parents, name = path.split(".")
    where = kwargs
    for p in parents:
        where = where.get(p) if isinstance(where, dict) else None
    if isinstance(where, dict) and where.get(name) != value:
        where[name] = value
        return True
    if len(parents) == 1 and parents[0] not in kwargs:  # a sub-config left at its defaults: pass just this size
        kwargs[parents[0]] = {name: value}
        return True
    return _set_named(kwargs, name, value)


def _set_named(kwargs: dict, name: str, value) -> bool:
    """Set ``name`` to ``value`` in ``kwargs`` or in a sub-config dict of it (True when it was somewhere)."""
    if name in kwargs and kwargs[name] != value:
        kwargs[name] = value
        return True
    for v in kwargs.values():
        if isinstance(v, dict) and _set_named(v, name, value):
            return True
    return False


def _ints(kwargs: dict):
    """Every (name, int) in ``kwargs`` and its sub-config dicts."""
    for k, v in kwargs.items():
        if isinstance(v, dict):
            yield from _ints(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            yield k, v


def answer_refusal(kwargs: dict, message: str, fields: set[str]) -> bool:
    """Change ``kwargs`` (the config class's arguments; ``fields``: the names its ``__init__`` takes) as the
    class's refusal ``message`` asks, and say whether anything changed. In order: a message saying what a size
    must be ("hidden_size_per_layer_input must be 0", also inside a sub-config) sets it; "X (v) must be ... below
    Y (n)" sets X to n - 1; "X (v) must match Y (n)" sets X (a dotted path into sub-configs) to n; "X must match
    Y" sets X to Y's passed value; "... Expected N. Got M" sets the one size holding M whose name shares a word with
    the message ("must be shared ... Got 1": ``num_kv_shared_layers``) to N; "X must be between N
    and ..." sets X to N (the smallest size; also for a field left at its default); a passed value the message
    quotes at its end ("Unsupported ... activation: gelu.") is given back to the class default; then the longest
    passed name the message mentions is given back; then the last one passed."""
    m = _MUST_BE.search(message)
    if m and _set_named(kwargs, m.group(1), _literal(m.group(2))):
        return True
    m = _BELOW.search(message)
    if m and _set_named(kwargs, m.group(1), int(m.group(3)) - 1):
        return True
    m = _MUST_MATCH_VALUE.search(message)
    if m and _set_path(kwargs, m.group(1), int(m.group(2))):
        return True
    m = _MUST_MATCH.search(message)
    if m and m.group(2) in kwargs and _set_named(kwargs, m.group(1), kwargs[m.group(2)]):
        return True
    m = _EXPECTED.search(message)
    if m:
        words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", message)}
        held = [k for k, v in _ints(kwargs) if v == int(m.group(2)) and words & set(k.lower().split("_"))]
        if len(held) == 1 and _set_named(kwargs, held[0], int(m.group(1))):
            return True
    m = _BETWEEN.search(message)
    if m and m.group(1) in fields and kwargs.get(m.group(1)) != int(m.group(2)):
        kwargs[m.group(1)] = int(m.group(2))
        return True
    m = _QUOTED.search(message.strip())
    if m:
        quoted = [k for k, v in kwargs.items() if isinstance(v, str) and v == m.group(1).rstrip(".")]
        if quoted:
            kwargs.pop(quoted[0])
            return True
    named = [k for k in kwargs if k in message]
    if named:
        kwargs.pop(max(named, key=len))
        return True
    if kwargs:
        kwargs.pop(list(kwargs)[-1])
        return True
    return False


def second_pass_sizes(params: dict, kwargs: dict) -> dict:
    """The generic sizes the second pass adds to ``kwargs`` (a config class's arguments so far; ``params``: its
    ``__init__`` parameters, for their defaults), where the class default is larger than a tiny model has: every
    other vocabulary (a name with ``vocab`` in it: Gemma 4's per-layer-input table, 262,144 rows) gets the
    tester's ``vocab_size``; every other layer count (``num_..._layers``: Gemma 3n's 15 KV-sharing layers) at most
    half of ``num_hidden_layers``; a factored ``embedding_size`` (ALBERT-style: SqueezeBERT, MobileBERT) at most
    ``hidden_size``; a dict keyed by layer index keeps the layers the model has."""
    vocab, layers, hidden = kwargs.get("vocab_size"), kwargs.get("num_hidden_layers"), kwargs.get("hidden_size")
    out = {}
    for name, p in params.items():
        default = p.default
        if name in kwargs or isinstance(default, bool):
            continue
        if isinstance(vocab, int) and "vocab" in name and isinstance(default, int) and default > vocab:
            out[name] = vocab
        elif isinstance(hidden, int) and name == "embedding_size" and isinstance(default, int) and default > hidden:
            out[name] = hidden
        elif isinstance(layers, int) and re.fullmatch(r"num_\w+_layers", name) and isinstance(default, int) \
                and default > layers // 2:
            out[name] = layers // 2
        elif isinstance(layers, int) and isinstance(default, dict) and default and \
                all(str(k).isdigit() for k in default):
            out[name] = {k: v for k, v in default.items() if int(k) < layers}
    return out


_INT_SIZES = frozenset(n for names in (*SIZES.values(), *OPTIONAL_SIZES.values()) for n in names)


OUTPUT_WIDTHS = ("adapter_out_dim", "out_hidden_size")
"""A vision / audio sub-config's output width: what its projector hands the language model."""


def widths_to_text(kwargs: dict) -> dict:
    """A composite config's arguments with every other sub-config's output width (:data:`OUTPUT_WIDTHS`) set to
    the text config's hidden size, as the composite's validation asks (dots.3's "vision adapter output width must
    match the text hidden size")."""
    text = kwargs.get("text_config")
    hidden = text.get("hidden_size") if isinstance(text, dict) else None
    if not isinstance(hidden, int):
        return kwargs
    out = dict(kwargs)
    for k, v in kwargs.items():
        if k != "text_config" and isinstance(v, dict) and any(w in v for w in OUTPUT_WIDTHS):
            out[k] = {**v, **{w: hidden for w in OUTPUT_WIDTHS if w in v}}
    return out


def rope_per_layer_type(config: dict, theta) -> dict:
    """``config`` with empty ``rope_parameters`` beside a ``layer_types`` list given the default rotary embedding
    under each layer type (``rope_theta``: the class's ``default_theta``, a number or one per layer type, else
    10000), as a per-layer-type model reads them (Cohere Compass's class leaves ``{}``, and its rotary embedding
    looks every layer type up)."""
    types, rope = config.get("layer_types"), config.get("rope_parameters")
    if not isinstance(types, list) or not types or rope not in ({}, None):
        return config

    def base(t):
        value = theta.get(t) if isinstance(theta, dict) else theta
        return float(value) if isinstance(value, (int, float)) else 10000.0
    return {**config, "rope_parameters": {t: {"rope_type": "default", "rope_theta": base(t)}
                                          for t in sorted(set(types))}}


def chosen_defaults(config: dict) -> dict:
    """``config`` with a ``default_X`` the class leaves unset given the first of the choices it lists in ``Xs``
    (X-MOD's ``default_language`` from ``languages``: what ``set_default_language``, which a Trainer user calls
    before training, stores in the config)."""
    out = dict(config)
    for k, v in config.items():
        if k.startswith("default_") and v is None:
            choices = config.get(k[len("default_"):] + "s")
            if isinstance(choices, (list, tuple)) and choices:
                out[k] = choices[0]
    return out


def integral_sizes(config: dict) -> dict:
    """``config`` (and its sub-config dicts) with every size :mod:`optimem.estimators.model_check` checks that the
    class left as a whole float (MusicFlamingo's ``max_position_embeddings`` is its ``rope_theta``, 1200.0)
    written as an integer, as the check asks."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            v = integral_sizes(v)
        elif k in _INT_SIZES and isinstance(v, float) and v.is_integer():
            v = int(v)
        out[k] = v
    return out


def token_ids_in_vocab(config: dict, pad_id: int) -> dict:
    """``config`` with a ``decoder_start_token_id`` at or above its ``vocab_size`` set to ``pad_id`` (Marian's
    class default is its pad id 58100, which a 99-token vocabulary does not have: the decoder's first input would
    index past the embedding)."""
    start, vocab = config.get("decoder_start_token_id"), config.get("vocab_size")
    if isinstance(start, int) and isinstance(vocab, int) and start >= vocab:
        return {**config, "decoder_start_token_id": pad_id}
    return config


__all__ = ["OUTPUT_WIDTHS", "TESTER_OVERRIDES", "rope_per_layer_type", "widths_to_text", "answer_refusal", "chosen_defaults", "second_pass_sizes", "integral_sizes", "token_ids_in_vocab"]
