"""Per-op rules where a meta kernel's output is not what the CPU kernel returns.

A meta function describes one device's kernel (often CUDA's); the CPU kernel sometimes allocates its outputs
differently. Each rule here computes the CPU kernel's outputs for one aten op on meta tensors, read from the
ATen CPU source named in its docstring, and is checked against a real CPU run by ``tests/test_trace_exact.py``.
"""
from __future__ import annotations

import torch

from .cuda_rules import device
from .meta_kernels import python_metas
from .tensor import META, register_rule

aten = torch.ops.aten
REDUCED = (torch.bfloat16, torch.float16)


def _layer_norm(func, args, kwargs):
    """``layer_norm_cpu`` (aten/src/ATen/native/layer_norm.cpp): ``mean`` and ``rstd`` are ``(M,)`` tensors of
    ``param_scalar_type``: fp32 when the input is 16-bit and a weight or bias is not (mixed type), else the
    input's dtype (the meta function always uses fp32 for 16-bit inputs, CUDA's choice); their shape is the
    input's with the normalized dimensions set to 1."""
    x, normalized_shape, weight, bias = (list(args) + [None, None])[:4]
    weight = kwargs.get("weight", weight)
    bias = kwargs.get("bias", bias)
    out, mean, rstd = python_metas()[func](*args, **kwargs)
    if device() == "cuda":
        return out, mean, rstd
    mixed = x.dtype in REDUCED and any(t is not None and t.dtype == torch.float32 for t in (weight, bias))
    dtype = torch.float32 if mixed else x.dtype
    if mean.dtype != dtype:
        mean = torch.empty(mean.shape, dtype=dtype, device=META)
        rstd = torch.empty(rstd.shape, dtype=dtype, device=META)
    return out, mean, rstd


def _grouped_mm(func, args, kwargs):
    """``_grouped_mm`` on CPU (aten/src/ATen/native/GroupedMMUtils.h, ``_grouped_mm_fallback``; the meta function
    is CUDA's and takes only bf16): a contiguous output of ``out_dtype`` (default the inputs'), shaped by the
    operands' ranks -- 2d x 2d (``offs`` splits K): ``(G, M, N)``; 2d x 3d (``offs`` splits M): ``(M, N)``;
    3d x 2d (``offs`` splits N): ``(M, N)``; 3d x 3d: ``(G, M, N)``. Checked against the CPU kernel in
    ``tests/test_trace_exact.py``."""
    names = ("mat_a", "mat_b", "offs", "bias", "out_dtype")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    a, b = bound["mat_a"], bound["mat_b"]
    offs = bound.get("offs")
    dtype = bound.get("out_dtype") or a.dtype
    if a.dim() == 2 and b.dim() == 2:
        shape = (offs.shape[0], a.shape[0], b.shape[1])
    elif a.dim() == 2 and b.dim() == 3:
        shape = (a.shape[0], b.shape[2])
    elif a.dim() == 3 and b.dim() == 2:
        shape = (a.shape[1], b.shape[1])
    else:
        shape = (a.shape[0], a.shape[1], b.shape[2])
    return torch.empty(shape, dtype=dtype, device=META)


def _scalar_as_tensor(tensor_op):
    """``op.Scalar(x, s)`` as ``op.Tensor(x, tensor(s))``: the same output (a 0-dim tensor ranks below a
    dimensioned one in type promotion, as a Python scalar does) from the Tensor overload's C++ meta kernel,
    where the Scalar overload only has a slow Python one."""

    def rule(func, args, kwargs):
        x, other = args[0], args[1]
        return tensor_op(x, torch.tensor(other), *args[2:], **kwargs)

    return rule


def _unsafe_view(func, args, kwargs):
    """``_unsafe_view``: a view of its input's storage (what the CPU kernel returns), via ``view``'s C++ meta."""
    try:
        return aten.view.default(*args, **kwargs)
    except RuntimeError:
        return python_metas()[func](*args, **kwargs)


def _slice_backward(func, args, kwargs):
    """``slice_backward(grad, input_sizes, ...)``: ``grad.new_zeros(input_sizes)`` (contiguous), then the
    slice of it is written."""
    grad, sizes = args[0], args[1]
    return torch.empty(sizes, dtype=grad.dtype, device=META)


def install() -> None:
    register_rule(aten.native_layer_norm.default, _layer_norm)
    register_rule(aten._grouped_mm.default, _grouped_mm)
    # speed only (same outputs as the Python meta functions, from C++ kernels)
    for name in ("mul", "div", "add", "sub"):
        register_rule(getattr(aten, name).Scalar, _scalar_as_tensor(getattr(aten, name).Tensor))
        register_rule(getattr(aten, name + "_").Scalar, _scalar_as_tensor(getattr(aten, name + "_").Tensor))
    register_rule(aten._unsafe_view.default, _unsafe_view)
    register_rule(aten.slice_backward.default, _slice_backward)


__all__ = ["install"]
