"""Building models and their parameter inventories (:class:`~optimem.estimators.params.Inventory`).

:func:`instantiate` builds the real transformers model of a model source (on the meta device by default);
:func:`build_inventory` is its inventory, cached per config content in memory and on disk. Tied parameters
appear once: ties are found by tensor identity, never by ``data_ptr`` (0 for every meta tensor).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path

from .bnb_layout import logical_shape, quant_kind, quant_state_tensors
from .cache import key as cache_key, memo
from .catalog import ModelSource, resolve
from .errors import UserError
from .model_check import check_model_config
from .params import DTYPES, MODULE_KINDS, STORAGE_DTYPES, TASK_CLASSES, TORCH_DTYPE_NAMES, Inventory, ParamRow, \
    check_task, torch_dtype



def _module_kind(module) -> str:
    from torch import nn  # lazy: torch only when a model is built
    # lazy: pulls in torch, transformers, which importing this module does not
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower():
        return "norm"
    return "other"


def model_class_for(config_dict: dict):
    """The transformers class named by the config's ``architectures`` (else an Auto class)."""
    import transformers  # lazy: transformers only when a model is built

    for arch in config_dict.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return None


def _exc_text(exc: BaseException, limit: int = 300) -> str:
    """An exception from transformers as one line (its validators nest the cause on later lines)."""
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_config(source: ModelSource):
    """A ``PretrainedConfig`` from a catalog entry or a config.json file."""
    from transformers import CONFIG_MAPPING, AutoConfig  # lazy: transformers only when a model is built

    data = source.load()
    model_type = data.get("model_type")
    if not model_type:
        raise UserError(f"{source.name} is not a transformers config: it has no 'model_type'; "
                        "give a transformers config.json")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{source.name}: model_type '{model_type}' is not known to this transformers{hint}; "
                        "give a transformers config.json")
    kwargs = {k: v for k, v in data.items() if k != "model_type"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the config class refused the user's values: say why, in one line
        raise UserError(f"{source.name} is not a usable transformers config ({_exc_text(exc)}); "
                        "give a transformers config.json") from None


def model_class(source: ModelSource, task: str | None = None):
    """The transformers class (or Auto class) ``instantiate`` builds for ``source`` and ``task``."""
    import transformers  # lazy: transformers only when a model is built

    auto = TASK_CLASSES.get(check_task(task) or "causal-lm")
    if auto is not None:
        return getattr(transformers, auto)
    cls = model_class_for(source.load())
    if cls is not None:
        return cls
    config = build_config(source)
    return transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else \
        transformers.AutoModelForCausalLM


def instantiate(source: ModelSource, *, device: str = "meta", dtype: str | None = None, task: str | None = None):
    """Construct the real transformers model for ``source`` (random init unless on the meta device), with the
    head ``task`` names (see :data:`TASK_CLASSES`; default: the config's own architecture)."""
    check_model_config(source)  # sizes transformers would refuse or fail on, as data, before building anything
    import torch  # lazy: torch only when a model is built

    config = build_config(source)
    cls = model_class(source, task)
    tlog = logging.getLogger("transformers")
    old = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        with torch.device(device):
            model = cls.from_config(config) if cls.__name__.startswith("AutoModel") else cls(config)
    except Exception as exc:  # noqa: BLE001 - the modeling code refused the config: say why, in one line
        what = f" with a {task} head" if task else ""
        raise UserError(f"cannot build a model from {source.name}{what} ({_exc_text(exc)}); give a transformers "
                        "config.json of a model class that transformers knows") from None
    finally:
        tlog.setLevel(old)
    if dtype is not None:
        model = model.to(torch_dtype(dtype))
    return model


def inventory_from_model(model, *, name: str, config_hash: str = "", task: str | None = None) -> Inventory:
    """Build the inventory of an instantiated model (any device; peft-wrapped and bitsandbytes-quantized
    models too: a quantized weight's row has its logical shape and its storage bytes, see :class:`ParamRow`)
    with the head ``task`` names (None: the config's architecture)."""
    from torch import nn  # lazy: torch only when a model is built

    owner: dict[str, object] = {}
    linear_modules = tuple(m for m, mod in model.named_modules() if isinstance(mod, nn.Linear))
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    groups: dict[int, list[str]] = {}
    tensors: dict[int, object] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(pname)
        tensors[id(p)] = p
    rev = {v: k for k, v in TORCH_DTYPE_NAMES.items()} | {"uint8": "uint8", "int8": "int8"}
    rows = []
    seen_state: set[int] = set()
    for pid, names in groups.items():
        p = tensors[pid]
        first = names[0]
        module = owner[first]
        kinds = [_module_kind(owner[n]) for n in names]
        quant = quant_kind(p)
        storage = None
        if quant is not None:
            storage = p.numel() * p.element_size()
            for t in quant_state_tensors(p, module):
                if id(t) not in seen_state:
                    seen_state.add(id(t))
                    storage += t.numel() * t.element_size()
        rows.append(ParamRow(
            name=first,
            shape=logical_shape(p),
            dtype=rev.get(str(p.dtype).replace("torch.", ""), "fp32"),
            trainable=bool(p.requires_grad),
            module_kind=kinds[0],
            module_name=first.rsplit(".", 1)[0] if "." in first else "",
            module_class=type(module).__name__,
            tied=tuple(names[1:]),
            in_embedding="embedding" in kinds,
            quant=quant,
            storage_bytes=storage,
            storage_shape=tuple(int(x) for x in p.shape) if quant is not None else None,
            layer_norm=isinstance(module, nn.LayerNorm),
        ))
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    dtypes = {r.dtype for r in rows if r.quant is None}
    return Inventory(model=name, model_type=getattr(cfg, "model_type", "unknown"), architecture=archs[0],
                     rows=tuple(rows), config_hash=config_hash, dtype=dtypes.pop() if len(dtypes) == 1 else "fp32",
                     linear_modules=linear_modules, task=task)


INVENTORY_CACHE_VERSION = 3
"""Layout of the inventory's on-disk cache payload (:func:`inventory_payload`); bump it when that changes."""


def inventory_payload(inv: Inventory) -> dict:
    """``inv`` as JSON data (everything but its name and config hash, which the cache key holds)."""
    return {"model_type": inv.model_type, "architecture": inv.architecture, "dtype": inv.dtype,
            "linear_modules": list(inv.linear_modules),
            "rows": [[r.name, list(r.shape), r.dtype, r.trainable, r.module_kind, r.module_name, r.module_class,
                      list(r.tied), r.in_embedding, r.quant, r.storage_bytes,
                      list(r.storage_shape) if r.storage_shape is not None else None, r.layer_norm] for r in inv.rows]}


def inventory_from_payload(data: dict, *, name: str, config_hash: str, task: str | None = None) -> Inventory:
    """The inverse of :func:`inventory_payload`; raises (ValueError, TypeError, KeyError) on anything malformed."""
    def text(v) -> str:
        if not isinstance(v, str):
            raise TypeError(f"expected a string, got {v!r}")
        return v

    def flag(v) -> bool:
        if not isinstance(v, bool):
            raise TypeError(f"expected a boolean, got {v!r}")
        return v

    def sizes(v) -> tuple[int, ...]:
        if not isinstance(v, list) or not all(type(s) is int and s >= 0 for s in v):
            raise ValueError("malformed shape")
        return tuple(v)

    rows = []
    for name_, shape, dtype, trainable, kind, mname, mclass, tied, in_emb, quant, stored, stored_shape, ln in data["rows"]:
        if dtype not in STORAGE_DTYPES or kind not in MODULE_KINDS or quant not in (None, "nf4", "fp4", "int8") or \
                (stored is not None and (type(stored) is not int or stored < 0)):
            raise ValueError("malformed inventory row")
        rows.append(ParamRow(name=text(name_), shape=sizes(shape), dtype=dtype, trainable=flag(trainable),
                             module_kind=kind, module_name=text(mname), module_class=text(mclass),
                             tied=tuple(text(t) for t in tied), in_embedding=flag(in_emb), quant=quant,
                             storage_bytes=stored,
                             storage_shape=sizes(stored_shape) if stored_shape is not None else None,
                             layer_norm=flag(ln)))
    if not rows or data["dtype"] not in DTYPES:
        raise ValueError("malformed inventory")
    return Inventory(model=name, model_type=text(data["model_type"]), architecture=text(data["architecture"]),
                     rows=tuple(rows), config_hash=config_hash, dtype=data["dtype"],
                     linear_modules=tuple(text(m) for m in data["linear_modules"]), task=task)


@functools.lru_cache(maxsize=64)
def _inventory_cached(name: str, path: str, digest: str, task: str | None = None) -> Inventory:
    """Built once per config content and task: from the on-disk cache (no torch, no transformers) when it
    holds this config for these versions, else from a meta model (then stored)."""
    def build() -> Inventory:
        source = ModelSource(name, Path(path))
        model = instantiate(source, device="meta", task=task)
        return inventory_from_model(model, name=name, config_hash=digest, task=task)

    return memo(cache_key("inventory", INVENTORY_CACHE_VERSION, config=digest, task=task), build,
                      encode=inventory_payload,
                      decode=lambda d: inventory_from_payload(d, name=name, config_hash=digest, task=task))


@functools.lru_cache(maxsize=64)
def _inventory_of_memory(source: ModelSource) -> Inventory:
    """The inventory of a registered in-memory config (built on the meta device, like a file's)."""
    return inventory_from_model(instantiate(source, device="meta"), name=source.name,
                                config_hash=source.name.rsplit("#", 1)[-1])


@functools.lru_cache(maxsize=256)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of the config's content (canonical JSON: key order and whitespace do not matter)."""
    data = ModelSource(path, Path(path)).load()
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_digest(source: ModelSource) -> str:
    """A short hash of a config's content (a file's: cached per path, modification time and size; a registered
    in-memory config's: the digest its name carries)."""
    if source.path is None:
        return source.name.rsplit("#", 1)[-1]
    st = source.path.stat()
    return _digest(str(source.path), st.st_mtime_ns, st.st_size)


def build_inventory(model: str | ModelSource, dtype: str | None = None, task: str | None = None) -> Inventory:
    """The parameter inventory of ``model`` (a resolved source, or a catalog name, config path, Hub id or
    registered model object: see :func:`optimem.estimators.catalog.resolve`), stored in ``dtype`` (None: as built -- fp32 for a config, a model
    object's own dtypes, which may differ per parameter: PEFT keeps fp32 adapters beside a 16-bit base), with
    the head ``task`` names (default: the config's architecture).

    Cached per config content (a changed config file is rebuilt): a second call costs a stat and a lookup. A
    registered model object's inventory is the one taken from the object (its own trainable set and dtypes).
    """
    source = model if isinstance(model, ModelSource) else resolve(model)
    if source.path is None:
        inv = source.inventory if source.inventory is not None else _inventory_of_memory(source)
        return inv.with_dtype(dtype) if dtype else inv
    task = None if check_task(task) == "causal-lm" else task
    inv = _inventory_cached(source.name, str(source.path), config_digest(source), task)
    return inv.with_dtype(dtype) if dtype else inv
