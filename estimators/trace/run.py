"""Trace one training setting at a few shapes and fit the step's event log: :func:`step_trace`.

A :class:`StepTrace` covers every ``(batch, seq)`` by *regions*: batch 1 is its own region (a batch of one
makes some transposed tensors contiguous, so fewer copies run), batches from 2 up another; the sequence
length is split at the config's window sizes (``sliding_window``, ``attention_chunk_size``, a RoPE scaling's
``original_max_position_embeddings``: modeling code branches on them), each window size its own one-value
region. Inside a region the step runs the same ops in the same order and every size is a polynomial of
``(1, B, S, B*S, S*S, B*S*S)``: six traces determine it (three for batch 1: no ``B`` terms), a seventh at
another shape checks it. Regions are traced when first asked for. A step whose operations change with the
sequence length (a loop over tokens or chunks) has no such region: its regions narrow to one length, or one
point, traced at the real shape (:func:`trace_region`, ``StepTrace.depends``).

The result is plain data (:mod:`optimem.estimators.trace.data`: arrays and a little JSON), keyed by
:func:`trace_key`: the config's content, the torch and transformers versions and the setting.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..catalog import ModelSource
from .cpu_rules import install as install_cpu_rules
from .data import S_MIN, Region, StepTrace
from ..errors import TraceFailure, UserError, one_line
from .events import EventLog, FitError, SequenceMismatch, fit_logs, fit_shapes, from_events
from ..memsim import NB, basis
from .meta_kernels import cpp_meta_kernels
from .model import build_traced_model
from .setting import TraceSetting
from .images import image_spec, layout as image_layout
from .step import StepHooks, make_batch, micro_step, num_items, wrap_autocast
from .tensor import Recorder, TraceError, TraceMode, from_real
from .diagnose import explain
from .liger_rules import active
from .load import load_phase

install_cpu_rules()

FIRST_S = 16
"""First sequence length traced in the region that starts at :data:`S_MIN` (shorter ones share its
polynomials)."""
S_STEP = 8
WINDOW_KEYS = ("sliding_window", "attention_chunk_size", "local_attention", "sliding_window_size")


def trace_key(source: ModelSource, setting: TraceSetting) -> str:
    """The cache key of a trace: config content, torch and transformers versions, setting."""
    import transformers  # lazy: pulls in transformers, which importing this module does not

    blob = json.dumps({"config": source.load(), "peft": getattr(source, "peft", None), "torch": torch.__version__,
                       "transformers": transformers.__version__, "setting": asdict(setting), "format": 1},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def per_layer_configs(config) -> list:
    """The layer configs of a heterogeneous config (transformers' ``per_layer_config``: attributes that vary
    across layers are read there, not on the global config); empty for a homogeneous one."""
    try:
        if not getattr(config, "is_heterogeneous", False):
            return []
        return list(config.per_layer_config)
    except (RuntimeError, AttributeError, TypeError):
        return []


def config_value(config, key: str):
    """``config.key`` or None -- also None when it is a per-layer attribute of a heterogeneous config (transformers
    raises for those: :func:`per_layer_configs` holds their values)."""
    try:
        return getattr(config, key, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return None


def windows(config) -> tuple[int, ...]:
    """Sequence lengths at which modeling code of ``config`` may branch (see the module docstring)."""
    cfgs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        cfgs.append(text())
    cfgs += [layer for c in cfgs for layer in per_layer_configs(c)]
    out: set[int] = set()
    for c in cfgs:
        for k in WINDOW_KEYS:
            v = config_value(c, k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= S_MIN:
                out.add(v)
        rope = config_value(c, "rope_parameters") or config_value(c, "rope_scaling") or {}
        if isinstance(rope, dict):
            subs = [rope] + [v for v in rope.values() if isinstance(v, dict)]
            for r in subs:
                v = r.get("original_max_position_embeddings")
                if isinstance(v, int) and r.get("rope_type", r.get("type")) not in (None, "default", "linear") and v >= S_MIN:
                    out.add(v)
    return tuple(sorted(out))


def s_bounds(wins: tuple[int, ...], s: int) -> tuple[int, int | None]:
    """The sequence region holding ``s``: ``[S_MIN, w1 - 1]``, ``[w1, w1]``, ``[w1 + 1, w2 - 1]``, ... ."""
    lo = S_MIN
    for w in wins:
        if s < w:
            return lo, w - 1
        if s == w:
            return w, w
        lo = w + 1
    return lo, None


@dataclass(frozen=True)
class _Plan:
    """Where a region is traced: ``shape_points`` (fit by shapes, :func:`~optimem.estimators.trace.events.fit_shapes`,
    over the per-dimension columns ``dim_cols``), ``more_points`` (added when that fails: then sizes are fitted
    directly over ``size_cols``) and the ``check`` point every fit must reproduce."""

    shape_points: tuple
    dim_cols: tuple
    more_points: tuple
    size_cols: tuple
    check: tuple


def _plan(b_lo: int, s_lo: int, s_hi: int | None, b_hi: int | None = None) -> _Plan:
    one_b = b_lo == 1 or b_hi == b_lo
    bs = (b_lo,) if one_b else (2, 3)
    b_check = b_lo if one_b else 4
    if s_hi is not None and s_hi == s_lo:  # one sequence length: linear in B only
        cols = (0,) if one_b else (0, 1)
        return _Plan(tuple((b, s_lo) for b in bs), cols, (), cols, (b_check, s_lo))
    start = FIRST_S if s_lo == S_MIN else s_lo
    ss = (start, start + S_STEP, start + 2 * S_STEP)
    check = start + 3 * S_STEP + 37
    if s_hi is not None:
        check = min(check, s_hi)
    dim_cols = (0, 2) if b_lo == 1 else (0, 1, 2, 3)
    size_cols = (0, 2, 4) if b_lo == 1 else (0, 1, 2, 3, 4, 5)
    return _Plan(tuple((b, s) for s in ss[:2] for b in bs), dim_cols, tuple((b, ss[2]) for b in bs), size_cols,
                 (b_check, check))


def _region_bounds(wins: tuple[int, ...], b: int, s: int, depends: str = "") -> tuple[int, int | None, int, int | None]:
    """The region ``(b_lo, b_hi, s_lo, s_hi)`` traced for ``(b, s)``; ``depends`` (see
    :attr:`~optimem.estimators.trace.data.StepTrace.depends`): ``"seq"`` -- one sequence length, batches from 2
    up (or batch 1); ``"batch"`` -- the point ``(b, s)`` alone."""
    if depends:
        s = max(s, S_MIN)
        if depends == "batch" or b <= 1:
            return b, b, s, s
        return 2, None, s, s
    s_lo, s_hi = s_bounds(wins, max(s, S_MIN))
    if s_hi is not None and s_hi != s_lo and s_hi - s_lo < 3 * S_STEP:
        s_lo = s_hi = max(s, S_MIN)  # a short stretch between windows: one region per length
    return (1, 1, s_lo, s_hi) if b <= 1 else (2, None, s_lo, s_hi)


class _Tracer:
    """A built model ready to trace one setting at any shape."""

    def __init__(self, source: ModelSource, setting: TraceSetting):
        self.source = source
        self.setting = setting
        try:
            self.model, self.facts = build_traced_model(source, dtype=setting.dtype, task=setting.task,
                                                        attn=setting.attn, gc=setting.gc, frozen=setting.frozen,
                                                        peft=setting.peft)
        except (TraceError, RuntimeError, NotImplementedError) as exc:
            raise UserError(f"cannot trace {source.name}: {one_line(exc, 200)}") from None
        self.images = None
        if setting.images is not None:  # image-text-to-text: the tokens per image counted by the model's own code
            try:
                self.images = image_spec(self.model, *setting.images)
            except UserError as exc:
                raise UserError(f"cannot trace {source.name}: {exc}") from None
        self.liger = None
        if setting.liger is not None:
            from .liger_rules import patch  # lazy: liger-kernel rules, only for --use-liger-kernel traces

            self.liger = patch(self.model, setting.liger)
        wrap_autocast(self.model, setting.mixed)
        self.rec = Recorder()
        self.hooks = StepHooks(self.model, self.rec)
        self.built_bytes = self._param_bytes()
        if setting.peft:
            # peft's and bitsandbytes' layers change themselves on their first call (bitsandbytes' 4-bit layers set
            # their compute type and cast their bias to it -- prepare_kbit upcast it to fp32 --, LLM.int8 layers
            # move their weight's row scales into their state): warmed up before any traced step, every region's
            # traces are of the steps after it, as the Trainer's steps after step 0 are.
            try:
                with cpp_meta_kernels():
                    self.warm_up(2, FIRST_S, False)
            except TraceError as exc:
                raise UserError(f"cannot trace {source.name}: {exc.op} ({exc.reason})") from None

    def _param_bytes(self) -> int:
        return sum({p._m.untyped_storage()._cdata: p._m.untyped_storage().nbytes()
                    for p in self.model.parameters()}.values())

    @property
    def settled_bytes(self) -> int:
        """How much the parameters' storage changed (bytes) since the model was built: what a warm-up step left
        (a bias cast to the compute dtype), which the built model -- the inventory -- does not show."""
        return self._param_bytes() - self.built_bytes

    warmed = False
    """Whether a discarded micro-step ran first (:meth:`warm_up`)."""

    def warm_up(self, b: int, s: int, accum: bool) -> None:
        """Run one micro-step and forget its events: what the model builds on its first step and keeps
        is then built (a trace of the steps after it runs without)."""
        self.run(b, s, accum)
        self.warmed = True

    runs = 0
    """Micro-steps run so far."""

    def run(self, b: int, s: int, accum: bool) -> tuple[list, list | None]:
        """Raw events of a first micro-step (and of an accumulating one) at batch ``b`` x seq ``s``."""
        self.runs += 1
        facts = self.facts
        batch = make_batch(facts, b, s, self.setting.task, packed=self.setting.packed, images=self.images)
        with TraceMode():
            items = num_items(facts, [batch])
            tr_loss = from_real(torch.tensor(0.0))

        try:
            dev = self.setting.device
            with active(self.liger):
                first = list(micro_step(self.model, facts, batch, items, 1, tr_loss, self.rec, dev))
                second = list(micro_step(self.model, facts, batch, items, 1, tr_loss, self.rec, dev)) if accum else None
        finally:
            for p in self.model.parameters():
                p.grad = None
        return first, second


def trace_region(source: ModelSource, setting: TraceSetting, b: int, s: int, accum: bool,
                 tracer: _Tracer | None = None, wider: Region | None = None,
                 depends: str = "", narrow: bool = True) -> tuple[Region | None, _Tracer, str]:
    """Trace and fit the region holding ``(b, s)`` (see :class:`_Plan`). ``wider``: for batch 1, the fitted
    region of batches from 2 at the same sequence lengths -- then one trace at batch 1 usually suffices
    (:func:`_derive_batch_one`). ``depends``: what the model's operation sequence is known to depend on
    (:attr:`StepTrace.depends`). When the traces of a region do not line up (a loop over tokens or chunks: other
    ops at other lengths) the region narrows -- to the one sequence length ``s`` (``"seq"``), then to the point
    ``(b, s)`` (``"batch"``) -- traced at the real shape; a trace predicted to take longer than
    :data:`MAX_SHAPE_TRACE_S` is refused. Returns the region, the tracer and the dependence found (the region
    None when it had to narrow and ``narrow`` is False: the caller wanted the wider region only)."""
    tracer = tracer or _Tracer(source, setting)
    wins = windows(tracer.model.config)
    name = source.name
    costs: dict = {}  # point -> (events, seconds) of every trace made, for the cost of a narrower one
    kept: dict = {}  # traces of the region kept across a warm-up

    try:
        with _no_cyclic_gc():
            while True:
                b_lo, b_hi, s_lo, s_hi = _region_bounds(wins, b, s, depends)
                plan = _plan(b_lo, s_lo, s_hi, b_hi)
                traced: dict = kept  # point -> ((log, nbytes, shapes) of the first micro-step, same of the accumulating one)
                kept = {}

                same = set(plan.shape_points + plan.more_points + (plan.check,))

                def trace(points, keep: bool = True) -> None:
                    with cpp_meta_kernels():
                        for pt in points:
                            if pt not in traced:
                                t0 = time.perf_counter()
                                f, a = tracer.run(pt[0], pt[1], accum)
                                costs[pt] = (len(f) + len(a or ()), time.perf_counter() - t0)
                                if keep:
                                    traced[pt] = tuple(_parsed(x) for x in ((f, a) if accum else (f,)))
                                    _same_steps(traced, same, pt)  # a mismatch stops before the longer traces

                if depends and s_lo > FIRST_S + S_STEP:
                    if not any(len({ss for bb, ss in costs if bb == b_}) > 1 for b_, _ in costs):
                        trace(((2, FIRST_S), (2, FIRST_S + S_STEP)), keep=False)
                    _check_cost(name, costs, (b_lo, b_hi, s_lo, s_hi))
                t0 = time.perf_counter()
                try:
                    logs = None
                    if b_lo == 1 and wider is not None:
                        pt = (1, _plan(2, s_lo, s_hi).check[1])  # an odd length: sizes coincide less by chance
                        trace((pt,))
                        logs = _derive_batch_one(wider, traced[pt], pt, accum)
                    if logs is None:
                        trace(plan.shape_points + (plan.check,))
                        logs = [_fit(traced, plan, which, trace) for which in range(2 if accum else 1)]
                    break
                except FitError as exc:
                    if isinstance(exc, SequenceMismatch) and not tracer.warmed:
                        # The first step built something the model keeps (a RoPE table computed on first use, as
                        # longrope's long factors are): the Trainer's steps after it run without -- trace those.
                        # Only the first trace ran as a first step (each later one ran after it): warm up, trace it again.
                        tracer.warm_up(*plan.shape_points[0], accum)
                        first_pt = next(iter(traced), None)
                        kept = {pt: v for pt, v in traced.items() if pt != first_pt}
                        continue
                    if b_hi == b_lo and s_hi == s_lo:  # one point: nothing narrower to trace
                        raise UserError(f"cannot trace {name}: {exc}") from None
                    depends = "batch" if depends else "seq"
                    if not narrow:
                        return None, tracer, depends
    except TraceError as exc:
        raise UserError(f"cannot trace {name}: {exc.op} ({exc.reason})") from None
    first = logs[0]
    if first.survivors:
        _check_carried(name, tracer, traced, accum, len(first.survivors))
    seconds = round(time.perf_counter() - t0, 3) if depends else 0.0
    return Region(b_lo, b_hi, s_lo, s_hi, first, logs[1] if accum else None, seconds), tracer, depends


def _same_steps(traced: dict, same: set, pt: tuple) -> None:
    """Raise :class:`SequenceMismatch` when the trace at ``pt`` runs other operations than the region's first
    (both in ``same``: points of one plan, which must run one program)."""
    if pt not in same:
        return
    ref = next((v for p, v in traced.items() if p in same and p != pt), None)
    if ref is not None and not all(x[0].same_sequence(y[0]) for x, y in zip(ref, traced[pt])):
        raise SequenceMismatch("the step runs different operations at different batch sizes or sequence lengths")


def _check_carried(name: str, tracer: _Tracer, traced: dict, accum: bool, n: int) -> None:
    """A step that leaves ``n`` storages alive for the next one is traced when the next step frees as many of the
    earlier step's (state kept on a module and replaced every step: a recurrent state); the replay counts them from
    their birth on. Refused (one line) otherwise -- a cache that grows from step to step -- and under gradient
    accumulation (each micro-step would replace the previous one's)."""
    if tracer.runs < 2:  # only a first step traced: one more shows what the next step frees
        with cpp_meta_kernels():
            f, a = tracer.run(*next(iter(traced)), accum)
        later = _parsed(f)[0]
    else:
        later = traced[next(reversed(traced))][0][0]
    if accum or len(later.carried) != n:
        raise UserError(f"cannot trace {name}: its training step keeps {n} tensors alive from one step to the next "
                        + ("(state replaced every micro-step, which gradient accumulation would keep twice)" if accum
                           and len(later.carried) == n else "(a cache in the model)"))


MAX_SHAPE_TRACE_S = 600
"""Longest (predicted) time, in seconds, the traces of one narrowed region (:func:`trace_region`) may take: a
model whose operations differ at every sequence length is traced at the real length, and a loop over tokens
makes that trace as long as the sequence."""


def _check_cost(name: str, costs: dict, bounds: tuple) -> None:
    """Refuse (:class:`TraceFailure`, one line) a narrowed region whose traces would take longer than
    :data:`MAX_SHAPE_TRACE_S`: the events of a trace grow linearly with the sequence length (read from two traces
    at one batch size and two lengths), each event costs what it cost in the traces made."""
    b_lo, b_hi, s_lo, _ = bounds
    plan = _plan(b_lo, s_lo, s_lo, b_hi)
    n_traces = len(set(plan.shape_points + (plan.check,)))
    by_b: dict = {}
    for (bb, ss), (n, _) in costs.items():
        by_b.setdefault(bb, {})[ss] = n
    slope = 0.0
    for pts in by_b.values():
        if len(pts) >= 2:
            (s1, n1), (s2, n2) = sorted(pts.items())[:2]
            slope = max(slope, (n2 - n1) / (s2 - s1))
    events = sum(n for n, _ in costs.values())
    per_event = sum(t for _, t in costs.values()) / max(events, 1)
    s_ref, n_ref = max(((ss, n) for (bb, ss), (n, _) in costs.items()), default=(0, 0))
    predicted = n_traces * max(n_ref + slope * (s_lo - s_ref), n_ref) * per_event
    if predicted > MAX_SHAPE_TRACE_S:
        raise TraceFailure(f"cannot trace {name} at sequence length {s_lo}: its step changes with the sequence length "
                           "(a loop over tokens or chunks), so each length is traced on its own, and this one would "
                           f"take about {predicted / 60:.0f} minutes (the limit is {MAX_SHAPE_TRACE_S // 60}); "
                           "estimate a shorter sequence", "tracer")


@contextlib.contextmanager
def _no_cyclic_gc():
    """No cyclic garbage collection while tracing: frees come from reference counts (a collection adds nothing
    to a trace whose storages are in no cycle -- the test against real runs says so) and the collector's passes
    over the event logs would cost a quarter of the trace."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


LOOKAHEAD = 64
"""How far the batch-1 alignment looks for an allocation the batch-1 step skips."""


def _derive_batch_one(wider: Region, traced: tuple, pt: tuple[int, int], accum: bool) -> list[EventLog] | None:
    """The batch-1 logs from one trace at batch 1 and the fitted logs of batches from 2 (None when that does not
    work out). A batch of one runs the same ops minus a few copies (a ``(1, S)`` slice is already contiguous, so
    ``.contiguous()`` copies nothing): when the batch-1 trace's allocations are the wider log's in order with
    some left out, each one's size at ``pt`` matching the wider polynomial, the batch-1 log keeps its own events
    and takes those polynomials for its sizes."""
    out = []
    for which, fitted in enumerate((wider.first, wider.accum) if accum else (wider.first,)):
        if fitted is None:
            return None
        log, nbytes, shapes = traced[which]
        at = fitted.sizes @ np.array(basis(*pt), dtype=np.int64)
        rows = []
        j = 0
        for i in range(len(nbytes)):
            k = j
            while k < len(at) and k - j <= LOOKAHEAD and at[k] != nbytes[i]:
                k += 1
            if k >= len(at) or at[k] != nbytes[i]:
                return None
            rows.append(k)
            j = k + 1
        if len(at) - len(rows) > max(8, len(at) // 20):  # not "the same step minus a few copies"
            return None
        out.append(EventLog(log.kind, log.a, log.b, fitted.sizes[np.array(rows, dtype=np.int64)].reshape(-1, NB),
                            log.survivors))
    return out


def _parsed(raw: list) -> tuple:
    shapes: list = []
    log, nbytes = from_events(raw, shapes)
    return log, nbytes, shapes


def _fit(traced: dict, plan: _Plan, which: int, trace) -> EventLog:
    """The fitted log of the first (``which`` 0) or accumulating (1) micro-step: by shapes from the few points
    of the plan if that reproduces the check point, else by sizes from more points."""
    check = traced[plan.check][which]
    pts = list(plan.shape_points)
    logs = [traced[p][which] for p in pts]
    coef = fit_shapes(pts, [x[2] for x in logs], list(plan.dim_cols)) if len(pts) > 1 else None
    if coef is not None:
        try:
            return fit_logs([x[0] for x in logs], [x[1] for x in logs], pts, list(plan.dim_cols),
                            check=(check[0], check[1], plan.check), coef=coef)
        except SequenceMismatch:
            raise
        except FitError:
            pass
    pts = pts + list(plan.more_points)
    trace(plan.more_points)
    logs = [traced[p][which] for p in pts]
    return fit_logs([x[0] for x in logs], [x[1] for x in logs], pts, list(plan.size_cols),
                    check=(check[0], check[1], plan.check))


_CACHE: dict[str, StepTrace] = {}


_NARROWED: dict = {}
"""Trace key -> the (warmed) tracer of a region that had to narrow when asked for without narrowing."""


def step_trace(source: ModelSource, setting: TraceSetting, batch: int, seq: int, accum: bool = False,
               known: StepTrace | None = None, narrow: bool = True) -> StepTrace:
    """The :class:`StepTrace` of ``source`` x ``setting`` with the region of ``(batch, seq)`` traced (and its
    accumulating micro-step when ``accum``). Cached in memory per :func:`trace_key`; ``known``: the regions
    traced before (read from the on-disk cache), which the new one joins; ``narrow`` False: when the region has
    to narrow (:func:`trace_region`), only record that (``StepTrace.depends``) and trace nothing more."""
    key = trace_key(source, setting)
    st = _CACHE.get(key)
    if st is None and known is not None:
        st = _CACHE[key] = known
    if st is not None and st.region(batch, seq, accum) is not None:
        return st
    wider = tracer = None
    depends = st.depends if st is not None else ""
    if batch <= 1 and not depends:
        # batch 1 is derived from batches from 2 (one more trace instead of three) -- unless their region has to
        # narrow to the one sequence length: then batch 1 is traced at that length on its own
        st = step_trace(source, setting, 2, seq, accum, narrow=False)
        wider = st.region(2, seq, accum)
        depends = st.depends
        if wider is None:
            tracer = _NARROWED.pop(key, None)
    try:
        region, tracer, depends = trace_region(source, setting, batch, seq, accum, tracer=tracer, wider=wider,
                                               depends=depends, narrow=narrow)
    except TraceFailure:
        raise
    except UserError as exc:
        if not str(exc).startswith("cannot trace "):
            raise

        raise explain(source, setting, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the model's code raised on trace tensors: tell whose error it is

        text = " ".join(str(exc).split())[:200]
        raise explain(source, setting, f"cannot trace {source.name}: {type(exc).__name__}: {text}") from None
    if st is None:
        facts = tracer.facts
        names = tuple(n for n, _ in tracer.model.named_parameters())
        stores = {b_._m.untyped_storage()._cdata: b_._m.untyped_storage().nbytes() for b_ in tracer.model.buffers()}
        buffers_bytes = sum(stores.values())
        st = StepTrace(key, source.name, names, int(buffers_bytes), facts.attn_implementation,
                       windows(tracer.model.config), "B" if setting.task == "sequence-classification" else "BS",
                       facts.shifts_labels, facts.accepts_loss_kwargs, tracer.settled_bytes)
        st.load_peak, st.load_end = load_phase(source, setting)
        st.layerdrop = facts.layerdrop
        _CACHE[key] = st
    if depends != st.depends:  # the regions traced before cover shapes the narrower ones would not split
        st.depends = depends
        st.regions = [r for r in st.regions if r.s_lo == r.s_hi and (depends != "batch" or r.b_lo == r.b_hi)]
    if region is None:
        _NARROWED[key] = tracer
        return st
    st.regions = [r for r in st.regions if not (r.b_lo == region.b_lo and r.s_lo == region.s_lo)] + [region]
    st.batch_layout = image_layout(tracer.images) if tracer.images is not None else ()  # image-text-to-text
    return st


__all__ = ["Region", "StepTrace", "TraceSetting", "s_bounds", "step_trace", "trace_key", "trace_region", "windows"]
