"""The zoo rule's second pass: what :func:`optimem.estimators.zoo.tiny_config` does when a config class refuses the
tester's sizes, and the sizes taken from a type's own transformers test where the generic sizes build nothing.

Every step here is tried only for a type whose first-pass config fails (the class's validation refuses it, or the
model does not build, or it builds over :data:`optimem.estimators.zoo.MAX_ZOO_PARAMS` parameters), so a type that
built before keeps its config. Importing this module needs no torch or transformers.
"""
from __future__ import annotations

import re

from .model_check import OPTIONAL_SIZES, SIZES

TESTER_OVERRIDES: dict[str, dict] = {
    "blt": {"encoder_hash_byte_group_vocab": 64},
    "dbrx_attn": {"rope_theta": 500000},
    "dots1": {"n_routed_experts": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},
    "luke": {"entity_vocab_size": 10, "entity_emb_size": 6},
    "mamba2": {"num_heads": 8, "n_groups": 8, "state_size": 2, "head_dim": 8, "chunk_size": 8},
    "perceiver": {"num_latents": 10, "d_latents": 20, "d_model": 64, "qk_channels": 20, "v_channels": 20,
                  "num_blocks": 1, "num_self_attends_per_block": 2, "num_self_attention_heads": 1,
                  "num_cross_attention_heads": 1, "output_num_channels": 32, "_label_trainable_num_channels": 16},
}
"""Sizes from a type's own ``ModelTester`` in huggingface/transformers ``tests/models/<type>/test_modeling_<type>.py``
(its ``__init__`` defaults and what its ``get_config`` passes), keyed by the config class's ``model_type`` (a
sub-config's own: DBRX's attention config is ``dbrx_attn``), for the types whose generic-rule config does not
build or is over the parameter cap. Only sizes are taken, never a shape the zoo run fixes itself (Perceiver's
tester has ``max_position_embeddings=7`` for its 7-token inputs; the zoo's sequences are 64 tokens)."""

_MUST_BE = re.compile(r"`?(\w+)`? must be (-?\d+|True|False)\b")
_BETWEEN = re.compile(r"`?(\w+)`? must be between (\d+) and")
_QUOTED = re.compile(r"[:=] *'?\"?([\w.-]+)'?\"?\.?$")


def _literal(text: str):
    return {"True": True, "False": False}.get(text, int(text) if text.lstrip("-").isdigit() else text)


def _set_named(kwargs: dict, name: str, value) -> bool:
    """Set ``name`` to ``value`` in ``kwargs`` or in a sub-config dict of it (True when it was somewhere)."""
    if name in kwargs and kwargs[name] != value:
        kwargs[name] = value
        return True
    for v in kwargs.values():
        if isinstance(v, dict) and _set_named(v, name, value):
            return True
    return False


def answer_refusal(kwargs: dict, message: str, fields: set[str]) -> bool:
    """Change ``kwargs`` (the config class's arguments; ``fields``: the names its ``__init__`` takes) as the
    class's refusal ``message`` asks, and say whether anything changed. In order: a message saying what a size
    must be ("hidden_size_per_layer_input must be 0", also inside a sub-config) sets it; "X must be between N
    and ..." sets X to N (the smallest size; also for a field left at its default); a passed value the message
    quotes at its end ("Unsupported ... activation: gelu.") is given back to the class default; then the longest
    passed name the message mentions is given back; then the last one passed."""
    m = _MUST_BE.search(message)
    if m and _set_named(kwargs, m.group(1), _literal(m.group(2))):
        return True
    m = _BETWEEN.search(message)
    if m and m.group(1) in fields and kwargs.get(m.group(1)) != int(m.group(2)):
        kwargs[m.group(1)] = int(m.group(2))
        return True
    m = _QUOTED.search(message.strip())
    if m:
        quoted = [k for k, v in kwargs.items() if isinstance(v, str) and v == m.group(1)]
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


_INT_SIZES = frozenset(n for names in (*SIZES.values(), *OPTIONAL_SIZES.values()) for n in names)


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


__all__ = ["TESTER_OVERRIDES", "answer_refusal", "integral_sizes", "token_ids_in_vocab"]
