"""Measure the optimizer-state bytes a real optimizer holds, wherever it keeps them.

Walks the object graph reachable from the optimizer (``.state``, ``param_groups``, attributes such as
GaLore projectors, AdaLomo's dicts, the layer-wise ``optimizer_dict``, bitsandbytes' shared qmaps) and
sums the storage bytes of every tensor that is not a parameter or a gradient, counting each storage
once. Tensor subclasses (torchao's quantized states) are opened with ``__tensor_flatten__``; a view
counts the whole storage it keeps alive (GaLore's fp32 projector is a slice of a larger SVD factor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StateMeasure:
    """Measured optimizer state. All figures in bytes."""

    total: int = 0
    host: int = 0
    device: int = 0
    tensors: int = 0
    by_key: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"total": self.total, "host": self.host, "device": self.device, "tensors": self.tensors,
                "by_key": dict(sorted(self.by_key.items()))}


def plain_tensors(t: torch.Tensor):
    """The plain tensors behind ``t`` (opening wrapper subclasses: torchao's quantized states, DTensors)."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            yield from plain_tensors(inner)


def storage_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the unique storages behind ``tensors`` (wrapper subclasses opened; None, non-tensors, meta and
    empty storages skipped); ``seen``: storage keys already counted, updated (to count several sets once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        for pt in plain_tensors(t):
            if pt.device.type == "meta":
                continue
            st = pt.untyped_storage()
            key = _storage_key(pt)
            if key in seen or st.nbytes() == 0:
                continue
            seen.add(key)
            total += st.nbytes()
    return total


def measure_optimizer_state(optimizer, exclude: list[torch.Tensor] | None = None,
                            host_device: str = "cpu", max_depth: int = 12,
                            collect: list[torch.Tensor] | None = None) -> StateMeasure:
    """Unique storage bytes of every tensor reachable from ``optimizer`` that is not excluded.

    ``exclude``: the model's parameters (their ``.grad`` and buffers are excluded with them). Modules are
    not entered (LOMO keeps a reference to the model). Tensors on ``host_device`` count as host bytes
    when training runs elsewhere; on a CPU run everything is device and host is 0.
    ``collect``: if given, every plain tensor counted (one per storage) is appended to it (the harness's
    tensor accountant uses this to label those storages as optimizer state).
    """
    skip_ids: set[int] = set()
    skip_storages: set[tuple] = set()
    for p in exclude or []:
        for t in (p, p.grad):
            if isinstance(t, torch.Tensor):
                skip_ids.add(id(t))
                for pt in plain_tensors(t):
                    skip_storages.add(_storage_key(pt))
    seen_objs: set[int] = set()
    seen_storages: set[tuple] = set()
    out = StateMeasure()
    train_device = _train_device(exclude)

    def add(t: torch.Tensor, key: str) -> None:
        if id(t) in skip_ids:
            return
        for pt in plain_tensors(t):
            if pt.device.type == "meta":
                continue
            sk = _storage_key(pt)
            if sk in skip_storages or sk in seen_storages:
                continue
            seen_storages.add(sk)
            if collect is not None:
                collect.append(pt)
            nbytes = pt.untyped_storage().nbytes()
            out.total += nbytes
            out.tensors += 1
            out.by_key[key] = out.by_key.get(key, 0) + nbytes
            paged = bool(getattr(t, "is_paged", False) or getattr(pt, "is_paged", False))
            if pt.device.type == host_device and train_device != host_device and not paged:
                out.host += nbytes
            else:
                out.device += nbytes

    def walk(obj, key: str, depth: int) -> None:
        if depth > max_depth:
            return
        if isinstance(obj, torch.Tensor):
            add(obj, key)
            return
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, complex, type, nn.Module,
                                           torch.device, torch.dtype)):
            return
        oid = id(obj)
        if oid in seen_objs:
            return
        seen_objs.add(oid)
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, torch.Tensor):
                    walk(v, key, depth + 1)
                else:
                    walk(v, str(k) if isinstance(k, str) else key, depth + 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                walk(v, key, depth + 1)
            return
        attrs = getattr(obj, "__dict__", None)
        if attrs is not None:
            for k, v in attrs.items():
                if k.startswith("__") or k in _SKIP_ATTRS or callable(v) and not isinstance(v, (torch.Tensor, dict, list)):
                    continue
                walk(v, k if key in ("", "state") else key, depth + 1)

    walk(optimizer, "", 0)
    return out


_SKIP_ATTRS = frozenset({"page_mng"})
"""Process-wide objects reachable from an optimizer that are not its state: bitsandbytes' page manager lists
every paged buffer of every optimizer (this optimizer's own are reached through ``.state``)."""


def _storage_key(t: torch.Tensor) -> tuple:
    return (str(t.device), t.untyped_storage().data_ptr())


def _train_device(params) -> str:
    for p in params or []:
        return p.device.type
    return "cpu"
