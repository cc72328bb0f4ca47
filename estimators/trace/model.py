"""The model a trace runs: built from its config exactly as the harness builds it, then made of trace tensors.

:func:`build_traced_model` calls :func:`optimem.estimators.inventory.instantiate` (the class selection and dtype cast
``bench run`` uses) on the meta device, then prepares it as the Trainer does before its first step: the
attention implementation, frozen parameters, the Trainer's non-reentrant activation checkpointing under
``gradient_checkpointing``, ``config.use_cache = False`` (``TrainingArguments.use_cache``), training mode. Parameters and buffers become
:class:`~optimem.estimators.trace.tensor.TraceTensor`\\ s (tied ones stay one tensor).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import torch

from ..catalog import ModelSource
from ..errors import UserError, one_line
from ..inventory import instantiate
from ..peft_model import traced_training_model
from ..sample_tokens import closing_token, vocab_size
from .tensor import from_meta, named_trace_tensor


@dataclass(frozen=True)
class ModelFacts:
    """What the Trainer reads from the model before training (``Trainer.__init__``): whether its forward
    takes ``num_items_in_batch`` (``model_accepts_loss_kwargs``), whether the loss shifts the labels (the
    count of label tokens then skips position 0), whether it is an encoder-decoder, its vocabulary, the
    attention implementation it really runs, the number of labels of a classification head and the token id
    each sample ends with (:func:`optimem.estimators.sample_tokens.closing_token`)."""

    accepts_loss_kwargs: bool
    shifts_labels: bool
    encoder_decoder: bool
    vocab_size: int
    attn_implementation: str
    num_labels: int
    main_input: str
    closing_token: int | None = None
    layerdrop: str = ""
    """The LayerDrop probabilities the model was built with (``encoder_layerdrop=0.05``), turned off in the trace."""


BNB_PARAMS = ("Params4bit", "Int8Params")
"""bitsandbytes' quantized parameter classes: traced as trace tensors of the same class name, with their
quantization state (``quant_state``; ``CB``/``SCB``) made of trace tensors."""
BNB_STATES = ("QuantState", "MatmulLtState")
"""bitsandbytes' objects holding a quantized weight's state tensors (on the parameter or on its layer)."""


def _traced(value, memo: dict):
    """``value`` with every meta tensor in it a trace tensor (a bitsandbytes state object copied, its tensors
    converted; tensors seen before map to the same trace tensor)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = from_meta(value)
        return memo[id(value)]
    if type(value).__name__ in BNB_STATES:
        if id(value) not in memo:
            new = memo[id(value)] = copy.copy(value)
            for k, v in vars(value).items():
                setattr(new, k, _traced(v, memo))
        return memo[id(value)]
    return value


def _bnb_param(p, memo: dict) -> torch.Tensor:
    new = named_trace_tensor(type(p).__name__, p.data)
    for k, v in vars(p).items():
        setattr(new, k, _traced(v, memo))
    return new


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the meta device: a parameter the modeling code made on the CPU even under ``torch.device("meta")``
    (``torch.normal(mean, std, size=...)``, as DiffLlama's lambdas are) becomes a meta tensor of its shape."""
    return t if t.device.type == "meta" else t.to("meta")


def _as_trace_tensors(model: torch.nn.Module) -> None:
    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                memo[id(p)] = _bnb_param(p, memo) if type(p).__name__ in BNB_PARAMS else \
                    torch.nn.Parameter(from_meta(_on_meta(p.data)), requires_grad=p.requires_grad)
            mod._parameters[name] = memo[id(p)]
        for key, value in list(vars(mod).items()):
            if type(value).__name__ in BNB_STATES:
                setattr(mod, key, _traced(value, memo))
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if id(b) not in memo:
                memo[id(b)] = from_meta(b)
            mod._buffers[name] = memo[id(b)]


def _with_peft(model, source: ModelSource):
    """The PEFT model the user's object is: ``get_peft_model`` with its config, on the meta model (before the
    trace tensors: PEFT swaps modules, which works on meta parameters)."""
    try:
        from peft import PeftConfig, get_peft_model  # lazy: peft is optional
    except ImportError:
        raise UserError(f"{source.name} is a PEFT model: install peft to trace it") from None
    data = dict(source.peft)
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(data.get(key), list):
            data[key] = set(data[key])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, PeftConfig.from_peft_type(**data))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{source.name}: cannot rebuild its PEFT wrapping ({one_line(exc, 200)})") from None


def build_traced_model(source: ModelSource, *, dtype: str, task: str | None, attn: str, gc: bool,
                       frozen: tuple[str, ...] = (), peft: str | None = None) -> tuple[torch.nn.Module, ModelFacts]:
    """The model for one trace (see the module docstring). ``attn``: ``sdpa`` (what the Trainer gets by
    default, when the model supports it) or ``eager``; ``frozen``: names of parameters that get no gradient;
    ``peft``: a LoRA / QLoRA setup's fields (:func:`optimem.estimators.peft_model.trace_fields`): the model is then
    :func:`optimem.estimators.peft_model.build_training_model`'s, on meta (quantized layers, prepared for k-bit
    training, the adapter added), as the Trainer gets it."""
    # lazy: pulls in transformers, which importing this module does not
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if peft:
        model = traced_training_model(source, peft, dtype=dtype, gradient_checkpointing=gc)
    else:
        model = instantiate(source, device="meta", dtype=dtype, task=task)
        if getattr(source, "peft", None):
            model = _with_peft(model, source)
    cfg = model.config
    current = getattr(cfg, "_attn_implementation", None) or "eager"
    if attn != current:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.set_attn_implementation(attn)
        except (ValueError, ImportError, AttributeError) as exc:
            if attn != "sdpa":
                raise UserError(f"{source.name}: cannot use attn_implementation={attn!r} "
                                f"({one_line(exc, 200)})") from None
    attn_used = getattr(model.config, "_attn_implementation", None) or "eager"
    if frozen:
        names = set(frozen)
        for name, p in model.named_parameters():
            if name in names:
                p.requires_grad_(False)
    layerdrop = _no_layerdrop(model)
    _as_trace_tensors(model)
    if gc:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if hasattr(model, "activation_checkpointing_enable"):
                    model.activation_checkpointing_enable()
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except ValueError as exc:
                raise UserError(f"{source.name}: {one_line(exc, 10**6)}") from None
    cfg.use_cache = False  # Trainer.__init__: model.config.use_cache = args.use_cache (False by default)
    model.train()
    if hasattr(model, "accepts_loss_kwargs"):
        accepts = bool(model.accepts_loss_kwargs)
    else:
        accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    shifts = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not enc_dec
    facts = ModelFacts(accepts, shifts, enc_dec, vocab_size(cfg), attn_used, int(getattr(cfg, "num_labels", 2) or 2),
                       getattr(model, "main_input_name", "input_ids"), closing_token(cfg), layerdrop)
    return model, facts


def _no_layerdrop(model) -> str:
    """Turn LayerDrop off in the traced model -- every layer runs, the step's largest draw -- and say what it was
    (``""``: none). In training, LayerDrop skips each layer when a ``torch.rand`` draw falls below the probability
    (a module's ``layerdrop`` or its config's ``*layerdrop``): a real step's memory is a random draw, which a trace
    cannot reproduce."""
    seen: dict[str, float] = {}
    for module in model.modules():
        v = getattr(module, "layerdrop", None)
        if isinstance(v, float) and v > 0:
            seen["layerdrop"] = v
            module.layerdrop = 0.0
        cfg = getattr(module, "config", None)
        for k, v in list(vars(cfg).items()) if cfg is not None and hasattr(cfg, "__dict__") else ():
            if k.endswith("layerdrop") and isinstance(v, float) and v > 0:
                seen[k] = v
                setattr(cfg, k, 0.0)
    return ", ".join(f"{k}={v}" for k, v in sorted(seen.items()))


__all__ = ["ModelFacts", "build_traced_model"]
