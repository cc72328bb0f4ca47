"""A fitted trace as plain data (importing it needs no torch): :class:`Region` and :class:`StepTrace`, and
their on-disk cache (:func:`load`, :func:`store`, keyed by :func:`disk_key`).

:mod:`optimem.estimators.trace.run` makes them; :class:`optimem.estimators.peak.PhaseModel` reads them. A trace depends on the
config's content, the PEFT wrapping a model object carries, the :class:`~optimem.estimators.trace.setting.TraceSetting`
and the torch / transformers / optimem versions (:func:`optimem.estimators.cache.versions`, part of every key), so a
``bench estimate`` of a configuration traced before -- in any process -- neither traces nor imports torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..cache import get_arrays, key as cache_key, library_versions, put_arrays
from ..memsim import NB
from .events import EventLog
from .setting import TraceSetting

S_MIN = 2
"""Shortest sequence a trace covers."""
TRACE_CACHE_VERSION = 4
"""Layout of a cached trace (:func:`to_arrays`); bump it when that changes."""


@dataclass
class Region:
    """``b_lo..b_hi`` x ``s_lo..s_hi`` (None: unbounded) and its fitted logs: ``first`` (a micro-step with no
    gradients yet) and ``accum`` (one with gradients already accumulated; only when asked for)."""

    b_lo: int
    b_hi: int | None
    s_lo: int
    s_hi: int | None
    first: EventLog
    accum: EventLog | None = None
    seconds: float = 0.0
    """How long tracing a narrowed region took (0: a region fitted from small traces; see ``StepTrace.depends``)."""

    def contains(self, b: int, s: int) -> bool:
        return self.b_lo <= b and (self.b_hi is None or b <= self.b_hi) and self.s_lo <= s and \
            (self.s_hi is None or s <= self.s_hi)


@dataclass
class StepTrace:
    """The fitted trace of one model x setting (see the module docstring). ``params``: parameter names in
    ``named_parameters()`` order (a log's parameter indices point here); ``buffers_bytes``: the model's
    buffers as stored (bytes); ``attn_implementation``: what the model really runs; ``windows``: the sequence
    lengths the regions split at; ``label_shape``: ``"BS"`` (a label per token) or ``"B"`` (one per sample);
    ``shifts_labels``: the Trainer counts label tokens from position 1; ``settled_bytes``: how much the
    parameters' storage grows (bytes; negative: shrinks) when layers change themselves on their first call
    (bitsandbytes' 4-bit layers cast a bias to their compute dtype), which the model as built does not show."""

    key: str
    model: str
    params: tuple[str, ...]
    buffers_bytes: int
    attn_implementation: str
    windows: tuple[int, ...]
    label_shape: str
    shifts_labels: bool
    counts_items: bool
    settled_bytes: int = 0
    regions: list[Region] = field(default_factory=list)
    load_peak: int = 0
    load_end: int = 0
    """The model-load phase on the CPU (:mod:`optimem.estimators.trace.load`): its peak and what it ends with
    (bytes; 0: not estimated)."""
    layerdrop: str = ""
    """The LayerDrop probabilities of the model (traced with every layer: :mod:`optimem.estimators.trace.model`)."""
    depends: str = ""
    """``""``: each region's step is one program for all its shapes (sizes polynomial in B and S); ``"seq"``: the
    step changes with the sequence length (other operations, or sizes no polynomial fits: a loop over tokens or
    chunks) -- each region is one length, traced at it; ``"batch"``: with the batch size too -- each region is one
    ``(B, S)`` point."""
    batch_layout: tuple = ()
    """image-text-to-text: the batch's keys as ``(key, bytes per sample, bytes per text token)``
    (:func:`optimem.estimators.trace.images.layout`); empty: the text tasks' batch."""

    def region(self, b: int, s: int, accum: bool = False) -> Region | None:
        """The traced region holding ``(b, s)`` (sequences shorter than :data:`S_MIN` share the first one)."""
        s = max(s, S_MIN)
        for r in self.regions:
            if r.contains(b, s) and (not accum or r.accum is not None):
                return r
        return None


def disk_key(config_hash: str, peft, setting: TraceSetting):
    """The on-disk cache key of a trace (None when there is no config content hash to key it on: a model
    object built in memory); a LoRA / QLoRA setting's also names the peft and bitsandbytes versions."""
    if not config_hash:
        return None
    parts = {}
    if setting.peft:  # the model is peft's and bitsandbytes' too
        parts["libraries"] = library_versions()
    return cache_key("trace", TRACE_CACHE_VERSION, config=config_hash, peft=peft, setting=asdict(setting), **parts)


_LOG_FIELDS = ("kind", "a", "b", "sizes")
_META_FIELDS = ("model", "params", "buffers_bytes", "attn_implementation", "windows", "label_shape", "shifts_labels",
                "counts_items", "settled_bytes", "depends", "load_peak", "load_end", "layerdrop", "batch_layout")


def to_arrays(st: StepTrace) -> dict:
    """``st`` as numpy arrays (the event logs as they are, the rest as one JSON string): an ``.npz`` loads in
    milliseconds where the same logs as JSON lists take a second for a 70B model."""
    meta = {k: getattr(st, k) for k in _META_FIELDS}
    meta["regions"] = []
    arrays: dict = {}
    for i, r in enumerate(st.regions):
        logs = {}
        for which in ("first", "accum"):
            log = getattr(r, which)
            if log is None:
                continue
            logs[which] = list(log.survivors)
            for f in _LOG_FIELDS:
                arrays[f"{i}.{which}.{f}"] = getattr(log, f)
        meta["regions"].append({"b": [r.b_lo, r.b_hi], "s": [r.s_lo, r.s_hi], "logs": logs, "seconds": r.seconds})
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def from_arrays(arrays: dict, key: str) -> StepTrace:
    """The inverse of :func:`to_arrays` (raises on anything malformed)."""
    meta = json.loads(str(arrays["meta"]))
    regions = []
    for i, r in enumerate(meta["regions"]):
        logs = {}
        for which, survivors in r["logs"].items():
            kind, a, b, sizes = (arrays[f"{i}.{which}.{f}"] for f in _LOG_FIELDS)
            if not (len(kind) == len(a) == len(b)) or sizes.ndim != 2 or sizes.shape[1] != NB:
                raise ValueError("malformed event log")
            logs[which] = EventLog(kind.astype(np.int8, copy=False), a.astype(np.int64, copy=False),
                                   b.astype(np.int64, copy=False), sizes.astype(np.int64, copy=False),
                                   tuple(int(x) for x in survivors))
        regions.append(Region(r["b"][0], r["b"][1], r["s"][0], r["s"][1], logs["first"], logs.get("accum"),
                              float(r.get("seconds", 0.0))))
    kw = {k: meta[k] for k in _META_FIELDS}
    kw["params"], kw["windows"] = tuple(kw["params"]), tuple(kw["windows"])
    kw["batch_layout"] = tuple(tuple(x) for x in kw["batch_layout"])
    return StepTrace(key=key, **kw, regions=regions)


def load(k) -> StepTrace | None:
    """The trace stored under ``k`` (None: none, the cache off, or unreadable -- a miss)."""
    if k is None:
        return None
    arrays = get_arrays(k)
    if arrays is None:
        return None
    try:
        return from_arrays(arrays, k.digest[:20])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def store(k, st: StepTrace) -> None:
    """Store ``st`` under ``k`` (silently nothing when the cache is off or cannot be written)."""
    if k is not None:
        put_arrays(k, to_arrays(st))


__all__ = ["Region", "S_MIN", "StepTrace", "TRACE_CACHE_VERSION", "disk_key", "from_arrays", "load", "store",
           "to_arrays"]
