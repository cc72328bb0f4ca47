"""Parameter inventory: every parameter of a real transformers model, built on the meta device.

The inventory is built once per config (cached) and holds, per unique parameter, its qualified name,
shape, dtype, trainable flag, module kind and the other names it is tied to. Tied parameters appear
once: ties are found by tensor identity, never by ``data_ptr`` (which is 0 for every meta tensor).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field, replace

from .catalog import ModelSource, resolve
from .errors import UserError

DTYPES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Storage dtype name -> bytes per element."""

STORAGE_DTYPES: dict[str, int] = {**DTYPES, "uint8": 1, "int8": 1}
"""Every dtype a parameter is stored in (bitsandbytes' 4-bit weights are packed uint8, LLM.int8's int8) ->
bytes per element."""

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                  "fp16": "fp16", "float16": "fp16", "half": "fp16"}

MODULE_KINDS = ("linear", "conv1d", "embedding", "norm", "other")


def normalize_dtype(dtype: str) -> str:
    """'bfloat16' -> 'bf16' etc.; raises UserError for anything else."""
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPE_ALIASES:
        raise UserError(f"unknown dtype '{dtype}': use one of fp32, bf16, fp16")
    return _DTYPE_ALIASES[key]


@dataclass(frozen=True)
class ParamRow:
    """One unique parameter.

    ``module_kind`` is the kind of the module owning ``name``; ``is_linear_module`` tells whether that
    module is a ``torch.nn.Linear`` (what GaLore/APOLLO can target); ``in_embedding`` whether any name of
    the parameter belongs to an ``nn.Embedding`` (what the Trainer keeps in 32-bit for 8-bit bnb).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    module_kind: str
    module_name: str
    module_class: str
    tied: tuple[str, ...] = ()
    in_embedding: bool = False
    quant: str | None = None
    """``nf4``/``fp4``/``int8`` for a weight bitsandbytes quantized (then ``shape`` is the weight's logical
    shape, ``dtype`` its storage dtype and ``storage_bytes`` what it holds)."""
    storage_bytes: int | None = None
    """A quantized weight's bytes: its packed data and its quantization state (absmax, codes, scales; a
    state tensor shared by several weights counted at its first owner)."""
    storage_shape: tuple[int, ...] | None = None
    """A quantized weight's tensor shape as stored (4-bit: ``(ceil(n / 2), 1)``); None: ``shape``."""

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The parameter tensor's own shape (what code that reads ``param.shape`` sees)."""
        return self.storage_shape if self.storage_shape is not None else self.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        """Bytes per element of the stored parameter."""
        return STORAGE_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.storage_bytes if self.storage_bytes is not None else self.numel * self.element_size

    @property
    def is_linear_module(self) -> bool:
        return self.module_kind == "linear"


@dataclass(frozen=True, eq=False)
class Inventory:
    """All unique parameters of one model config, in ``named_parameters()`` order.

    Compared and hashed by identity: inventories are built once and cached, so estimates can cache on them.
    """

    model: str
    model_type: str
    architecture: str
    rows: tuple[ParamRow, ...]
    config_hash: str
    """SHA-256 of the config's content ('' for an inventory not built from a config file)."""
    dtype: str = "fp32"
    linear_modules: tuple[str, ...] = ()
    """Names of every ``nn.Linear`` module (tied ones too), as ``named_modules()`` lists them."""
    task: str | None = None
    """The head the model was built with (:data:`TASK_CLASSES`; None or ``causal-lm``: the config's
    architecture)."""
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def _totals(self) -> dict[str, int]:
        """Sums over the rows, computed once per inventory (elements and bytes)."""
        totals = self._cache.get("totals")
        if totals is None:
            trainable = [r for r in self.rows if r.trainable]
            totals = self._cache["totals"] = {
                "num_params": sum(r.numel for r in self.rows),
                "trainable_params": sum(r.numel for r in trainable),
                "weight_bytes": sum(r.nbytes for r in self.rows),
                "trainable_bytes": sum(r.nbytes for r in trainable),
                "largest_trainable_bytes": max((r.nbytes for r in trainable), default=0),
            }
        return totals

    @property
    def num_params(self) -> int:
        return self._totals()["num_params"]

    @property
    def trainable_params(self) -> int:
        return self._totals()["trainable_params"]

    @property
    def weight_bytes(self) -> int:
        """Bytes of all parameters as stored."""
        return self._totals()["weight_bytes"]

    @property
    def trainable_bytes(self) -> int:
        """Bytes of the trainable parameters (= their gradients' bytes)."""
        return self._totals()["trainable_bytes"]

    @property
    def largest_trainable_bytes(self) -> int:
        return self._totals()["largest_trainable_bytes"]

    def with_dtype(self, dtype: str) -> Inventory:
        """The same inventory with parameters stored in ``dtype`` (cached)."""
        dtype = normalize_dtype(dtype)
        if dtype == self.dtype:
            return self
        key = ("dtype", dtype)
        if key not in self._cache:
            self._cache[key] = replace(self, rows=tuple(replace(r, dtype=dtype) if r.quant is None else r
                                                        for r in self.rows), dtype=dtype, _cache={})
        return self._cache[key]

    def with_frozen(self, pattern: str | None) -> Inventory:
        """Parameters whose name matches the regex ``pattern`` marked not trainable (cached)."""
        if not pattern:
            return self
        key = ("frozen", pattern)
        if key not in self._cache:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"bad --freeze regex {pattern!r}: {exc}") from None
            self._cache[key] = replace(self, rows=tuple(replace(r, trainable=not rx.search(r.name))
                                                        for r in self.rows), _cache={})
        return self._cache[key]


def _module_kind(module) -> str:
    from torch import nn
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
    import transformers

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
    from transformers import AutoConfig

    data = source.load()
    model_type = data.get("model_type")
    if not model_type:
        raise UserError(f"{source.name} is not a transformers config: it has no 'model_type'; "
                        "give a transformers config.json")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = __import__("difflib").get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
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


TASK_CLASSES: dict[str, str | None] = {
    "causal-lm": None,
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
"""Task heads a model can be built with (``--task``), by the transformers Auto class that builds them.
``causal-lm`` (the default) builds what the config names in ``architectures`` (``bench run`` always did),
else a causal LM, or a seq2seq LM for an encoder-decoder config."""


def check_task(task: str | None) -> str | None:
    """``task`` if it names a head in :data:`TASK_CLASSES` (or is None: the default); raises UserError
    otherwise."""
    if task is None or task in TASK_CLASSES:
        return task
    raise UserError(f"unknown task {task!r}: use one of {', '.join(TASK_CLASSES)}")


def model_class(source: ModelSource, task: str | None = None):
    """The transformers class (or Auto class) ``instantiate`` builds for ``source`` and ``task``."""
    import transformers

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
    from .model_check import check_model_config

    check_model_config(source)  # sizes transformers would refuse or fail on, as data, before building anything
    import torch

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
        model = model.to(getattr(torch, TORCH_DTYPE_NAMES[normalize_dtype(dtype)]))
    return model


def inventory_from_model(model, *, name: str, config_hash: str = "", task: str | None = None) -> Inventory:
    """Build the inventory of an instantiated model (any device; peft-wrapped and bitsandbytes-quantized
    models too: a quantized weight's row has its logical shape and its storage bytes, see :class:`ParamRow`)
    with the head ``task`` names (None: the config's architecture)."""
    from torch import nn

    from .peft_model import logical_shape, quant_kind, quant_state_tensors

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
        ))
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    dtypes = {r.dtype for r in rows if r.quant is None}
    return Inventory(model=name, model_type=getattr(cfg, "model_type", "unknown"), architecture=archs[0],
                     rows=tuple(rows), config_hash=config_hash, dtype=dtypes.pop() if len(dtypes) == 1 else "fp32",
                     linear_modules=linear_modules, task=task)


INVENTORY_CACHE_VERSION = 2
"""Layout of the inventory's on-disk cache payload (:func:`inventory_payload`); bump it when that changes."""


def inventory_payload(inv: Inventory) -> dict:
    """``inv`` as JSON data (everything but its name and config hash, which the cache key holds)."""
    return {"model_type": inv.model_type, "architecture": inv.architecture, "dtype": inv.dtype,
            "linear_modules": list(inv.linear_modules),
            "rows": [[r.name, list(r.shape), r.dtype, r.trainable, r.module_kind, r.module_name, r.module_class,
                      list(r.tied), r.in_embedding, r.quant, r.storage_bytes,
                      list(r.storage_shape) if r.storage_shape is not None else None] for r in inv.rows]}


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
    for name_, shape, dtype, trainable, kind, mname, mclass, tied, in_emb, quant, stored, stored_shape in data["rows"]:
        if dtype not in STORAGE_DTYPES or kind not in MODULE_KINDS or quant not in (None, "nf4", "fp4", "int8") or \
                (stored is not None and (type(stored) is not int or stored < 0)):
            raise ValueError("malformed inventory row")
        rows.append(ParamRow(name=text(name_), shape=sizes(shape), dtype=dtype, trainable=flag(trainable),
                             module_kind=kind, module_name=text(mname), module_class=text(mclass),
                             tied=tuple(text(t) for t in tied), in_embedding=flag(in_emb), quant=quant,
                             storage_bytes=stored,
                             storage_shape=sizes(stored_shape) if stored_shape is not None else None))
    if not rows or data["dtype"] not in DTYPES:
        raise ValueError("malformed inventory")
    return Inventory(model=name, model_type=text(data["model_type"]), architecture=text(data["architecture"]),
                     rows=tuple(rows), config_hash=config_hash, dtype=data["dtype"],
                     linear_modules=tuple(text(m) for m in data["linear_modules"]), task=task)


@functools.lru_cache(maxsize=64)
def _inventory_cached(name: str, path: str, digest: str, task: str | None = None) -> Inventory:
    """Built once per config content and task: from the on-disk cache (no torch, no transformers) when it
    holds this config for these versions, else from a meta model (then stored)."""
    from . import cache

    def build() -> Inventory:
        source = ModelSource(name, __import__("pathlib").Path(path))
        model = instantiate(source, device="meta", task=task)
        return inventory_from_model(model, name=name, config_hash=digest, task=task)

    return cache.memo(cache.key("inventory", INVENTORY_CACHE_VERSION, config=digest, task=task), build,
                      encode=inventory_payload,
                      decode=lambda d: inventory_from_payload(d, name=name, config_hash=digest, task=task))


@functools.lru_cache(maxsize=64)
def _inventory_of_memory(name: str) -> Inventory:
    """The inventory of a registered in-memory config (built on the meta device, like a file's)."""
    source = resolve(name)
    return inventory_from_model(instantiate(source, device="meta"), name=name, config_hash=name.rsplit("#", 1)[-1])


@functools.lru_cache(maxsize=256)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of the config's content (canonical JSON: key order and whitespace do not matter)."""
    from pathlib import Path

    data = ModelSource(path, Path(path)).load()
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_digest(source: ModelSource) -> str:
    """A short hash of a config's content (a file's: cached per path, modification time and size; a registered
    in-memory config's: the digest its name carries)."""
    if source.path is None:
        return source.name.rsplit("#", 1)[-1]
    st = source.path.stat()
    return _digest(str(source.path), st.st_mtime_ns, st.st_size)


def build_inventory(model: str, dtype: str | None = None, task: str | None = None) -> Inventory:
    """The parameter inventory of ``model`` (a catalog name, config path, Hub id or registered model object;
    see :func:`optimem.estimators.catalog.resolve`), stored in ``dtype`` (None: as built -- fp32 for a config, a model
    object's own dtypes, which may differ per parameter: PEFT keeps fp32 adapters beside a 16-bit base), with
    the head ``task`` names (default: the config's architecture).

    Cached per config content (a changed config file is rebuilt): a second call costs a stat and a lookup. A
    registered model object's inventory is the one taken from the object (its own trainable set and dtypes).
    """
    source = resolve(model)
    if source.path is None:
        inv = source.inventory if source.inventory is not None else _inventory_of_memory(source.name)
        return inv.with_dtype(dtype) if dtype else inv
    task = None if check_task(task) == "causal-lm" else task
    inv = _inventory_cached(source.name, str(source.path), config_digest(source), task)
    return inv.with_dtype(dtype) if dtype else inv
