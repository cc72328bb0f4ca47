"""Which shape function computes an aten op on meta tensors during a trace.

torch registers Python meta functions (``torch/_meta_registrations.py``, the ``torch._refs`` decompositions)
over the C++ meta kernels of about 1,300 ops, for symbolic shapes. For concrete shapes the C++ kernels (the
``TORCH_META_FUNC`` of structured kernels: the same shape and stride logic the CPU kernels run) give the same
answer about a hundred times faster -- a Python elementwise meta costs hundreds of microseconds, which would
make a 70B trace take minutes. :func:`cpp_meta_kernels` therefore lifts the Python registrations for the
duration of a trace and puts them back afterwards (torch.compile elsewhere in the process needs them); ops
that have no C++ meta kernel (the SDPA CPU kernels, ...) fall back to their Python meta function.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch._meta_registrations as mr
from torch._decomp import decomposition_table, global_decomposition_table
from torch._ops import OpOverload


def _library():
    return mr._meta_lib_dont_use_me_use_register_meta


@functools.lru_cache(maxsize=1)
def python_metas() -> dict:
    """OpOverload -> the Python meta function torch registered for it on the Meta key (as ``activate_meta``
    picks them: meta table first, then post- and pre-autograd decompositions)."""
    lib = _library()
    keys = lib._op_impls
    out: dict = {}
    for typ in ("meta", "post_autograd", "pre_autograd"):
        for op, fn in global_decomposition_table[typ].items():
            if isinstance(op, OpOverload) and op not in out and f"aten/{op.name().split('::')[-1]}/Meta" in keys:
                out[op] = fn
    return out


_DEPTH = 0
_SPLIT: tuple | None = None


def _split(table: dict) -> tuple[list, list]:
    """(ops with a C++ meta kernel under the Python one, ops whose only meta function is the Python one);
    found once by lifting the Python registrations and asking the dispatcher."""
    global _SPLIT
    if _SPLIT is None:
        lib = _library()
        lib.m.reset()
        try:
            has = [(op, fn) for op, fn in table.items()
                   if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")]
            only = [(op, fn) for op, fn in table.items()
                    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")]
        finally:
            for op, fn in table.items():
                lib.m.impl(op.name(), "Meta", fn, False)
        _SPLIT = (has, only)
    return _SPLIT


@contextlib.contextmanager
def cpp_meta_kernels():
    """Run meta tensors on torch's C++ meta kernels inside the block (see the module docstring); ops whose
    only meta function is a Python one keep it."""
    global _DEPTH
    if _DEPTH:
        yield
        return
    table = python_metas()
    has, only = _split(table)
    lib = _library()
    lib.m.reset()
    for op, fn in only:
        lib.m.impl(op.name(), "Meta", fn, False)
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        for op, fn in has:
            lib.m.impl(op.name(), "Meta", fn, False)


class _Kernel:
    """Runs an op on meta tensors: its registered kernel, else (no C++ meta kernel while the Python ones are
    lifted) its Python meta function, else a decomposition."""

    __slots__ = ("func", "fallback", "use_fallback")

    def __init__(self, func):
        self.func = func
        fb = python_metas().get(func)
        if fb is None:
            fb = decomposition_table.get(func)
        self.fallback = fb
        self.use_fallback = False

    def __call__(self, args: tuple, kwargs: dict):
        if self.use_fallback:
            return self.fallback(*args, **kwargs)
        try:
            return self.func(*args, **kwargs)
        except NotImplementedError:
            if self.fallback is None:
                raise
        self.use_fallback = True
        return self.fallback(*args, **kwargs)


def meta_kernel(func) -> _Kernel:
    return _Kernel(func)


__all__ = ["cpp_meta_kernels", "meta_kernel", "python_metas"]
