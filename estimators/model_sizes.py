"""Element counts of one model that sharding and throughput arithmetic need (:class:`ModelSizes`), read off its
parameter inventory and config: parameters, non-embedding parameters, layers and width, the largest module and
the largest FSDP unit, the Trainer's weight-decay groups. Counts are elements, not bytes.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .catalog import resolve
from .errors import UserError
from .params import Inventory
from .throughput import flops_per_token

@dataclass(frozen=True)
class ModelSizes:
    """What the throughput and sharding arithmetic needs from one model (element counts)."""

    num_params: int
    trainable_params: int
    non_embedding_params: int
    layers: int | None
    hidden: int | None
    largest_module_params: int
    """Largest set of parameters one module owns directly (what ZeRO-3 gathers at once)."""
    largest_unit_params: int
    """Largest FSDP unit: a repeated block (``...layers.<i>``), the input embedding, the output head
    with the final norm, or the rest of the root."""
    largest_unit: str
    decay_params: int
    no_decay_params: int
    autocast_cast_params: int = 0
    """Elements autocast casts and caches for the whole forward: the weights (and biases) of every matmul
    layer, a tied input embedding included (it is the output head's weight)."""
    fsdp_root_params: int = 0
    """Parameters left to the root FSDP unit (not in a layer, the input embedding or the tail): GPT-2's
    position embedding. The root is never resharded between forward and backward."""

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token at ``seq_len`` (:func:`optimem.estimators.throughput.flops_per_token`)."""
        return flops_per_token(self.non_embedding_params, self.layers, self.hidden, seq_len)


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _config(inv: Inventory) -> dict:
    try:
        return resolve(inv.model).load()
    except UserError:
        return {}


@functools.lru_cache(maxsize=64)
def model_sizes(inv: Inventory) -> ModelSizes:
    """Element counts of ``inv`` that planning needs (cached per inventory)."""
    cfg = _config(inv)
    rows = inv.rows
    trainable = [r for r in rows if r.trainable]
    non_emb = sum(r.numel for r in rows if not r.in_embedding)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if cfg.get("is_encoder_decoder"):
        layers = (cfg.get("num_layers") or 0) + (cfg.get("num_decoder_layers") or cfg.get("num_layers") or 0) or layers
    hidden = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd")
    per_module: dict[str, int] = {}
    for r in rows:
        per_module[r.module_name] = per_module.get(r.module_name, 0) + r.numel
    units: dict[str, int] = {}
    vocab = cfg.get("vocab_size")
    for r in rows:
        m = _BLOCK.match(r.name)
        if m:
            key = m.group(1)
        elif r.in_embedding and r.tied:
            key = "head"  # an input embedding tied to the output head: accelerate puts both in the tail unit
        elif (r.module_kind == "embedding" or r.in_embedding) and r.shape and r.shape[0] == vocab:
            key = r.module_name or r.name  # the input embedding: its own unit
        elif r.module_kind == "embedding" or r.in_embedding:
            key = "root"  # other embeddings (GPT-2's positions) stay with the root module
        elif len(r.shape) >= 2 and r.module_kind in ("linear", "conv1d"):
            key = "head"  # the output projection(s) and the final norm form accelerate's tail unit
        elif r.module_kind == "norm":
            key = "head"
        else:
            key = "root"
        units[key] = units.get(key, 0) + r.numel
    root = units.pop("root", 0)
    unit_name, unit_params = max(units.items(), key=lambda kv: kv[1]) if units else ("root", root)
    no_decay = sum(r.numel for r in trainable if r.module_kind == "norm" or r.name.endswith("bias"))
    return ModelSizes(num_params=inv.num_params, trainable_params=inv.trainable_params,
                      non_embedding_params=non_emb, layers=int(layers) if layers else None,
                      hidden=int(hidden) if hidden else None,
                      largest_module_params=max(per_module.values(), default=0),
                      largest_unit_params=unit_params, largest_unit=unit_name, fsdp_root_params=root,
                      decay_params=inv.trainable_params - no_decay, no_decay_params=no_decay,
                      autocast_cast_params=sum(r.numel for r in rows if r.module_kind in ("linear", "conv1d")
                                               or (r.in_embedding and r.tied)))


__all__ = ["ModelSizes", "model_sizes"]
