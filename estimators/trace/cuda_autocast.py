"""CUDA's autocast policy on the CPU trace, asked of torch's own AutocastCUDA kernels (``device="cuda"`` estimates).

A trace runs on CPU trace tensors, so ``torch.autocast`` applies CPU autocast's op lists; CUDA's differ (on CUDA
``softmax``, ``log_softmax``, ``layer_norm``, ``pow``, ``sum``, ``exp``, ``rsqrt``, ``nll_loss``... run in fp32,
``mm``/``linear``/``bmm`` in the low precision). A CPU build of torch still carries the AutocastCUDA kernels.
While :func:`cuda_autocast` is active, every op that has an AutocastCPU or an AutocastCUDA kernel
(``torch._C._dispatch_get_registrations_for_dispatch_key``) gets a Python AutocastCPU kernel that:

1. asks torch what CUDA autocast does with these arguments: the op runs once on fake CUDA tensors of the same
   shapes and dtypes (``FakeTensorMode``) under ``torch.set_autocast_enabled("cuda", True)``, and the casts the
   AutocastCUDA kernel applies to each input (its ``_to_copy`` calls) and the output dtype are read off (cached
   per op and argument dtypes: one probe per signature);
2. applies those casts to the trace tensors (through autograd, as autocast does, so the backward saves what
   CUDA's saves), with autocast's weight cache (``cached_cast``: an fp32 leaf that requires grad, cast to the
   low precision, is cast once per autocast region; cleared when ``torch.clear_autocast_cache`` runs, as
   ``torch.autocast.__exit__`` calls it);
3. runs the op below autocast; where the kernel also passes ``dtype=`` (``fp32_set_opt_dtype``: softmax's
   output in fp32 without a cast of its input) the same ``dtype`` is passed, and fp16 ``softmax`` /
   ``log_softmax`` run as CUDA's composite runs them (``_softmax(x, dim, half_to_float=True)``: no fp32 copy
   of the input).

Ops with only an AutocastCPU kernel fall through, as on CUDA: a composite op (``cross_entropy_loss``) is
decomposed so that the ops it is made of meet autocast themselves; ops with neither kernel are untouched. CPU estimates never enter this (their traces keep
torch's CPU autocast, and stay exact against CPU runs). fp16's GradScaler (a scaled loss, ``_unscale_grads_``'s
inf checks: a few scalars per device) is left out. No GPU was available to validate the result; the policy
itself is torch's (``tests/estimators/test_cuda_autocast.py`` holds every traced op's output dtype against the fake-CUDA
kernels).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
_KEY = torch._C.DispatchKey.AutocastCPU
_POLICY: dict = {}
"""(op, low dtype, argument signature) -> :class:`Decision`."""
_CACHE: dict[int, tuple] = {}
"""id(fp32 leaf) -> (the leaf, its low-precision cast): autocast's weight cache for the region."""
SEEN: dict = {}
"""(op name, low dtype, input dtypes) -> (the trace's output dtype, CUDA's output dtype): every decision applied
while tracing (for the test that holds the policy against torch's kernels)."""


class Decision:
    """What CUDA autocast does to one call: ``casts`` (flat argument index -> dtype), ``dtype_kw`` (a ``dtype=``
    the kernel adds, or None), ``out`` (the output dtype CUDA gives)."""

    __slots__ = ("casts", "dtype_kw", "out")

    def __init__(self, casts: dict, dtype_kw, out):
        self.casts, self.dtype_kw, self.out = casts, dtype_kw, out


def autocast_ops() -> list[str]:
    """Every aten op with an AutocastCUDA or an AutocastCPU kernel (``aten::name[.overload]``), as the dispatcher
    lists them."""
    reg = torch._C._dispatch_get_registrations_for_dispatch_key
    return sorted(n for n in set(reg("AutocastCUDA")) | set(reg("AutocastCPU")) if n.startswith("aten::"))


def _overload(name: str):
    base, _, ov = name.split("::", 1)[1].partition(".")
    return getattr(getattr(torch.ops.aten, base), ov or "default")


def _sig(x):
    if isinstance(x, torch.Tensor):
        return ("T", x.dtype)
    if isinstance(x, torch.dtype):
        return ("D", x)
    return None


class _CastLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records which of the probe's inputs the AutocastCUDA kernel casts, and to what."""

    def __init__(self, inputs: dict[int, int]):
        super().__init__()
        self.inputs = inputs
        self.casts: dict[int, torch.dtype] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args and id(args[0]) in self.inputs and "dtype" in kwargs:
            self.casts.setdefault(self.inputs[id(args[0])], kwargs["dtype"])
        return func(*args, **kwargs)


def _first_dtype(out):
    flat, _ = tree_flatten(out)
    return next((o.dtype for o in flat if isinstance(o, torch.Tensor)), None)


def decide(op, args: tuple, kwargs: dict, low: torch.dtype) -> Decision:
    """CUDA autocast's decision for ``op(*args, **kwargs)`` at low precision ``low`` (see the module docstring)."""
    flat, spec = tree_flatten((args, kwargs))
    key = (op, low, tuple(_sig(x) for x in flat))
    d = _POLICY.get(key)
    if d is None:
        d = _POLICY[key] = _probe(op, flat, spec, low)
    return d


def _probe(op, flat: list, spec, low: torch.dtype) -> Decision:
    with _disable_current_modes():  # the trace's own mode must not see the probe's fake tensors
        mode = FakeTensorMode()
        with mode:
            fakes = [torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="cuda")
                     if isinstance(x, torch.Tensor) else x for x in flat]
        inputs = {id(f): i for i, f in enumerate(fakes) if isinstance(f, torch.Tensor)}
        log = _CastLog(inputs)
        was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", low)
        try:
            with mode, log:
                a, k = tree_unflatten(fakes, spec)
                out = _first_dtype(op(*a, **k))
        except Exception:  # noqa: BLE001 - CUDA's kernel refuses (a banned op): CPU's behaviour stays
            return Decision({}, None, None)
        finally:
            torch.set_autocast_enabled("cuda", was[0])
            torch.set_autocast_dtype("cuda", was[1])
        casts = dict(log.casts)
        try:
            with mode:
                cast = [f.to(casts[i]) if i in casts else f for i, f in enumerate(fakes)]
                a, k = tree_unflatten(cast, spec)
                plain = _first_dtype(op(*a, **k))
        except Exception:  # noqa: BLE001
            plain = out
    names = {a.name for a in op._schema.arguments}
    dtype_kw = out if out is not None and plain != out and "dtype" in names else None
    return Decision(casts, dtype_kw, out)


def _cast(t: torch.Tensor, dtype: torch.dtype, low: torch.dtype) -> torch.Tensor:
    """``cached_cast``: fp32 leaves that require grad are cast to ``low`` once per autocast region."""
    if t.dtype == dtype:
        return t
    if dtype == low and t.dtype == torch.float32 and t.requires_grad and t.is_leaf and not t._is_view():
        hit = _CACHE.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = t.to(dtype)
        _CACHE[id(t)] = (t, out)
        return out
    return t.to(dtype)


_HALF_TO_FLOAT = {"aten::softmax.int": torch.ops.aten._softmax.default,
                  "aten::log_softmax.int": torch.ops.aten._log_softmax.default}


def _kernel(name: str, on_cuda: bool):
    op = _overload(name)
    half_to_float = _HALF_TO_FLOAT.get(name)
    if not on_cuda:  # CPU's list only: CUDA falls through, so the ops it is made of meet autocast themselves
        composite = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")

        def fallthrough(*args, **kwargs):
            if composite:
                return op.decompose(*args, **kwargs)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_KEY)):
                return op(*args, **kwargs)

        return fallthrough

    def kernel(*args, **kwargs):
        low = torch.get_autocast_dtype("cpu")
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_KEY)):
            d = decide(op, args, kwargs, low)
            flat, spec = tree_flatten((args, kwargs))
            ins = tuple(x.dtype for x in flat if isinstance(x, torch.Tensor))
            if d.casts:
                flat = [_cast(x, d.casts[i], low) if i in d.casts else x for i, x in enumerate(flat)]
            a, k = tree_unflatten(flat, spec)
            if d.dtype_kw is not None:
                x = a[0]
                if half_to_float is not None and x.dtype == torch.float16 and d.dtype_kw == torch.float32:
                    out = half_to_float(x, a[1], True)  # CUDA's softmax composite: no fp32 copy of the input
                    SEEN[(name, low, ins)] = (out.dtype, d.out)
                    return out
                k = {**k, "dtype": d.dtype_kw}
            out = op(*a, **k)
            SEEN[(name, low, ins)] = (_first_dtype(out), d.out)
            return out

    return kernel


@contextlib.contextmanager
def cuda_autocast(enabled: bool = True):
    """Trace with CUDA's autocast policy (see the module docstring) while the block runs."""
    if not enabled:
        yield
        return
    lib = torch.library.Library("aten", "IMPL")
    old_clear = torch.clear_autocast_cache

    def clear() -> None:
        _CACHE.clear()
        old_clear()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": what this is for
            on_cuda = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))
            for name in autocast_ops():
                lib.impl(name.split("::", 1)[1], _kernel(name, name in on_cuda), "AutocastCPU")
        torch.clear_autocast_cache = clear
        yield
    finally:
        torch.clear_autocast_cache = old_clear
        _CACHE.clear()
        lib._destroy()


__all__ = ["Decision", "SEEN", "autocast_ops", "cuda_autocast", "decide"]
