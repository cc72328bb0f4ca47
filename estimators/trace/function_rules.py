"""Torch-level (``__torch_function__``) rules of the tracer: calls that read a tensor's data outside the dispatcher.

``torch.tensor(data)`` copies Python scalars; given a list of 0-dim tensors (Qwen2-VL's ``get_rope_index`` builds its
``mrope_position_deltas`` so) it reads each element's storage directly, which a trace tensor does not have. Under
:class:`ScalarData` each trace tensor in ``data`` is read through ``.item()`` -- its shadow value, or the tracer's
one-line refusal when it has none (it depends on the weights) -- and the factory then runs as for Python numbers.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .tensor import TraceTensor


def _scalars(data):
    if isinstance(data, TraceTensor):
        return data.item() if data.dim() == 0 else [_scalars(x) for x in data]
    if isinstance(data, (list, tuple)):
        return type(data)(_scalars(x) for x in data)
    return data


def _has_trace(data) -> bool:
    if isinstance(data, TraceTensor):
        return True
    return isinstance(data, (list, tuple)) and any(_has_trace(x) for x in data)


class ScalarData(TorchFunctionMode):
    """See the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and args and not isinstance(args[0], TraceTensor) and _has_trace(args[0]):
            args = (_scalars(args[0]),) + tuple(args[1:])
        return func(*args, **kwargs)


__all__ = ["ScalarData"]
