"""The estimator's vocabulary: storage dtypes (bytes per element), model heads (tasks), and the parameter
inventory value (:class:`ParamRow`, :class:`Inventory`; sizes in elements, ``nbytes`` in bytes). No torch import;
building an inventory from a model is :mod:`optimem.estimators.inventory`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

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


def torch_dtype(dtype: str):
    """The ``torch.dtype`` of a dtype name ('bf16' -> ``torch.bfloat16``)."""
    import torch  # lazy: this module stays torch-free

    return getattr(torch, TORCH_DTYPE_NAMES[normalize_dtype(dtype)])


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
    layer_norm: bool = False
    """Its module is an ``nn.LayerNorm`` (or a subclass: GOT-OCR2's ``GotOcr2LayerNorm``), which the Trainer's
    ``get_decay_parameter_names`` exempts from weight decay whatever the name."""

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


TASK_CLASSES: dict[str, str | None] = {
    "causal-lm": None,
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "image-text-to-text": "AutoModelForImageTextToText",
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
