"""The simulated phases of one training configuration, kept in the on-disk cache (:mod:`estimators.cache`).

``estimate()``'s phase model (every phase's candidate peaks as polynomials in batch and sequence length,
see :mod:`estimators.memsim`) depends on the model config, the parameter dtypes and trainable set, the
optimizer and its arguments, and the setting (precision, attention, checkpointing, accumulation, device),
never on the batch shape. It is stored as JSON under a key holding all of those, so ``bench estimate`` and
``bench plan`` of a model seen before neither simulate nor import transformers (the architecture is read from
the transformers config only to simulate).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from . import cache

PHASES_CACHE_VERSION = 1
"""Layout of the payload (:func:`encode`); bump it when that changes."""


def inventory_fingerprint(inv) -> str | None:
    """SHA-256 of what the simulation reads from ``inv`` beyond its config: every parameter's name, dtype and
    trainable flag. None for an inventory not built from a config file (nothing to key it on)."""
    if not inv.config_hash:
        return None
    fp = inv._cache.get("fingerprint")
    if fp is None:
        h = hashlib.sha256(inv.config_hash.encode())
        for r in inv.rows:
            h.update(f"\0{r.name}\0{r.dtype}\0{int(r.trainable)}".encode())
        fp = inv._cache["fingerprint"] = h.hexdigest()
    return fp


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else int(x)


def _tuples(x):
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if type(x) is not int:
        raise TypeError(f"expected an integer, got {x!r}")
    return x


def encode(value: tuple) -> dict[str, Any]:
    """``(results, offsets, step note, arch notes)`` of ``estimators.estimate._phase_model`` as JSON data."""
    results, offsets, step_note, arch_notes = value
    return {"results": {name: {"tot": r.tot.tolist(), "cats": r.cats.tolist(), "count": r.count.tolist(),
                               "end": _lists(r.end)} for name, r in results.items()},
            "offsets": {k: int(v) for k, v in offsets.items()}, "step_note": step_note,
            "arch_notes": list(arch_notes)}


def decode(data: dict[str, Any]) -> tuple:
    """The inverse of :func:`encode`; raises on anything malformed (a miss for :func:`estimators.cache.memo`)."""
    import numpy as np

    from .memsim import CATS, NB, PhaseResult
    from .phases import PHASES

    results = {}
    for name, r in data["results"].items():
        res = PhaseResult.__new__(PhaseResult)  # already pruned: bypass __init__'s pruning
        res.tot = np.array(r["tot"], dtype=np.int64).reshape(-1, NB)
        res.cats = np.array(r["cats"], dtype=np.int64).reshape(-1, len(CATS), NB)
        res.count = np.array(r["count"], dtype=np.int64).reshape(-1)
        if not len(res.tot) or not len(res.tot) == len(res.cats) == len(res.count):
            raise ValueError(f"phase {name}: inconsistent candidates")
        res.end = _tuples(r["end"])
        results[str(name)] = res
    offsets = {str(k): v for k, v in data["offsets"].items()}
    if not set(PHASES) | {"forward_end"} <= set(results) or not set(offsets) <= set(PHASES) \
            or any(type(v) is not int for v in offsets.values()):
        raise ValueError("incomplete phase model")
    step_note, arch_notes = data["step_note"], data["arch_notes"]
    if not isinstance(step_note, str) or not all(isinstance(n, str) for n in arch_notes):
        raise TypeError("notes must be strings")
    return results, offsets, step_note, tuple(arch_notes)


def cached(inv, setting: dict[str, Any], build: Callable[[], tuple]) -> tuple:
    """``build()``'s phase model for ``inv`` and ``setting`` (JSON values naming everything else the
    simulation depends on), from the on-disk cache when it holds it."""
    fp = inventory_fingerprint(inv)
    if fp is None:
        return build()
    k = cache.key("phases", PHASES_CACHE_VERSION, inventory=fp, **setting)
    return cache.memo(k, build, encode=encode, decode=decode)


__all__ = ["PHASES_CACHE_VERSION", "cached", "decode", "encode", "inventory_fingerprint"]
