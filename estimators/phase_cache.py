"""The simulated phases of one region of a traced configuration, kept in the on-disk cache (:mod:`optimem.estimators.cache`).

For a region of batch shapes (:class:`optimem.estimators.trace.data.Region`), the phase model's simulation (every
phase's candidate peaks as polynomials in batch and sequence length, see :mod:`optimem.estimators.memsim`) depends on
the trace, the parameter dtypes and trainable set, the optimizer and its arguments, accumulation and the
device, never on the shape inside the region. It is stored as JSON under a key holding all of those, so a
``bench estimate`` or ``bench plan`` of a configuration seen before neither traces nor simulates.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .cache import key as cache_key, memo
from .memsim import CATS, NB, PhaseResult
from .phases import PHASES

PHASES_CACHE_VERSION = 2
"""Layout of the payload (:func:`encode`); bump it when that changes."""


def inventory_fingerprint(inv) -> str | None:
    """SHA-256 of what the simulation reads from ``inv`` beyond its config: every parameter's name, dtype,
    stored bytes and trainable flag. None for an inventory not built from a config file (nothing to key it on)."""
    if not inv.config_hash:
        return None
    fp = inv._cache.get("fingerprint")
    if fp is None:
        h = hashlib.sha256(inv.config_hash.encode())
        for r in inv.rows:
            h.update(f"\0{r.name}\0{r.dtype}\0{r.nbytes}\0{int(r.trainable)}".encode())
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
    """``(results, offsets)`` of :meth:`optimem.estimators.peak.PhaseModel.at` as JSON data."""
    results, offsets = value
    return {"results": {name: {"tot": r.tot.tolist(), "cats": r.cats.tolist(), "count": r.count.tolist(),
                               "end": _lists(r.end)} for name, r in results.items()},
            "offsets": {k: int(v) for k, v in offsets.items()}}


def decode(data: dict[str, Any]) -> tuple:
    """The inverse of :func:`encode`; raises on anything malformed (a miss for :func:`optimem.estimators.cache.memo`)."""

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
    return results, offsets


def cached(parts: dict[str, Any] | None, build: Callable[[], tuple]) -> tuple:
    """``build()``'s ``(results, offsets)``, from the on-disk cache when it holds them under ``parts`` (JSON
    values naming everything the simulation depends on; None: not cacheable, always built)."""
    if parts is None:
        return build()
    return memo(cache_key("phases", PHASES_CACHE_VERSION, **parts), build, encode=encode, decode=decode)


__all__ = ["PHASES_CACHE_VERSION", "cached", "decode", "encode", "inventory_fingerprint"]
