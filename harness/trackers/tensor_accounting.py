"""Exact live-tensor accounting by storage, in the spirit of PyTorch's ``MemTracker``.

A :class:`TensorAccountant` is a ``TorchDispatchMode``: every op output that owns a fresh storage is
recorded once (its ``untyped_storage().nbytes()``), and a weak reference on the storage object tells
when the storage dies. Live bytes are therefore exact at every op boundary, and the peak of a phase is
the highest live total reached inside it. Allocations made inside one kernel and freed before it
returns (workspaces) are not visible; the process RSS tracker covers those.

Every live storage has a category:

``parameters``, ``buffers``  the model's parameters and buffers;
``gradients``               ``param.grad`` storages (marked the moment autograd accumulates them);
``optimizer_state``         every storage reachable from the optimizer that is not a parameter or a
                            gradient (found with :func:`optimem.harness.state_walker.measure_optimizer_state`);
``activations``             created during a forward phase and still alive when it ends (saved for
                            backward, logits, loss);
``temporaries``             created in a phase and freed before that phase ends;
``other``                   anything else still alive at the end of its phase (data batches, the
                            Trainer's running-loss tensor, lazily built caches).

Categories of storages born inside a phase are settled at the phase's end, so the breakdown reported
at a phase's peak is exact: it is rebuilt from the allocation/free sequence numbers, not sampled.

The cost is one Python call per aten op (a Python dispatch mode's fixed tax) plus a dictionary look-up
per op that allocates; it does not grow with tensor sizes. It can be paused around code that cannot run
under a dispatch mode (``torch.compile(fullgraph=True)`` optimizer steps, e.g. torchao's low-bit AdamW;
storages created while paused are adopted at the phase's end) and stopped for good once the steps it
must see are done. All figures are bytes.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from optimem.estimators.trace.tensor import unseen_storage

CATEGORIES: tuple[str, ...] = ("parameters", "buffers", "gradients", "optimizer_state", "activations",
                               "temporaries", "other")
"""Every category a live storage can have, in report order."""

_SETTLED = frozenset({"parameters", "buffers", "gradients", "optimizer_state"})

Classifier = Callable[[], dict[str, Iterable[torch.Tensor]]]
"""Returns ``{category: tensors}`` for the settled categories (parameters, buffers, gradients,
optimizer_state); called at the end of every phase."""


class _Rec:
    """One tracked storage: ``nbytes`` (bytes), category, birth and death sequence numbers."""

    __slots__ = ("nbytes", "cat", "settled", "born", "died", "wr", "__weakref__")

    def __init__(self, nbytes: int, cat: str, born: int):
        self.nbytes = nbytes
        self.cat = cat
        self.settled = False
        self.born = born
        self.died: int | None = None
        self.wr = None


@dataclass
class _Phase:
    name: str
    alive_default: str
    start_seq: int
    base: dict[str, int]
    start_bytes: int
    peak: int
    peak_seq: int
    events: list[_Rec] = field(default_factory=list)


@dataclass
class PhaseTensors:
    """What one phase saw. ``peak_bytes``: highest live tensor bytes inside the phase;
    ``end_bytes``: live bytes when it ended; ``breakdown_at_peak`` / ``breakdown_at_end``: those bytes
    per category."""

    peak_bytes: int
    end_bytes: int
    start_bytes: int
    breakdown_at_peak: dict[str, int]
    breakdown_at_end: dict[str, int]

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "end_bytes": self.end_bytes, "start_bytes": self.start_bytes,
                "breakdown_at_peak": dict(self.breakdown_at_peak), "breakdown_at_end": dict(self.breakdown_at_end)}


class TensorAccountant(TorchDispatchMode):
    """Live tensor bytes on one device type, exact per op, split by category (see the module doc).

    Use as a context manager around the whole job; call :meth:`start_phase` / :meth:`end_phase` at
    phase boundaries and :meth:`mark_gradient` from a post-accumulate-grad hook.
    """

    def __init__(self, device_type: str = "cpu", classifier: Classifier | None = None):
        super().__init__()
        self.device_type = device_type
        self._device_flag = {"cpu": "is_cpu", "cuda": "is_cuda"}.get(device_type, "is_cpu")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"TensorAccountant tracks cpu or cuda storages, not {device_type!r}")
        self.classifier = classifier
        self.live_bytes = 0
        self.totals: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.category_peaks: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.peak_bytes = 0
        self.seq = 0
        self.ops_seen = 0
        self._live: dict[int, _Rec] = {}
        self._phase: _Phase | None = None
        self._paused = False
        self._active = False
        self._stopped = False
        self._allocates: dict = {}

    # ----------------------------------------------------------------------------- dispatch
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._disable_dynamo unless this says no; that wrapper
        # costs a few microseconds per op, and nothing is compiled under this mode (it is paused first).
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        allocates = self._allocates.get(func)
        if allocates is None:
            allocates = self._allocates[func] = _op_allocates(func)
        if allocates is True:
            self.ops_seen += 1
            if isinstance(out, torch.Tensor):
                self._see(out)
            elif isinstance(out, (tuple, list)):
                for o in out:
                    if isinstance(o, torch.Tensor):
                        self._see(o)
                    elif isinstance(o, (tuple, list)):
                        for oo in o:
                            if isinstance(oo, torch.Tensor):
                                self._see(oo)
        elif allocates == "resize" and args and isinstance(args[0], torch.Tensor):
            self._resized(args[0])
        return out

    def _see(self, t: torch.Tensor) -> None:
        if type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name, None)
                if isinstance(inner, torch.Tensor):
                    self._see(inner)
            return
        if not getattr(t, self._device_flag):
            return
        new = unseen_storage(t, self._live)
        if new is None:
            return
        st, key, nbytes = new
        ph = self._phase
        self._add(st, key, nbytes, "temporaries" if ph is None else ph.alive_default)

    def _add(self, st, key: int, nbytes: int, cat: str) -> _Rec:
        self.seq += 1
        rec = _Rec(nbytes, cat, self.seq)
        rec.wr = weakref.ref(st, lambda _r, k=key: self._free(k))
        self._live[key] = rec
        self.live_bytes += nbytes
        self.totals[cat] += nbytes
        if self.totals[cat] > self.category_peaks[cat]:
            self.category_peaks[cat] = self.totals[cat]
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        ph = self._phase
        if ph is not None:
            ph.events.append(rec)
            if self.live_bytes > ph.peak:
                ph.peak = self.live_bytes
                ph.peak_seq = self.seq
        return rec

    def _free(self, key: int) -> None:
        rec = self._live.pop(key, None)
        if rec is None:
            return
        self.seq += 1
        rec.died = self.seq
        self.live_bytes -= rec.nbytes
        self.totals[rec.cat] -= rec.nbytes
        ph = self._phase
        if ph is not None and rec.born < ph.start_seq:
            ph.events.append(rec)

    def _resized(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        rec = self._live.get(st._cdata)
        if rec is None:
            self._see(t)
            return
        delta = st.nbytes() - rec.nbytes
        if delta:
            # A resize is a free of the old size and an allocation of the new one.
            self._free(st._cdata)
            self._add(st, st._cdata, st.nbytes(), rec.cat)

    def storage_resized(self, t: torch.Tensor) -> None:
        """Account a storage that code grew or shrank in place below the dispatcher
        (``untyped_storage().resize_``: FSDP2's unsharded parameters), as a free of the old size and an
        allocation of the new one."""
        if self._active and not self._stopped:
            self._resized(t)

    # ----------------------------------------------------------------------------- categories
    def _set_cat(self, rec: _Rec, cat: str) -> None:
        rec.settled = True
        if rec.cat == cat:
            return
        old = rec.cat
        rec.cat = cat
        if rec.died is None:
            self.totals[old] -= rec.nbytes
            self.totals[cat] += rec.nbytes
            if self.totals[cat] > self.category_peaks[cat]:
                self.category_peaks[cat] = self.totals[cat]
            ph = self._phase
            if ph is not None and rec.born < ph.start_seq:
                ph.base[old] -= rec.nbytes
                ph.base[cat] += rec.nbytes

    def mark(self, tensors: Iterable[torch.Tensor | None], cat: str) -> None:
        """Settle the storages behind ``tensors`` as ``cat``; storages never seen are adopted."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            for pt in _plain(t):
                if pt.device.type != self.device_type:
                    continue
                st = pt.untyped_storage()
                rec = self._live.get(st._cdata)
                if rec is None:
                    if st.nbytes() == 0:
                        continue
                    rec = self._add(st, st._cdata, st.nbytes(), cat)
                self._set_cat(rec, cat)

    def mark_gradient(self, param: torch.Tensor) -> None:
        """For ``register_post_accumulate_grad_hook``: settle ``param.grad`` as a gradient at once."""
        self.mark([param.grad], "gradients")

    def classify(self) -> None:
        """Settle every storage the classifier names (parameters, buffers, gradients, optimizer state)."""
        if self.classifier is None:
            return
        for cat, tensors in self.classifier().items():
            self.mark(tensors, cat)

    # ----------------------------------------------------------------------------- phases
    def start_phase(self, name: str, alive_default: str | None = None) -> None:
        """Begin a phase; storages born in it and alive at its end default to ``alive_default``
        (``activations`` for a phase whose name ends in ``forward``, else ``other``)."""
        if alive_default is None:
            alive_default = "activations" if name.endswith("forward") else "other"
        self._phase = _Phase(name, alive_default, self.seq + 1, dict(self.totals), self.live_bytes,
                             self.live_bytes, self.seq)

    def end_phase(self) -> PhaseTensors:
        """End the current phase: settle categories and return its peak and end figures (bytes)."""
        self.classify()
        ph = self._phase
        if ph is None:
            raise RuntimeError("end_phase() without start_phase()")
        for rec in ph.events:
            if rec.born >= ph.start_seq and not rec.settled and rec.died is None:
                self._set_cat(rec, ph.alive_default)
        peak_seq = ph.peak_seq
        at_peak = dict(ph.base)
        for rec in ph.events:
            if rec.born >= ph.start_seq:
                if rec.born <= peak_seq and (rec.died is None or rec.died > peak_seq):
                    cat = rec.cat if (rec.settled or rec.died is None) else "temporaries"
                    at_peak[cat] += rec.nbytes
            elif rec.died is not None and rec.died <= peak_seq:
                at_peak[rec.cat] -= rec.nbytes
        self._phase = None
        return PhaseTensors(peak_bytes=ph.peak, end_bytes=self.live_bytes, start_bytes=ph.start_bytes,
                            breakdown_at_peak=at_peak, breakdown_at_end=dict(self.totals))

    # ----------------------------------------------------------------------------- activity
    def __enter__(self):
        self._active = True
        self._paused = False
        return super().__enter__()

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self._active:
            self._active = False
            super().__exit__(exc_type, exc_val, exc_tb)

    def pause(self) -> None:
        """Leave the dispatch stack (no per-op cost, allocations unseen; frees of tracked storages are
        still seen) until :meth:`resume`. Code that compiles with ``fullgraph=True`` can run meanwhile."""
        if self._active and not self._stopped:
            self.__exit__(None, None, None)
            self._paused = True

    def resume(self) -> None:
        if self._paused and not self._stopped:
            self.__enter__()

    def stop(self) -> None:
        """Leave the dispatch stack for good (the rest of the job runs at full speed)."""
        self.__exit__(None, None, None)
        self._paused = False
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped


def _plain(t: torch.Tensor):
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name, None)
            if isinstance(inner, torch.Tensor):
                yield from _plain(inner)
        return
    yield t


def _op_allocates(func) -> bool | str:
    """True when ``func`` returns fresh storages (no return aliases an input); ``"resize"`` for ops
    that can grow an existing storage; False for views and in-place / out= ops."""
    name = getattr(func, "__name__", "")
    if name.startswith(("resize_", "set_", "resize_as_")):
        return "resize"
    if name.startswith("lift_fresh"):
        return True  # torch.tensor(data): built outside the dispatcher, handed to it once through this op
    try:
        returns = func._schema.returns
    except AttributeError:
        return True
    return not any(r.alias_info is not None for r in returns)


__all__ = ["CATEGORIES", "Classifier", "PhaseTensors", "TensorAccountant"]
