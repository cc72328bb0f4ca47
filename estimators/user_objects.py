"""The user's own objects as optimem inputs: a transformers config, a model (``PreTrainedModel`` or a PEFT model,
on the meta device or real) and a ``TrainingArguments``.

A model object becomes a model source that is not a file (:func:`model_source`): its config dict, registered
content-addressed under ``LABEL#DIGEST`` (:func:`optimem.estimators.catalog.register`), so every part of the estimator
that resolves a model name (the inventory, the architecture, the planner, the tracer) finds it again; a model
object also registers the parameter inventory taken from the object itself -- its own trainable set (frozen
layers, PEFT adapters), shapes and dtypes -- which :func:`optimem.estimators.inventory.build_inventory` then returns.
Nothing from the object is kept but that data (no reference to the model or its tensors).

:func:`setup_for` is what ``estimate(model, args, seq_len=...)`` and ``planner.plan_setup`` call: the
:class:`~optimem.estimators.setup.TrainingSetup` for that model under those arguments.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .catalog import ModelSource, register, resolve
from .errors import UserError
from .setup import ATTN_IMPLEMENTATIONS, TrainingSetup


def is_training_arguments(obj: Any) -> bool:
    """Whether ``obj`` is a ``transformers.TrainingArguments`` (or quacks like one), without importing it."""
    return (not isinstance(obj, (str, bytes, Mapping)) and hasattr(obj, "per_device_train_batch_size")
            and hasattr(obj, "optim") and hasattr(obj, "gradient_accumulation_steps"))


def is_config(obj: Any) -> bool:
    """A ``transformers.PretrainedConfig`` (a ``to_dict`` and a ``model_type``, not a module)."""
    return hasattr(obj, "to_dict") and isinstance(getattr(obj, "model_type", None), str) \
        and not hasattr(obj, "named_parameters")


def is_model(obj: Any) -> bool:
    """A torch module with a transformers config (a ``PreTrainedModel``, or a PEFT model wrapping one)."""
    return hasattr(obj, "named_parameters") and hasattr(obj, "named_modules")


def is_peft_model(obj: Any) -> bool:
    return is_model(obj) and hasattr(obj, "peft_config") and hasattr(obj, "get_base_model")


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def _config_dict(config: Any) -> dict:
    data = config.to_dict()
    if not data.get("model_type"):
        data["model_type"] = getattr(config, "model_type", None)
    return data


def _label(config: Any, model: Any = None) -> str:
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "").strip()
    if not name:
        archs = getattr(config, "architectures", None) or []
        name = archs[0] if archs else (type(model).__name__ if model is not None else str(config.model_type))
    if is_peft_model(model):
        name += "+peft"
    return name.replace("#", "_")


def model_source(model: Any) -> ModelSource:
    """The model source of a model name or of the user's object (see the module doc)."""
    if isinstance(model, str):
        return resolve(model)
    if isinstance(model, ModelSource):
        return model
    if is_config(model):
        return register(_config_dict(model), label=_label(model))
    if is_model(model):
        config = getattr(base_model(model), "config", None)
        if config is None or not is_config(config):
            raise UserError(f"{type(model).__name__} has no transformers config (.config): give a PreTrainedModel, "
                            "a PEFT model, a PretrainedConfig, or a model name")
        from .inventory import inventory_from_model

        label = _label(config, model)
        inv = inventory_from_model(model, name=label)
        rows = [(r.name, r.shape, r.dtype, r.trainable) for r in inv.rows]

        def named(name: str):
            # labelled with the dtype most of its bytes are stored in (PEFT keeps fp32 adapters beside a 16-bit base)
            return replace(inv, model=name, config_hash=name.rsplit("#", 1)[-1], dtype=_main_dtype(inv), _cache={})

        return register(_config_dict(config), label=label, extra=rows, inventory=named, peft=_peft_config(model))
    raise UserError(f"model must be a model name (catalog, config.json, Hub id), a transformers config, a "
                    f"PreTrainedModel or a PEFT model, got {type(model).__name__}")


def _peft_config(model: Any) -> dict | None:
    """A PEFT model's (active) adapter config as plain data, for the whole-step tracer to rebuild the wrapping."""
    if not is_peft_model(model):
        return None
    cfg = model.peft_config.get(getattr(model, "active_adapter", "default")) or next(iter(model.peft_config.values()))
    data = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in data.items()}


def _main_dtype(inv) -> str:
    per: dict[str, int] = {}
    for r in inv.rows:
        per[r.dtype] = per.get(r.dtype, 0) + r.nbytes
    return max(per, key=per.get) if per else "fp32"


def fields_from_model(model: Any) -> dict[str, Any]:
    """The setup fields a model object (or name) decides: ``model`` (the registered name), and for a model
    object the ``dtype`` most of its parameter bytes are stored in, ``gradient_checkpointing`` when it is
    already on, and the attention implementation it was built with (where optimem models it: sdpa, eager)."""
    source = model_source(model)
    out: dict[str, Any] = {"model": source.name}
    if source.inventory is not None:
        out["dtype"] = source.inventory.dtype
    if is_peft_model(model):
        from .peft_model import peft_fields

        out.update(peft_fields(model))  # a LoRA adapter (and a bitsandbytes base) makes a LoRA/QLoRA setup
    if is_model(model):
        inner = base_model(model)
        if _checkpointing_on(inner):
            out["gradient_checkpointing"] = True
        attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        if attn in ATTN_IMPLEMENTATIONS:
            out["attn_implementation"] = attn
    return out


def _checkpointing_on(model: Any) -> bool:
    """Whether the model's gradient checkpointing is already on (transformers' own flag)."""
    import warnings

    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return bool(getattr(model, attr, False))
    return False


def setup_for(model: Any, optim: Any = None, **fields: Any) -> TrainingSetup:
    """The :class:`TrainingSetup` of ``model`` (a name or the user's object) trained with ``optim``: an
    optimizer name, or a ``TrainingArguments`` (then its optim, batch, accumulation, precision,
    checkpointing, device and parallelism; see :meth:`TrainingSetup.from_training_arguments`). ``fields``
    (``seq_len``, ``dtype``...) win over both."""
    if is_training_arguments(optim):
        return TrainingSetup.from_training_arguments(optim, model=model, **fields)
    if optim is None:
        raise UserError("an optimizer name (optim=...) or a transformers TrainingArguments is needed, as the "
                        "Trainer takes them")
    base = fields_from_model(model) if not isinstance(model, str) else {"model": model}
    return TrainingSetup(**{**base, "optim": optim, **fields})


__all__ = ["base_model", "fields_from_model", "is_config", "is_model", "is_peft_model", "is_training_arguments",
           "model_source", "setup_for"]
