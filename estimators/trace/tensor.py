"""A CPU-looking tensor with no data: the tracer's stand-in for every tensor of a training step.

:class:`TraceTensor` is a wrapper subclass that reports ``device="cpu"`` (so autocast, the SDPA backend
choice and every ``device.type == "cpu"`` branch in modeling code go the way a real CPU run goes) and holds
a *meta* tensor that carries its shape, strides, dtype and storage. Every aten op is run on the meta tensors
(shape functions only: no memory, no FLOPs) and its outputs are wrapped again. That is what
``FakeTensorMode`` does too, at about a quarter of its per-op cost (no dispatch cache to key, no
``prim.device`` round trips), which matters for a trace of a 70B model.

Storages are booked the way ``harness/trackers/tensor_accounting.py`` books real ones: every op output that
owns a fresh storage is an allocation of ``untyped_storage().nbytes()`` bytes, and a weak reference on the
(meta) storage tells when it dies. Python's reference counting frees fake storages exactly when it would
free the real ones, so the event log is the real run's.

Values: tensors that do not depend on parameters (the batch, position ids, masks) also carry a small real
*shadow* tensor, computed op by op alongside the meta one. Data-dependent code then reads real values:
``attention_mask.all()`` (whether SDPA may skip the mask), ``.item()``, ``nonzero``. A data-dependent op on a
tensor without a shadow (it depends on the weights) cannot be traced: :class:`TraceError` names it.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .meta_kernels import meta_kernel

CPU = torch.device("cpu")
META = torch.device("meta")
DATA_DEPENDENT = frozenset({"aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default",
                            "aten.is_nonzero.default", "aten.equal.default", "aten._unique2.default",
                            "aten.unique_consecutive.default", "aten.unique_dim.default", "aten.bincount.default",
                            "aten.repeat_interleave.Tensor", "aten.argwhere.default"})
"""Ops whose output shape (or value) needs the input's values."""
READS_VALUE = frozenset({"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"})
"""Of those, the ops that hand a value to Python (``.item()``, ``bool(t)``, ``torch.equal``)."""
SHADOW_LIMIT = 1 << 20
"""Largest shadow (elements) computed for a parameter-free tensor; bigger ones carry no values (a batch's
masks and positions are far smaller)."""
NO_VALUES = frozenset({"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
                       "aten.new_empty.default", "aten.new_empty_strided.default"})
"""Factories whose values are undefined: their outputs get no shadow."""


class TraceError(Exception):
    """The model did something the tracer cannot follow (an op with no shape function, a data-dependent
    result of a tensor computed from the weights). ``op``: the aten op."""

    def __init__(self, op: str, reason: str):
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.reason = reason


_new_wrapper = torch.Tensor._make_wrapper_subclass


class TraceTensor(torch.Tensor):
    """See the module docstring. ``_m``: the meta tensor; ``_v``: the shadow (a real tensor) or None."""

    _m: torch.Tensor
    _v: torch.Tensor | None

    @staticmethod
    def __new__(cls, m: torch.Tensor, v: torch.Tensor | None = None, requires_grad: bool = False):
        r = _new_wrapper(cls, m.size(), strides=m.stride(), storage_offset=m.storage_offset(), dtype=m.dtype,
                         device=CPU, requires_grad=requires_grad)
        r._m = m
        r._v = v
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # ``param.data = other`` (bitsandbytes casts a layer's bias so, in its forward): the tensor takes the other
        # one's meta tensor and shadow as well as its shape and dtype
        torch.Tensor.data.__set__(self, new)
        if isinstance(new, TraceTensor):
            self._m, self._v = new._m, new._v

    def __repr__(self) -> str:  # never touches data
        return f"TraceTensor(shape={tuple(self.shape)}, dtype={self.dtype})"

    def tolist(self):
        """The values as Python numbers, from the shadow (``Tensor.tolist`` refuses tensor subclasses; JetMoE's
        router counts tokens per expert so): a tensor without a shadow -- computed from the weights -- is refused
        as the tracer refuses any op whose output depends on such values."""
        if self._v is None:
            raise TraceError("Tensor.tolist", "its output depends on the values of a tensor computed from the weights")
        return self._v.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class TraceMode(TorchDispatchMode):
    """Routes every aten op through the tracer while active, factories (``torch.arange``, ``torch.zeros``...)
    and ops on constants included: their outputs become trace tensors (with values when small), booked like
    any other allocation."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


# ------------------------------------------------------------------------------------------------- the recorder
def unseen_storage(t: torch.Tensor, live) -> tuple | None:
    """``(storage, key, nbytes)`` of ``t``'s storage when ``live`` (keyed by the storage's ``_cdata``) does not
    hold it yet and it has bytes, else None: how a storage is booked once, here and in the harness's tensor
    accountant."""
    st = t.untyped_storage()
    key = st._cdata
    if key in live:
        return None
    nbytes = st.nbytes()
    if nbytes == 0:
        return None
    return st, key, nbytes


class Recorder:
    """The event log of one trace: ``events`` is a list of ``(kind, a, b)`` tuples, kind ``"a"`` (allocation:
    storage id ``a`` of ``b`` bytes, plus ``(element size, shape)`` of the tensor that owns it, the shape None
    when the storage is not exactly that tensor's elements), ``"f"`` (storage ``a`` of ``b`` bytes freed) or ``"m"`` (marker
    ``a`` with argument ``b``). Storage ids count from 0 in allocation order. ``active``: whether allocations
    are booked now."""

    def __init__(self):
        self.events: list[tuple] = []
        self.active = False
        self._live: dict[int, tuple[int, Any]] = {}
        self._next = 0

    def book(self, t: torch.Tensor) -> None:
        new = unseen_storage(t, self._live)
        if new is None:
            return
        st, key, nbytes = new
        sid = self._next
        self._next += 1
        self._live[key] = (sid, weakref.ref(st, lambda _r, k=key: self._free(k)), nbytes)
        itemsize = t.element_size()
        shape = tuple(t.shape)
        n = itemsize
        for d in shape:
            n *= d
        self.events.append(("a", sid, nbytes, (itemsize, shape if n == nbytes else None)))

    def _free(self, key: int) -> None:
        rec = self._live.pop(key, None)
        if rec is not None and self.active:
            self.events.append(("f", rec[0], rec[2]))

    def storage_id(self, t: torch.Tensor) -> int | None:
        """The id of the storage behind ``t`` (a :class:`TraceTensor`), None if never booked."""
        m = t._m if isinstance(t, TraceTensor) else t
        rec = self._live.get(m.untyped_storage()._cdata)
        return rec[0] if rec is not None else None

    def mark(self, code: int, arg: int = 0) -> None:
        if self.active:
            self.events.append(("m", code, arg))


_REC: Recorder | None = None
OpRule = Callable[[Any, tuple, dict], Any]
_RULES: dict = {}
"""aten op -> function computing its meta outputs where the op's own meta kernel is missing or wrong."""


def set_recorder(rec: Recorder | None) -> Recorder | None:
    global _REC
    old, _REC = _REC, rec
    return old


def register_rule(op, fn: OpRule) -> None:
    """Compute ``op`` on meta tensors with ``fn(op, meta_args, meta_kwargs)`` instead of its meta kernel."""
    _RULES[op] = fn
    _INFO.pop(id(op), None)


class _OpInfo:
    """What the dispatcher needs to know about one aten op, computed once: whether its outputs are fresh
    storages (``allocates``: no return aliases an input, as the harness decides), whether it writes an
    argument (``writes``: the argument indices), whether a return may be an argument itself (in-place, out=),
    and how to compute it on meta tensors (``kernel``)."""

    __slots__ = ("allocates", "writes", "returns_input", "kernel", "name", "values")

    def __init__(self, func):
        self.name = str(func)
        self.values = self.name not in NO_VALUES
        try:
            schema = func._schema
            returns = schema.returns
            arguments = schema.arguments
        except AttributeError:
            returns = arguments = ()
        fname = getattr(func, "__name__", "")
        self.allocates = not fname.startswith(("resize_", "set_", "resize_as_")) and \
            not any(r.alias_info is not None for r in returns)
        self.writes = tuple(i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
        self.returns_input = any(r.alias_info is not None and r.alias_info.is_write for r in returns)
        rule = _RULES.get(func)
        if rule is not None:
            self.kernel = lambda a, k, _f=func, _r=rule: _r(_f, a, k)
        else:
            self.kernel = meta_kernel(func)


_INFO: dict = {}
_META_ONLY = object()


def _unwrap(a, shadows: list):
    """The meta version of ``a``; appends its shadow (or _META_ONLY) for every tensor."""
    if isinstance(a, TraceTensor):
        v = a._v
        shadows.append(_META_ONLY if v is None else v)
        return a._m
    if isinstance(a, torch.Tensor):
        shadows.append(a)
        return a if a.device.type == "meta" else a.to(META)
    if isinstance(a, torch.device):
        return META if a.type == "cpu" else a
    if isinstance(a, (list, tuple)) and a:
        first = a[0]
        if isinstance(first, (torch.Tensor, torch.device)) or (first is None and len(a) > 1):
            return type(a)([_unwrap(x, shadows) for x in a])
    return a


def _real(a):
    """The real (shadow) version of an argument."""
    if isinstance(a, TraceTensor):
        return a._v
    if isinstance(a, (list, tuple)) and a and any(isinstance(x, torch.Tensor) for x in a):
        return type(a)([_real(x) for x in a])
    return a


def _numel(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= s
    return n


def _meta_of(r: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=META)


def _dispatch(func, args: tuple, kwargs: dict):
    info = _INFO.get(id(func))  # OpOverloads are singletons; their __hash__ is Python code
    if info is None:
        info = _INFO[id(func)] = _OpInfo(func)
    # unwrap (inlined for the common argument types: this runs once per aten op)
    can_shadow = info.values
    margs = []
    for a in args:
        t = type(a)
        if t is TraceTensor:
            if a._v is None:
                can_shadow = False
            margs.append(a._m)
        elif t is list or t is tuple or isinstance(a, (torch.Tensor, torch.device)):
            shadows: list = []
            margs.append(_unwrap(a, shadows))
            if _META_ONLY in shadows:
                can_shadow = False
        else:
            margs.append(a)
    if kwargs:
        shadows = []
        mkw = {k: _unwrap(v, shadows) for k, v in kwargs.items()}
        if _META_ONLY in shadows:
            can_shadow = False
    else:
        mkw = kwargs
    try:
        out = info.kernel(margs, mkw)
        failed = None
    except TraceError as exc:
        if info.name not in MASK_INDEXED:  # (an indexing op's decomposition refuses its own mask: see below)
            raise
        out, failed = None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a meta kernel's refusal (kept as text: a traceback holds frames)
        out, failed = None, (str(exc).splitlines() or [type(exc).__name__])[0]
    real = None
    shadowed = False
    if can_shadow:
        if failed is not None or not isinstance(out, torch.Tensor) and not _has_tensor(out) or _small(out):
            rargs = tuple([_real(a) for a in args])
            rkw = {k: _real(v) for k, v in kwargs.items()} if kwargs else kwargs
            real = func(*rargs, **rkw)
            shadowed = True
            if failed is not None:
                out = _to_meta(real)
                failed = None
    if failed is not None and info.name in MASK_INDEXED:
        out = _index_by_known_masks(info, args, margs, mkw)
        failed = None if out is not None else failed
    if failed is not None:
        if info.name in DATA_DEPENDENT or any(k in failed for k in ("data-dependent", "data-independent", "item()",
                                                                     "data_ptr", "meta tensors")):
            if info.name in READS_VALUE:
                raise TraceError(info.name, "Python reads the value of a tensor computed from the weights (.item(), "
                                 "or an if / assert on a tensor), which a trace does not have") from None
            raise TraceError(info.name, "its output depends on the values of a tensor computed from the weights "
                             "(a data-dependent shape)") from None
        raise TraceError(info.name, f"no shape function on the meta device ({failed[:160]})") from None
    rec = _REC
    book = info.allocates and rec is not None and rec.active
    if type(out) is torch.Tensor:
        if info.returns_input:
            wrapped = _wrap_one(out, real, args, kwargs, info)
        elif out.device.type == "meta":
            wrapped = TraceTensor(out, real if shadowed and isinstance(real, torch.Tensor) else None)
        else:
            wrapped = out
        if book and type(wrapped) is TraceTensor:
            rec.book(out)
    elif _has_tensor(out):
        wrapped = _wrap_seq(out, real, args, kwargs, info)
        if book:
            for o in wrapped:
                if isinstance(o, TraceTensor):
                    rec.book(o._m)
                elif isinstance(o, (tuple, list)):
                    for oo in o:
                        if isinstance(oo, TraceTensor):
                            rec.book(oo._m)
    else:
        return real if shadowed else out
    if not shadowed and info.writes:
        _drop_written_shadows(info, args, kwargs)
    return wrapped


MASK_INDEXED = frozenset({"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                          "aten._index_put_impl_.default"})
"""Ops indexed by a list of tensors, where a boolean mask stands for its ``nonzero()`` positions (aten's own
expansion of a mask index): the output shape needs only the mask's values, not the indexed tensor's."""


def _index_by_known_masks(info: _OpInfo, args, margs: list, mkw: dict):
    """The meta output of a :data:`MASK_INDEXED` op whose boolean mask indices carry their values (a mask
    computed from the batch: BART's ``input_ids.eq(eos)``), each mask replaced by its ``nonzero()`` positions;
    None when a mask has no values or the op's meta kernel still refuses."""
    if len(args) < 2 or not isinstance(args[1], (list, tuple)):
        return None
    indices = []
    for a in args[1]:
        if isinstance(a, TraceTensor) and a.dtype in (torch.bool, torch.uint8):
            if a._v is None:
                return None
            indices.extend(_meta_of(col) for col in a._v.nonzero().unbind(1))
        else:
            indices.append(a._m if isinstance(a, TraceTensor) else a)
    try:
        return info.kernel([margs[0], indices, *margs[2:]], mkw)
    except Exception:  # noqa: BLE001 - still refused: the caller says why
        return None


def _has_tensor(out) -> bool:
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor) or (isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor)):
                return True
    return False


def _small(out) -> bool:
    if isinstance(out, torch.Tensor):
        return _numel(out) <= SHADOW_LIMIT
    return all(_numel(o) <= SHADOW_LIMIT for o in out if isinstance(o, torch.Tensor))


def _to_meta(real):
    if isinstance(real, torch.Tensor):
        return _meta_of(real)
    if isinstance(real, (tuple, list)):
        return type(real)([_to_meta(r) for r in real])
    return real


def _find_input(m: torch.Tensor, args, kwargs):
    for a in args:
        if isinstance(a, TraceTensor):
            if a._m is m:
                return a
        elif isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, TraceTensor) and x._m is m:
                    return x
    for a in kwargs.values():
        if isinstance(a, TraceTensor) and a._m is m:
            return a
    return None


def _wrap_one(m, r, args, kwargs, info: _OpInfo):
    """The trace tensor for meta output ``m`` (no closures here: a reference cycle would delay frees to the
    garbage collector and the event log would no longer be the real run's)."""
    if not isinstance(m, torch.Tensor):
        return m
    if info.returns_input:  # in-place / out= ops return their argument itself
        same = _find_input(m, args, kwargs)
        if same is not None:
            if same.shape != m.shape or same.stride() != m.stride():
                raise TraceError(info.name, "it changes a tensor's shape in place, which the tracer cannot follow")
            return same
    if m.device.type != "meta":
        return m
    return TraceTensor(m, r if isinstance(r, torch.Tensor) else None)


def _wrap_seq(out, real, args, kwargs, info: _OpInfo):
    rs = real if isinstance(real, (tuple, list)) else [None] * len(out)
    res = []
    for m, r in zip(out, rs):
        if isinstance(m, (tuple, list)):
            rr = r if isinstance(r, (tuple, list)) else [None] * len(m)
            res.append(type(m)([_wrap_one(x, y, args, kwargs, info) for x, y in zip(m, rr)]))
        else:
            res.append(_wrap_one(m, r, args, kwargs, info))
    return type(out)(res)


def _drop_written_shadows(info: _OpInfo, args, kwargs) -> None:
    """An in-place op whose result was not computed on the shadows: what it wrote has no known values now."""
    for i in info.writes:
        a = args[i] if i < len(args) else None
        if isinstance(a, TraceTensor):
            a._v = None
    for a in kwargs.values():
        if isinstance(a, TraceTensor) and info.writes:
            a._v = None


# ------------------------------------------------------------------------------------------------- conversion
def from_real(t: torch.Tensor, requires_grad: bool = False) -> TraceTensor:
    """A trace tensor standing for the real tensor ``t`` (its values kept as the shadow)."""
    return TraceTensor(_meta_of(t), t, requires_grad=requires_grad)


def from_meta(m: torch.Tensor, requires_grad: bool = False) -> TraceTensor:
    """A trace tensor (no values) for a meta tensor."""
    return TraceTensor(m.detach() if m.requires_grad else m, None, requires_grad=requires_grad)


_NAMED: dict[str, type] = {}


def named_trace_tensor(name: str, m: torch.Tensor) -> TraceTensor:
    """A trace tensor (no values) for the meta tensor ``m`` whose class is called ``name``: a bitsandbytes
    parameter (``Params4bit``, ``Int8Params``) stands in as a trace tensor of a subclass of that name, because
    peft and bitsandbytes tell quantized weights apart by their class name (``dequantize_bnb_weight``,
    ``get_bnb_param_type``); it is traced like any other trace tensor."""
    cls = _NAMED.get(name)
    if cls is None:
        cls = _NAMED[name] = type(name, (TraceTensor,), {"__module__": __name__,
                                                         "__doc__": f"A trace tensor standing for a {name}."})
    t = cls(m.detach() if m.requires_grad else m, None)
    t._is_param = True
    return t


__all__ = ["CPU", "META", "Recorder", "TraceError", "TraceMode", "TraceTensor", "from_meta", "from_real",
           "named_trace_tensor",
           "register_rule", "set_recorder", "unseen_storage"]
