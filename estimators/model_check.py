"""A model config checked as data before any model is built: what transformers would refuse, or accept and
then fail on in the middle of a run.

:func:`check_model_config` reads the config.json (a catalog entry or the user's file) and checks its sizes as
values: every size a positive integer (not a string, a float or a bool), the hidden size a multiple of the
attention heads (unless the config gives the head size itself), the key/value heads a divisor of the
attention heads. It imports nothing from transformers unless a size the check needs is missing from the
file; then only the model type's configuration class is imported, for its defaults (never modeling code).
Transformers' own config validation still runs when a model is built (:func:`optimem.estimators.inventory.build_config`
turns its errors into one line too).

:func:`check_sequence_length` is the check that needs the model's parameters: a model with a learned
position table (GPT-2's ``wpe``, BERT's ``position_embeddings``) cannot take more tokens than the table has
rows, which transformers finds out only in the forward ("index out of range in self").
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from .catalog import ModelSource, resolve
from .errors import UserError

SIZES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers"),
    "vocab_size": ("vocab_size",),
}
"""Sizes every model has (the names transformers' config classes give them; the first present wins)."""
OPTIONAL_SIZES: dict[str, tuple[str, ...]] = {
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim", "d_kv"),
    "intermediate_size": ("intermediate_size", "n_inner", "d_ff"),
    "num_decoder_layers": ("num_decoder_layers",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
}
"""Sizes some models have: absent or null means the config class derives them (``n_inner: null`` is 4 x
hidden in GPT-2); given, each must be a positive integer."""
MAX_LAYERS = 100_000
"""More layers than this is a typo, not a model (building its modules would take hours even on the meta
device; the largest published models have under 200)."""

_POSITION_TABLE = re.compile(r"(^|[._])(wpe|embed_positions|position_embeddings?|pos_emb\w*)([._]|$)")
"""Parameter names of learned absolute-position tables (GPT-2 ``wpe``, BERT ``position_embeddings``, OPT/BART
``embed_positions``): an ``nn.Embedding`` indexed by the token's position."""


def _find(data: dict, names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        if name in data:
            return name, data[name]
    return None, None


@functools.lru_cache(maxsize=32)
def _class_defaults(model_type: str) -> dict[str, Any]:
    """The defaults of a model type's transformers config class (its configuration module only), by the
    canonical names of :data:`SIZES`."""
    from transformers import CONFIG_MAPPING  # lazy: pulls in torch, transformers, which importing this module does not

    try:
        cfg = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - a class that cannot be built bare: its defaults are unknown
        return {}
    return {name: getattr(cfg, name, None) for name in (*SIZES, *OPTIONAL_SIZES)}


_JSON_TYPES = {str: "string", float: "number with a fraction", bool: "boolean", list: "list", dict: "object"}


def _size(where: str, key: str, value: Any, *, optional: bool) -> None:
    if optional and value is None:
        return
    if optional and isinstance(value, list) and value:  # one size per layer (Gemma 3n's intermediate_size)
        for v in value:
            _size(where, key, v, optional=False)
        return
    if isinstance(value, bool) or not isinstance(value, int):
        hint = "fix the config.json"
        if isinstance(value, float) and value.is_integer() and value >= 1:
            hint = f"write {int(value)}"
        elif isinstance(value, str) and value.strip().isdigit():
            hint = f"write {value.strip()} without quotes"
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r} (a JSON "
                        f"{_JSON_TYPES.get(type(value), type(value).__name__)}): {hint}")
    if value < 1:
        raise UserError(f"{where}: {key} must be a positive integer (at least 1), got {value}; fix the config.json")


def check_config_data(data: dict, where: str) -> dict[str, int | None]:
    """Check a config.json's sizes as data (see the module doc); returns them by canonical name (None for an
    optional size the file leaves to its class). UserError naming ``where`` and the key."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{where} is not a transformers config: it has no 'model_type'; give a transformers "
                        "config.json")
    sizes: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for canon, names in SIZES.items():
        key, value = _find(data, names)
        if key is None:
            value = _class_defaults(model_type).get(canon)
            key = f"{canon} (the {model_type} default)"
            if value is None:
                continue  # the class has no such size: transformers decides
        _size(where, key, value, optional=False)
        sizes[canon], keys[canon] = value, key
    for canon, names in OPTIONAL_SIZES.items():
        key, value = _find(data, names)
        if key is not None:
            _size(where, key, value, optional=True)
            keys[canon] = key
        sizes[canon] = value
    layers = sizes.get("num_hidden_layers")
    if layers is not None and layers > MAX_LAYERS:
        raise UserError(f"{where}: {keys['num_hidden_layers']} {layers} is more layers than any model has (at most "
                        f"{MAX_LAYERS:,}); fix the config.json")
    hidden, heads = sizes.get("hidden_size"), sizes.get("num_attention_heads")
    if hidden is not None and heads is not None and sizes.get("head_dim") is None and hidden % heads:
        raise UserError(f"{where}: {keys['hidden_size']} {hidden} is not a multiple of {keys['num_attention_heads']} "
                        f"{heads} (each head gets hidden_size / heads features): give a multiple of {heads}, e.g. "
                        f"{(hidden // heads or 1) * heads}, or another head count")
    kv = sizes.get("num_key_value_heads")
    if kv is not None and heads is not None and heads % kv:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0] if heads <= 4096 else [1, heads]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise UserError(f"{where}: num_key_value_heads {kv} does not divide {keys['num_attention_heads']} {heads} "
                        f"(each key/value head serves heads / kv_heads query heads): give one of {shown}")
    return sizes


@functools.lru_cache(maxsize=256)
def _checked(path: str, mtime_ns: int, size: int, name: str) -> dict:
    return check_config_data(ModelSource(name, Path(path)).load(), name)


@functools.lru_cache(maxsize=64)
def _checked_in_memory(name: str) -> dict:
    return check_config_data(resolve(name).load(), name)


def check_model_config(model: str | ModelSource) -> dict[str, int | None]:
    """:func:`check_config_data` for a catalog name or config.json path (cached per file content: a warm
    call costs a stat)."""
    source = model if isinstance(model, ModelSource) else resolve(model)
    if source.path is None:  # an in-memory config (a model object's): its name is content-addressed
        return dict(_checked_in_memory(source.name))
    try:
        st = source.path.stat()
    except OSError as exc:
        raise UserError(f"cannot read model config {source.path}: {exc.strerror or exc}") from None
    return dict(_checked(str(source.path), st.st_mtime_ns, st.st_size, source.name))


def learned_positions(inv) -> tuple[int, str] | None:
    """``(rows, parameter name)`` of the smallest learned absolute-position table in an inventory (None when the
    model has none: rotary, relative or ALiBi positions take any length)."""
    if "learned_positions" in inv._cache:
        return inv._cache["learned_positions"]
    best = None
    for row in inv.rows:
        if row.module_kind == "embedding" and len(row.shape) == 2 and _POSITION_TABLE.search(row.name):
            if best is None or row.shape[0] < best[0]:
                best = (int(row.shape[0]), row.name)
    inv._cache["learned_positions"] = best
    return best


def check_sequence_length(inv, seq_len: int, *, max_positions: int | None = None) -> None:
    """UserError when ``seq_len`` tokens are more than the model's learned position table has rows (or than
    its config's ``max_positions``, which is smaller when the table keeps offset rows)."""
    table = learned_positions(inv)
    if table is None:
        return
    rows, name = table
    limit = min(rows, max_positions) if max_positions else rows
    if seq_len > limit:
        raise UserError(f"{seq_len} tokens per sample is more than {inv.model} has learned positions for ({limit}: "
                        f"its {name.rsplit('.', 1)[0]} table): give at most {limit}")


__all__ = ["MAX_LAYERS", "OPTIONAL_SIZES", "SIZES", "check_config_data", "check_model_config",
           "check_sequence_length", "learned_positions"]
