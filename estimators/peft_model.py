"""The model the Trainer gets for a LoRA / QLoRA setup, built by peft, transformers and bitsandbytes themselves.

:func:`build_training_model` is the one place that turns a :class:`~optimem.estimators.setup.TrainingSetup` with
``lora`` / ``quantize`` into a model: on the ``meta`` device for the estimator (and for a tracer: every
parameter and quantization-state tensor is a meta tensor of its real shape and dtype), or for real from a
plain model with random weights (``bench run``). The steps are the user's:
1. the base model: the plain model of the setup (``optimem.estimators.inventory.instantiate``); quantized, it is
   what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` returns: transformers'
   bitsandbytes quantizer replaces the ``nn.Linear``/``Conv1D`` layers it converts (all but the output head,
   ``llm_int8_skip_modules`` and the model's ``_keep_in_fp32_modules``) by ``Linear4bit``/``Linear8bitLt``,
   and bitsandbytes quantizes each weight as it is loaded (:func:`quantized_model`). On the meta device the
   same quantizer converts the skeleton and bitsandbytes' own ``_quantize`` runs on meta tensors (its ops have
   fake kernels), so the storage layout is bitsandbytes' own: 4-bit weights packed two per byte
   (``uint8 [ceil(n/2), 1]``) with an fp32 absmax per 64-element block, or with double quantization a uint8
   absmax per block plus an fp32 absmax per 256 blocks, an fp32 offset and the shared 256-entry dynamic
   code; LLM.int8 weights as ``int8 [out, in]`` with an fp32 scale per row (``SCB``);
2. with ``prepare_kbit``: ``peft.prepare_model_for_kbit_training`` (every parameter frozen, fp16/bf16
   parameters that are not 4-bit upcast to fp32, checkpointing as ``gradient_checkpointing`` says,
   non-reentrant as the Trainer's);
3. with ``lora``: ``peft.get_peft_model(model, LoraConfig(...))`` (adapters in fp32: peft's
   ``autocast_adapter_dtype``).

:func:`adapter_inventory` is the parameter inventory of that model (cached): frozen base rows (quantized
rows carry their storage bytes, quantization state included), trainable adapter rows.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import re
import tempfile
import warnings

from .adapters import bnb_config_kwargs
from .cache import key as cache_key, library_versions, memo
from .errors import UserError, one_line
from .inventory import INVENTORY_CACHE_VERSION, config_digest, instantiate, inventory_from_model, \
    inventory_from_payload, inventory_payload
from .params import torch_dtype
from .setup import TrainingSetup

TASK_TYPES = {False: "CAUSAL_LM", True: "SEQ_2_SEQ_LM"}
"""peft ``task_type`` by whether the model is an encoder-decoder."""
GC_KWARGS = {"use_reentrant": False}
"""Checkpointing as the Trainer's (``activation_checkpointing_enable``'s default): non-reentrant."""


@contextlib.contextmanager
def _quiet():
    """transformers' and peft's warnings and progress bars off (saving and loading a tiny model prints bars)."""
    from transformers.utils import logging as hf_logging  # lazy: transformers only when a model is built

    tlog = logging.getLogger("transformers")
    old = tlog.level
    tlog.setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.setLevel(old)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch  # lazy: torch only when a model is built

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def bnb_config(setup):
    """The ``transformers.BitsAndBytesConfig`` of a quantized setup."""
    from transformers import BitsAndBytesConfig  # lazy: transformers only when a model is built

    return BitsAndBytesConfig(**bnb_config_kwargs(setup.quantize, double_quant=setup.double_quant,
                                                  compute_dtype=setup.quant_compute_dtype,
                                                  skip_modules=setup.quant_skip_modules))


def _bnb_quantizer(setup):
    from transformers.quantizers import AutoHfQuantizer  # lazy: transformers only when a model is built

    return AutoHfQuantizer.from_config(bnb_config(setup), pre_quantized=False)


def quantized_meta_model(setup):
    """The skeleton ``from_pretrained(..., quantization_config=...)`` builds, on the meta device, with every
    quantized weight in bitsandbytes' storage layout (see the module doc)."""
    import torch  # lazy: torch only when a model is built

    quantizer = _bnb_quantizer(setup)
    dtype = quantizer.update_dtype(torch_dtype(setup.dtype))
    with _quiet(), _default_dtype(dtype):
        model = instantiate(setup.source, device="meta")
        with torch.device("meta"):
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                       use_kernels=False)
    _cast_as_loaded(model, dtype)
    _quantize_on_meta(model)
    with _quiet():
        quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model


def _cast_as_loaded(model, dtype) -> None:
    """Floating-point parameters in the dtype loading gives them: ``dtype``, or fp32 where the model's dtype
    plan (``_keep_in_fp32_modules``) says so, as transformers' loader casts them (it matches the plan's
    patterns anywhere in a parameter's name)."""
    plan = [(re.compile(k.replace("*", ".*")), v) for k, v in model._get_dtype_plan(dtype).items()]
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        want = next((v for rx, v in plan if rx.search(name)), dtype)
        if p.dtype != want:
            p.data = p.data.to(want)


def _quantize_on_meta(model) -> None:
    """bitsandbytes' own quantization of every converted weight, on meta tensors (storage layout only)."""
    import bitsandbytes as bnb  # lazy: bitsandbytes only for a quantized model
    from bitsandbytes import functional  # lazy: pulls in torch, bitsandbytes, which importing this module does not

    # bitsandbytes caches its dynamic code (double quantization's) on the device of the first tensor it
    # quantizes: a meta tensor there would break every later real quantization in this process.
    cached = dict(functional.name2qmap)
    try:
        for module in model.modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                w = module.weight
                if isinstance(w, bnb.nn.Params4bit):
                    w.module = module
                module.weight = w._quantize("meta")
    finally:
        functional.name2qmap.clear()
        functional.name2qmap.update(cached)


def quantized_model(setup, base, device: str):
    """``from_pretrained(tmp, quantization_config=BitsAndBytesConfig(...), dtype=..., device_map=...)`` of the
    plain model ``base`` saved to a temporary directory: transformers' real quantization path, on ``device``."""
    with tempfile.TemporaryDirectory(prefix="optimem-quant-") as tmp, _quiet():
        base.save_pretrained(tmp)
        cls = type(base)
        try:
            return cls.from_pretrained(tmp, quantization_config=bnb_config(setup), dtype=torch_dtype(setup.dtype),
                                       device_map={"": device}, attn_implementation=setup.attn_implementation)
        except (ImportError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot load {setup.model} quantized as {setup.quantize} on {device}: "
                            f"{one_line(exc)}") from None


def lora_config(setup, model):
    """The ``peft.LoraConfig`` of the setup's adapter for ``model``."""
    from peft import LoraConfig  # lazy: peft only when a model is built

    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    try:
        return LoraConfig(**setup.lora.lora_config_kwargs(TASK_TYPES[enc_dec]))
    except (ValueError, TypeError) as exc:
        raise UserError(f"lora {setup.lora}: peft refuses it: {one_line(exc)}") from None


@contextlib.contextmanager
def _meta_params4bit_copy():
    """DoRA on a 4-bit layer deep-copies it to read its weight norm; bitsandbytes' ``Params4bit.__deepcopy__``
    makes the copy on the CPU and then assigns the data, which torch refuses for a meta tensor. For meta
    weights the copy is made around the (meta) data, as bitsandbytes' ``from_prequantized`` makes one; real
    weights are copied by bitsandbytes' own code."""
    import torch  # lazy: torch and bitsandbytes only when a model is built
    from bitsandbytes.nn import Params4bit  # lazy: pulls in torch, bitsandbytes, which importing this module does not

    original = Params4bit.__deepcopy__

    def deepcopy(self, memo):
        if self.device.type != "meta":
            return original(self, memo)
        new = torch.Tensor._make_subclass(type(self), self.data, self.requires_grad)
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo) if key == "quant_state" else value)
        return new

    Params4bit.__deepcopy__ = deepcopy
    try:
        yield
    finally:
        Params4bit.__deepcopy__ = original


def peft_wrap(model, setup):
    """Steps 2 and 3 of the module doc on ``model`` (any device): prepare for k-bit training, add the adapter."""
    if setup.prepare_kbit:
        from peft import prepare_model_for_kbit_training  # lazy: peft only when a model is built

        with _quiet():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=dict(GC_KWARGS))
    if setup.lora is None:
        return model
    from peft import get_peft_model  # lazy: peft only when a model is built

    config = lora_config(setup, model)
    meta_qdora = setup.quantize in ("nf4", "fp4") and setup.lora.dora and any(
        p.device.type == "meta" for p in model.parameters())
    try:
        with _quiet(), (_meta_params4bit_copy() if meta_qdora else contextlib.nullcontext()):
            return get_peft_model(model, config)
    except ValueError as exc:
        msg = one_line(exc)
        hint = ""
        if isinstance(setup.lora.target, str) and setup.lora.target != "all-linear":
            hint = (" (a target string is a regex that must match a module's whole qualified name, as peft "
                    "matches it; [name,name] matches name suffixes)")
        raise UserError(f"lora {setup.lora} on {setup.model}: {msg}{hint}") from None


def build_training_model(setup, *, device: str = "meta", base=None):
    """The model the Trainer gets for ``setup`` (see the module doc). ``device="meta"``: no memory, no
    weights (the estimator's and a tracer's). Otherwise ``base`` is the plain model with its weights (built
    by the caller, seeded, on the CPU); quantized, it is saved and loaded back quantized on ``device``;
    not quantized, it is wrapped as it is (the caller moves it)."""
    if device == "meta":
        if setup.quantize:
            model = quantized_meta_model(setup)
        else:
            with _quiet():
                model = instantiate(setup.source, device="meta", dtype=setup.dtype, task=setup.task)
    else:
        if base is None:
            raise ValueError("build_training_model on a real device needs the plain model (base)")
        model = quantized_model(setup, base, device) if setup.quantize else base
    return peft_wrap(model, setup)


TRACE_FIELDS = ("lora", "quantize", "double_quant", "quant_compute_dtype", "quant_skip_modules", "prepare_kbit", "task")
"""The setup fields that make the model a LoRA / QLoRA one (what a trace of it depends on besides the plain
model's setting)."""


def trace_fields(setup) -> str | None:
    """A peft setup's :data:`TRACE_FIELDS` as one JSON object (the ``peft`` field of a
    :class:`~optimem.estimators.trace.setting.TraceSetting`; plain data, part of the trace's key); None when the setup
    is not a peft one."""
    if not setup.peft:
        return None
    data = {k: getattr(setup, k) for k in TRACE_FIELDS}
    data["lora"] = str(data["lora"]) if data["lora"] is not None else None
    data["quant_skip_modules"] = list(data["quant_skip_modules"]) if data["quant_skip_modules"] else None
    return json.dumps(data, sort_keys=True)


def peak_limit(setup, device: str) -> str | None:
    """Why the whole-step peak of a LoRA / QLoRA ``setup`` on ``device`` cannot be traced (None: it can). On
    CUDA an LLM.int8 layer trains through bitsandbytes' ``MatMul8bitLt``, which splits the input's columns
    holding values above ``llm_int8_threshold`` into a 16-bit matmul of their own: a shape set by the values,
    which no trace can know (the CPU backend dequantizes the weight and runs one matmul: that is traced)."""
    if setup.quantize == "int8" and device == "cuda":
        return ("whole-step peak of an LLM.int8 base on CUDA: not estimated (bitsandbytes' CUDA matmul splits "
                "the input's outlier columns, those above llm_int8_threshold, by their values: a data-dependent "
                "shape a trace cannot follow; the CPU backend's path is traced); weights, adapters, gradients and "
                "optimizer state are exact -- use nf4/fp4 to plan")
    return None


DYNAMIC_CODE_BYTES = 256 * 4
"""bitsandbytes' dynamic quantization code: 256 fp32 values (bytes)."""


def resident_bytes(setup) -> int:
    """Bytes bitsandbytes keeps on the device outside the model for ``setup`` (bytes): double quantization of
    4-bit weights quantizes each absmax with the dynamic code that ``bitsandbytes.functional`` creates once on
    the weights' device and keeps in its module cache (``name2qmap["dynamic"]``); the loaded layers' quant
    states hold copies of their own (counted with the weights), the cached one stays alive all run."""
    return DYNAMIC_CODE_BYTES if setup.quantize in ("nf4", "fp4") and setup.double_quant else 0


def traced_training_model(source, fields: str, *, dtype: str, gradient_checkpointing: bool):
    """:func:`build_training_model` on meta for the model of ``source`` (a resolved
    :class:`~optimem.estimators.catalog.ModelSource`) with the peft ``fields`` of :func:`trace_fields`: the model a
    trace runs is the one the estimator's inventory and the Trainer get."""
    setup = TrainingSetup(model=source.name, optim="adamw_torch", dtype=dtype,
                          gradient_checkpointing=gradient_checkpointing, **json.loads(fields)).with_source(source)
    require_packages(setup)
    return build_training_model(setup, device="meta")


def cpu_run_limit(setup) -> str | None:
    """Why a LoRA/QLoRA setup cannot train on the CPU here (None if it can). bitsandbytes' CPU backend runs
    4-bit and 8-bit layers forward and backward; what fails is DoRA on LLM.int8 layers: on a CPU weight
    peft's ``dequantize_module_weight`` re-creates the ``Int8Params`` with ``.to(device)``, which drops its
    row scales once the layer has moved them to its state, so the second forward finds none."""
    if setup.quantize == "int8" and setup.lora is not None and setup.lora.dora:
        return ("DoRA on LLM.int8 layers fails on the CPU (peft 0.21's dequantize_module_weight re-creates the "
                "8-bit weight without its row scales; the second step raises): run it on CUDA, or use nf4/fp4")
    return None


def require_packages(setup) -> None:
    """UserError, with the install line, when a LoRA/QLoRA setup's libraries are missing."""
    need = (["peft"] if setup.lora is not None or setup.prepare_kbit else []) + (["bitsandbytes"] if setup.quantize
                                                                                 else [])
    missing = [n for n in need if importlib.util.find_spec(n) is None]
    if missing:
        raise UserError(f"LoRA/QLoRA setups are built by {' and '.join(missing)}, which is not installed: "
                        "pip install 'optimem[peft]'")


# ---------------------------------------------------------------------------------------------- inventory
def inventory_key(setup) -> tuple:
    """What the inventory of a peft setup depends on (checkpointing and the optimizer do not change it)."""
    return (setup.model, setup.dtype, str(setup.lora) if setup.lora else None, setup.quantize, setup.double_quant,
            setup.quant_skip_modules, setup.prepare_kbit) + ((setup.task,) if setup.task != "causal-lm" else ())


_INVENTORIES: dict = {}


def adapter_inventory(setup):
    """The :class:`~optimem.estimators.inventory.Inventory` of :func:`build_training_model` on meta for ``setup``
    (cached per config content, :func:`inventory_key` and the torch / transformers / peft / bitsandbytes
    versions, in memory and in optimem's on-disk cache: a warm LoRA estimate imports none of them)."""
    source = setup.source
    digest = config_digest(source)
    key = inventory_key(setup)
    inv = _INVENTORIES.get((key, digest))
    if inv is None:
        # Its own content hash (the config's and the adapter's): caches keyed by an inventory never mix it up
        # with the plain model's.
        own = hashlib.sha1(json.dumps([digest, key], default=str).encode()).hexdigest()[:16]

        def build():
            require_packages(setup)
            model = build_training_model(setup, device="meta")
            return inventory_from_model(model, name=source.name, config_hash=own)

        k = cache_key("adapter_inventory", INVENTORY_CACHE_VERSION, config=digest, adapter=[str(x) for x in key],
                      **library_versions())
        inv = memo(k, build, encode=inventory_payload,
                         decode=lambda d: inventory_from_payload(d, name=source.name, config_hash=own))
        _INVENTORIES[(key, digest)] = inv
        if len(_INVENTORIES) > 64:
            _INVENTORIES.pop(next(iter(_INVENTORIES)))
    return inv


__all__ = ["DYNAMIC_CODE_BYTES", "GC_KWARGS", "TASK_TYPES", "TRACE_FIELDS", "adapter_inventory", "bnb_config",
           "build_training_model", "cpu_run_limit", "inventory_key", "lora_config", "peak_limit", "peft_wrap",
           "quantized_meta_model", "quantized_model", "require_packages", "resident_bytes", "trace_fields",
           "traced_training_model"]
