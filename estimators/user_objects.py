"""The user's own objects as optimem inputs: a transformers config, a model (``PreTrainedModel`` or PEFT model,
meta or real) and a ``TrainingArguments``.

A model object becomes an in-memory model source (:func:`model_source`): its config registered as
``LABEL#DIGEST`` with the inventory taken from the object (its trainable set, shapes, dtypes; nothing else of the
object is kept). :func:`from_training_arguments` / :func:`setup_for` turn the arguments (and a model object's
LoRA / bitsandbytes facts, :func:`peft_fields`) into a :class:`~optimem.estimators.setup.TrainingSetup`.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .adapters import LoraSpec
from .catalog import ModelSource, register, resolve
from .errors import UserError
from .inventory import inventory_from_model
from .params import normalize_dtype
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
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return bool(getattr(model, attr, False))
    return False


def setup_for(model: Any, optim: Any = None, **fields: Any) -> TrainingSetup:
    """The :class:`TrainingSetup` of ``model`` (a name or the user's object) trained with ``optim``: an
    optimizer name, or a ``TrainingArguments`` (then its optim, batch, accumulation, precision,
    checkpointing, device and parallelism; see :func:`from_training_arguments`). ``fields``
    (``seq_len``, ``dtype``...) win over both."""
    if is_training_arguments(optim):
        return from_training_arguments(optim, model=model, **fields)
    if optim is None:
        raise UserError("an optimizer name (optim=...) or a transformers TrainingArguments is needed, as the "
                        "Trainer takes them")
    base = fields_from_model(model) if not isinstance(model, str) else {"model": model}
    return TrainingSetup(**{**base, "optim": optim, **fields})


def peft_fields(model) -> dict[str, Any]:
    """The setup fields a user's peft model object stands for: ``lora`` (its active LoRA adapter's config) and,
    for a base bitsandbytes loaded, ``quantize`` / ``double_quant`` / ``quant_compute_dtype`` /
    ``quant_skip_modules`` from its ``quantization_config``. Empty for other peft methods (prefix tuning, IA3...),
    which optimem does not describe as a setup."""
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    config = config if config is not None else next(iter(configs.values()), None)
    if config is None or type(config).__name__ != "LoraConfig":
        return {}
    out: dict[str, Any] = {"lora": LoraSpec.from_peft(config)}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    q = getattr(getattr(base, "config", None), "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    method = q.get("quant_method", "") if isinstance(q, Mapping) else ""
    if str(getattr(method, "value", method)).lower() in ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"):
        if q.get("load_in_4bit"):
            out.update(quantize=q.get("bnb_4bit_quant_type") or "fp4",
                       double_quant=bool(q.get("bnb_4bit_use_double_quant")))
            dtype = q.get("bnb_4bit_compute_dtype")
            if dtype:
                out["quant_compute_dtype"] = normalize_dtype(str(dtype))
        elif q.get("load_in_8bit"):
            out["quantize"] = "int8"
        if q.get("llm_int8_skip_modules") and out.get("quantize"):
            out["quant_skip_modules"] = tuple(q["llm_int8_skip_modules"])
    return out



def from_training_arguments(args, *, model: Any = None, seq_len: int | None = None, **overrides) -> TrainingSetup:
    """The setup a ``transformers.TrainingArguments`` describes, for ``model`` at ``seq_len`` tokens per
    sample; ``overrides`` win.

    From ``args``: optim, optim_args, optim_target_modules, per-device batch, accumulation, bf16/fp16,
    gradient checkpointing, the device (``use_cpu``), the processes (``args.world_size`` where the launcher
    set one) and how they shard the model states: ``fsdp`` / ``fsdp_config`` (FSDP2 full shard, CPU offload
    included) and ``deepspeed`` (its ZeRO stage and offload, ``auto`` resolved; see :func:`parallelism_of`);
    several processes without either are DDP; ``use_liger_kernel`` / ``liger_kernel_config``, and TRL's
    ``padding_free``. What optimem does not model (FSDP's shard_grad_op/hybrid, FSDP1) is a UserError. ``model``: a model name (catalog, config.json, Hub id) or the user's own object (a
    ``PretrainedConfig``, ``PreTrainedModel`` or PEFT model; see the module doc), which
    also gives the storage dtype and whether checkpointing is already on."""
    optim = getattr(args.optim, "value", args.optim)
    mp = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else None
    kw: dict[str, Any] = dict(
        optim=str(optim), optim_args=args.optim_args or None,
        optim_target_modules=args.optim_target_modules,
        batch_size=int(args.per_device_train_batch_size), grad_accum=int(args.gradient_accumulation_steps),
        mixed_precision=mp, gradient_checkpointing=_checkpointing_of(args),
        device="cpu" if getattr(args, "use_cpu", False) else "auto")
    kw.update(parallelism_of(args))
    if getattr(args, "use_liger_kernel", False) is True:
        kw["use_liger_kernel"] = True
        config = getattr(args, "liger_kernel_config", None)
        if config:
            kw["liger_kernel_config"] = json.dumps(dict(config), sort_keys=True)
    if getattr(args, "padding_free", False) is True:  # TRL's SFTConfig(padding_free=True)
        kw["padding_free"] = True
    if model is not None and not isinstance(model, str):
        found = fields_from_model(model)
        found["gradient_checkpointing"] = found.get("gradient_checkpointing", False) or kw["gradient_checkpointing"]
        kw.update(found)
    elif model is not None:
        kw["model"] = model
    if seq_len is not None:
        kw["seq_len"] = seq_len
    kw.update(overrides)
    return TrainingSetup(**kw)


def _checkpointing_of(args) -> bool:
    """``activation_checkpointing`` (``gradient_checkpointing`` in older transformers) of a TrainingArguments;
    UserError for the variants the estimator does not model (every n-th layer, offloaded activations)."""
    on = getattr(args, "activation_checkpointing", None)
    if on is None:
        on = getattr(args, "gradient_checkpointing", False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs",
                                                                               None) or {}
    if on and isinstance(kwargs, Mapping):
        if int(kwargs.get("every_n_layers", 1) or 1) != 1:
            raise UserError(f"activation checkpointing of every {kwargs['every_n_layers']} layers is not modelled: "
                            "optimem models checkpointing every layer (every_n_layers=1)")
        if kwargs.get("offload"):
            raise UserError("offloaded activation checkpointing is not modelled: optimem models checkpointing "
                            "every layer with the saved inputs kept on the device")
    return bool(on)


def parallelism_of(args) -> dict[str, Any]:
    """The setup fields of a ``TrainingArguments``' parallelism: ``num_processes`` (``args.world_size``),
    ``deepspeed`` (its config as JSON text, ``auto`` values and all: the setup resolves them as the Trainer does)
    or ``fsdp`` / ``fsdp_config``; several processes without either are ``ddp``. UserError (one line) for what
    :mod:`optimem.estimators.offload_config` refuses."""
    processes = _world_size(args)
    out: dict[str, Any] = {"num_processes": processes}
    fsdp = getattr(args, "fsdp", None)
    ds = getattr(args, "deepspeed", None)
    if fsdp and ds:
        raise UserError("TrainingArguments set both fsdp and deepspeed: the Trainer takes one of them")
    if fsdp:
        items = fsdp.split() if isinstance(fsdp, str) else [str(getattr(i, "value", i)) for i in fsdp] \
            if isinstance(fsdp, (list, tuple)) else ["full_shard"]
        config = getattr(args, "fsdp_config", None) or {}
        out.update(fsdp=" ".join(items) or "full_shard",
                   fsdp_config=json.dumps(dict(config), default=str) if config else None)
    elif ds:
        hf = getattr(args, "hf_deepspeed_config", None)
        config = getattr(hf, "config", None)
        out["deepspeed"] = json.dumps(dict(config if isinstance(config, Mapping) else ds), default=str) \
            if isinstance(config, Mapping) or isinstance(ds, Mapping) else str(ds)
    elif processes > 1:
        out["sharding"] = "ddp"
    return out


def _world_size(args) -> int:
    try:
        n = int(getattr(args, "world_size", 1) or 1)
    except Exception:  # noqa: BLE001 - a partial stand-in for TrainingArguments: one process
        n = 1
    return max(n, 1)


__all__ = ["base_model", "fields_from_model", "from_training_arguments", "is_config", "is_model", "is_peft_model",
           "is_training_arguments", "model_source", "parallelism_of", "peft_fields", "setup_for"]
