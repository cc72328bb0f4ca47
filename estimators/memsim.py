"""A small simulator of what PyTorch keeps in memory during one training step, op by op.

The estimator never runs a model. Instead each architecture is written as a short *program* against
:class:`Sim` (``estimators/archs.py``) that mirrors the transformers modeling code op by op: which tensors
each aten op allocates, which of them autograd saves for backward, when Python drops its references.
:meth:`Sim.backward` then replays autograd's engine: nodes run in reverse creation order (the CPU ready
queue runs the highest sequence number first), each node's backward formula allocates its gradients and
temporaries, gradient buffers of tensors used twice are summed (out of place: a new buffer), saved
tensors are released after their node ran, and ``AccumulateGrad`` nodes (top priority in the ready queue)
turn a parameter's gradient into ``param.grad`` as soon as all of its uses have delivered, with the hooks
LOMO and the layer-wise optimizers attach there. Non-reentrant gradient checkpointing (what the
Trainer uses) is simulated too: a checkpointed region keeps no saved tensors in the forward, and the first
node of the region that needs one re-runs the region's program (stopping early after the last saved
tensor, as ``torch.utils.checkpoint`` does) so its saved tensors exist again until their nodes run.

Sizes are not numbers but polynomials in the batch size ``B`` and sequence length ``S``: a tuple of the
coefficients of ``(1, B, S, B*S, S*S, B*S*S)`` in bytes (everything else -- hidden size, heads, vocabulary,
dtype -- is fixed by the model and the precision, so it is folded into the coefficients). One simulation per
model and setting therefore answers every shape: the live bytes at every local maximum are recorded as such
vectors, dominated ones are dropped, and the peak for a concrete ``(B, S)`` is the largest dot product.
All figures are bytes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

NB = 6
CATS = ("weights", "state", "grad", "act", "tmp", "other")
"""Categories of live bytes: parameters and buffers, optimizer state, parameter gradients, tensors born in
a forward phase (saved activations, logits, the batch), transients of backward and optimizer steps, and
long-lived odds and ends (the Trainer's loss accumulator)."""
_COUNTED = frozenset({"act", "tmp"})
"""Categories whose storages are counted one by one (``Sim.live_n``: live activations and transients, for
the CUDA allocator's per-allocation rounding); parameters, gradients and state are counted exactly from
the inventory instead."""
BASIS = ("1", "B", "S", "B*S", "S*S", "B*S*S")
_INT64_SAFE = 1 << 62
"""Below this, a sum of int64 products cannot wrap around (the bound :meth:`PhaseResult._exact` checks)."""
Vec = tuple  # (c, b, s, bs, ss, bss)
ZERO: Vec = (0, 0, 0, 0, 0, 0)


def vec(c: int = 0, b: int = 0, s: int = 0, bs: int = 0, ss: int = 0, bss: int = 0) -> Vec:
    """A size in bytes: ``c + b*B + s*S + bs*B*S + ss*S*S + bss*B*S*S``."""
    return (c, b, s, bs, ss, bss)


def vadd(a: Vec, b: Vec) -> Vec:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5])


def vsub(a: Vec, b: Vec) -> Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3], a[4] - b[4], a[5] - b[5])


def vmul(a: Vec, k: int) -> Vec:
    return (a[0] * k, a[1] * k, a[2] * k, a[3] * k, a[4] * k, a[5] * k)


def basis(b: int, s: int) -> Vec:
    return (1, b, s, b * s, s * s, b * s * s)


def veval(v: Vec, b: int, s: int) -> int:
    return v[0] + v[1] * b + v[2] * s + v[3] * b * s + v[4] * s * s + v[5] * b * s * s


# ------------------------------------------------------------------------------------------------- objects
class St:
    """One storage: ``size`` (bytes, a vector), reference count, category (``act`` born in a forward,
    ``grad`` a parameter's gradient, ``tmp`` anything else)."""

    __slots__ = ("size", "refs", "cat")

    def __init__(self, size: Vec, cat: str):
        self.size = size
        self.refs = 1
        self.cat = cat


class Var:
    """A Python-visible tensor: its storage, the node that produced it (``grad_fn``) and output index,
    whether it requires grad, and (for parameters) its :class:`Param`."""

    __slots__ = ("st", "node", "idx", "rg", "alive", "param", "size")

    def __init__(self, st: St | None, size: Vec, node=None, idx: int = 0, rg: bool = False, param=None):
        self.st = st
        self.size = size
        self.node = node
        self.idx = idx
        self.rg = rg
        self.alive = True
        self.param = param


class G:
    """A gradient flowing through the backward pass: its storage and whether its layout is contiguous
    (a transposed gradient reshaped later needs a copy)."""

    __slots__ = ("st", "contig")

    def __init__(self, st: St, contig: bool = True):
        self.st = st
        self.contig = contig


class Param:
    """A parameter (a leaf). ``uses``: edges into its ``AccumulateGrad`` node (tied weights have several);
    ``size``: its bytes; ``grad``: the storage of ``.grad`` once accumulated."""

    __slots__ = ("name", "size", "trainable", "uses", "pending", "buf", "grad", "var", "graph_leaf", "es")

    def __init__(self, name: str, size: int, trainable: bool = True, es: int = 4):
        self.name = name
        self.es = es
        self.size = vec(size)
        self.trainable = trainable
        self.uses = 0
        self.pending = 0
        self.buf: G | None = None
        self.grad: St | None = None
        self.var = Var(None, self.size, rg=trainable, param=self)
        self.graph_leaf = False


Rule = Callable[["Sim", "Node", list], list]


class Node:
    """An autograd node: backward ``rule``, saved storages, edges to its inputs' gradient slots
    (``(node, out_index)``, a :class:`Param`, or ``None``) and the gradient buffer of each output."""

    __slots__ = ("seq", "name", "rule", "saved", "edges", "buf", "ctx", "region", "nsave")

    def __init__(self, seq: int, name: str, rule: Rule, edges: list, nout: int, ctx):
        self.seq = seq
        self.name = name
        self.rule = rule
        self.saved: list[St] = []
        self.edges = edges
        self.buf: list[G | None] = [None] * nout
        self.ctx = ctx
        self.region = None
        self.nsave = 0


class _StopRecompute(Exception):
    pass


@dataclass
class _Region:
    """A checkpointed region: the program to re-run, its arguments (kept alive by the checkpoint until
    the region's last node that saved something has run), its nodes (creation order) and how many of them
    save tensors."""

    fn: Callable
    args: tuple
    nodes: list
    last_saving: int = -1
    recomputed: bool = False
    saving_left: int = 0


class PhaseResult:
    """What one simulated phase saw: the live bytes at every local maximum, as ``(total, per-category)``
    vectors (categories in :data:`CATS` order; candidates that another dominates component-wise are
    dropped), and the live bytes at its end (same form)."""

    __slots__ = ("tot", "cats", "count", "end", "_cmax", "_obj")

    def __init__(self, candidates: list, end: tuple):
        import numpy as np

        tot = np.array([c[0] for c in candidates], dtype=np.int64).reshape(-1, NB)
        cats = np.array([c[1] for c in candidates], dtype=np.int64).reshape(-1, len(CATS), NB)
        count = np.array([c[2] if len(c) > 2 else 0 for c in candidates], dtype=np.int64)
        self.tot, self.cats, self.count = _prune(tot, cats, count)
        self.end = end

    @property
    def candidates(self) -> list:
        return [(tuple(int(x) for x in t), tuple(tuple(int(x) for x in c) for c in cs))
                for t, cs in zip(self.tot, self.cats)]

    def peak(self, b: int, s: int) -> tuple[int, tuple]:
        """``(peak bytes, (total, per-category) at the peak)`` for batch ``b`` and sequence ``s``."""
        x = basis(b, s)
        i = self.argmax(x)
        return self.at(i, x)[0], (tuple(int(v) for v in self.tot[i]),
                                  tuple(tuple(int(v) for v in c) for c in self.cats[i]))

    def _exact(self, x):
        """``(tot, cats, x)`` as arrays whose dot products are exact: int64 while no product or sum can pass
        2**63, else Python integers (dtype object; slower, for shapes like a batch of 10**12)."""
        import numpy as np

        xs = [int(v) for v in x]
        if not hasattr(self, "_cmax"):
            self._cmax = max(int(np.abs(self.tot).max(initial=0)), int(np.abs(self.cats).max(initial=0)))
        if self._cmax * sum(abs(v) for v in xs) < _INT64_SAFE:
            return self.tot, self.cats, np.array(xs, dtype=np.int64)
        if not hasattr(self, "_obj"):
            self._obj = (self.tot.astype(object), self.cats.astype(object))
        return self._obj[0], self._obj[1], np.array(xs, dtype=object)

    def argmax(self, x) -> int:
        """Index of the peak candidate for the basis values ``x`` (:func:`basis`: a tuple or a vector)."""
        tot, _, xv = self._exact(x)
        return int((tot @ xv).argmax())

    def at(self, i: int, x) -> tuple[int, list[int], int]:
        """(total, bytes per category, live activation/transient allocations) of candidate ``i`` for basis
        values ``x``."""
        tot, cats, xv = self._exact(x)
        return int(tot[i] @ xv), [int(v) for v in cats[i] @ xv], int(self.count[i])


def _prune(tot, cats, count):
    """Drop duplicates and candidates dominated component-wise by one of the largest ones (sizes are never
    negative, so a dominated candidate is never the peak for any batch shape)."""
    import numpy as np

    if len(tot) <= 1:
        return tot, cats, count
    tot, idx = np.unique(tot, axis=0, return_index=True)
    cats, count = cats[idx], count[idx]
    order = np.argsort(-tot.sum(axis=1), kind="stable")
    tot, cats, count = tot[order], cats[order], count[order]
    keep = np.ones(len(tot), dtype=bool)
    for start in range(0, len(tot), 64):
        top = tot[start:start + 64][keep[start:start + 64]]
        if not len(top):
            continue
        dom = (tot[:, None, :] <= top[None, :, :]).all(-1)  # dom[i, j]: candidate i <= top j
        same = (tot[:, None, :] == top[None, :, :]).all(-1)
        keep &= ~(dom & ~same).any(1)
    return tot[keep], cats[keep], count[keep]


# ------------------------------------------------------------------------------------------------- the simulator
class Sim:
    """See the module docstring. Programs call :meth:`op` / :meth:`view` / :meth:`drop`; the Trainer-level
    driver calls :meth:`phase`, :meth:`backward` and reads :attr:`results`."""

    def __init__(self):
        self.live = [0] * NB
        self.live_cat = {c: [0] * NB for c in CATS}
        self.rising = False
        self.cands: list = []
        self.results: dict[str, PhaseResult] = {}
        self.phase_name: str | None = None
        self.tape: list[Node] = []
        self.seq = 0
        self.grad_enabled = True
        self.region: _Region | None = None
        self.recomp: dict | None = None
        self.params: dict[str, Param] = {}
        self.in_forward = False
        self.hooks: dict[str, Callable] = {}
        self.log: list | None = None
        self.regions: list = []
        self.live_n = 0

    # ---------------------------------------------------------------- bytes
    def _add(self, st: St, sign: int) -> None:
        s = st.size
        live = self.live
        lc = self.live_cat[st.cat]
        for i in range(NB):
            live[i] += sign * s[i]
            lc[i] += sign * s[i]
        if st.cat in _COUNTED:
            self.live_n += sign
        if self.log is not None:
            self.log.append((sign, s, st.cat))

    def _snap(self) -> tuple:
        lc = self.live_cat
        return (tuple(self.live), tuple(tuple(lc[c]) for c in CATS), self.live_n)

    def alloc(self, size: Vec, cat: str | None = None) -> St:
        """A new storage of ``size`` bytes (reference count 1)."""
        st = St(size, cat or ("act" if self.in_forward else "tmp"))
        self._add(st, +1)
        self.rising = True
        return st

    def incref(self, st: St | None) -> None:
        if st is not None:
            st.refs += 1

    def decref(self, st: St | None) -> None:
        if st is None:
            return
        st.refs -= 1
        if st.refs == 0:
            if self.rising:
                self.cands.append(self._snap())
                self.rising = False
            self._add(st, -1)

    def tmp(self, *sizes: Vec) -> None:
        """Allocate storages and free them again in reverse order (a formula's temporaries)."""
        sts = [self.alloc(s) for s in sizes]
        for st in reversed(sts):
            self.decref(st)

    def recat(self, st: St, cat: str) -> None:
        self._add(st, -1)
        st.cat = cat
        self._add(st, +1)

    # ---------------------------------------------------------------- phases
    def phase(self, name: str | None) -> None:
        """End the current phase (recording its result) and start ``name``."""
        if self.phase_name is not None:
            if self.rising:
                self.cands.append(self._snap())
            self.cands.append(self._snap())  # the phase's start and end levels matter too
            self.results[self.phase_name] = PhaseResult(self.cands, self._snap())
        self.phase_name = name
        self.cands = [self._snap()]
        self.rising = False
        self.in_forward = bool(name) and name.endswith("forward")

    # ---------------------------------------------------------------- parameters and tensors
    def param(self, name: str, nbytes: int, trainable: bool = True, es: int = 4) -> Var:
        p = self.params.get(name)
        if p is None:
            p = self.params[name] = Param(name, nbytes, trainable, es)
        return p.var

    def make_leaf(self, v: Var) -> Var:
        """``v.requires_grad_(True)`` on a tensor that has no graph (the Trainer's
        ``enable_input_require_grads`` hook on frozen input embeddings under checkpointing): it becomes a
        leaf whose gradient accumulates on it until the graph is freed."""
        if v.rg or self.recomp is not None:
            return v
        p = Param(f"__leaf{len(self.params)}", 0)
        p.size = v.size
        p.graph_leaf = True
        p.var = v
        v.rg, v.param = True, p
        self.incref(v.st)
        self.params[p.name] = p
        return v

    def leaf(self, size: Vec) -> Var:
        """A tensor created with ``requires_grad=True`` inside the step (not a parameter): its gradient is
        accumulated on it, and the graph's ``AccumulateGrad`` keeps it (and that gradient) alive until the
        graph is freed at the end of the backward."""
        v = self.const(size)
        if self.recomp is not None or not self.grad_enabled:
            return v
        p = Param(f"__leaf{len(self.params)}", 0)
        p.size = size
        p.graph_leaf = True
        p.var = v
        v.rg, v.param = True, p
        self.incref(v.st)  # held by the AccumulateGrad node
        self.params[p.name] = p
        return v

    def const(self, size: Vec, cat: str | None = None) -> Var:
        """A tensor that needs no gradient (ids, masks): allocated now."""
        v = Var(self.alloc(size, cat), size)
        if self.recomp is not None:
            self.recomp["vars"].add(id(v))
            self.recomp["objs"].append(v)
        return v

    def drop(self, *vs: Var | None) -> None:
        """Python lets go of these tensors (a variable rebound or a function returning)."""
        for v in vs:
            if v is not None and v.alive:
                v.alive = False
                if self.recomp is not None:
                    self.recomp["vars"].discard(id(v))
                self.decref(v.st)

    def view(self, v: Var, rule: Rule | None = None, ctx=None) -> Var:
        """A view of ``v`` (no new storage). ``rule``: its backward (default: the gradient passes as it
        is)."""
        out = Var(v.st, v.size)
        self.incref(v.st)
        if self.recomp is not None:
            self.recomp["vars"].add(id(out))
            self.recomp["objs"].append(out)
        if v.rg and self.grad_enabled:
            node = self._node("view", rule or bwd_pass, [v], 1, ctx)
            out.node, out.rg = node, True
        return out

    def _edge(self, v: Var):
        if not v.rg:
            return None
        if v.param is not None:
            return v.param
        return (v.node, v.idx)

    def _node(self, name: str, rule: Rule, inputs: Sequence[Var], nout: int, ctx) -> Node:
        self.seq += 1
        node = Node(self.seq, name, rule, [self._edge(v) for v in inputs], nout, ctx)
        if self.recomp is not None:
            self.recomp["nodes"].append(node)
            return node
        for e in node.edges:
            if isinstance(e, Param):
                e.uses += 1
        self.tape.append(node)
        if self.region is not None:
            node.region = self.region
            self.region.nodes.append(node)
        return node

    def op(self, name: str, inputs: Sequence[Var], outs: Sequence[Vec], save: Sequence = (),
           rule: Rule | None = None, ctx=None, grad: bool = True) -> list[Var]:
        """Run an op: if it needs grad, make a node whose backward is ``rule`` and which saves ``save``
        (input Vars, or ``"out0"``, ``"out1"``... for outputs); allocate its outputs in order.

        As in autograd's generated code, saved *inputs* are packed before the op runs and saved outputs
        after it: under checkpoint recomputation the early stop raised while packing the last saved
        tensor therefore comes before the outputs of an op that saves only inputs are allocated."""
        needs = grad and self.grad_enabled and rule is not None and any(v.rg for v in inputs)
        node = None
        if needs:
            node = self._node(name, rule, inputs, len(outs), ctx)
            in_saved = [s for s in save if not isinstance(s, str)]
            has_out = len(in_saved) != len(save)
            self._save(node, in_saved, final=not has_out)
        sts = [self.alloc(s) for s in outs]
        vs = [Var(st, s) for st, s in zip(sts, outs)]
        if self.recomp is not None:
            for v in vs:
                self.recomp["vars"].add(id(v))
                self.recomp["objs"].append(v)
        if node is not None:
            for i, v in enumerate(vs):
                v.node, v.idx, v.rg = node, i, True
            out_saved = [vs[int(s[3:])] for s in save if isinstance(s, str)]
            if out_saved:
                self._save(node, out_saved, final=True)
        return vs

    def _save(self, node: Node, saved: list[Var], final: bool = True) -> None:
        sts = [v.st for v in saved if v.st is not None]
        if self.recomp is not None:
            rc = self.recomp
            k = len(rc["nodes"]) - 1
            orig = rc["region"].nodes[k]
            for st in sts:
                self.incref(st)
                orig.saved.append(st)
            if final and k >= rc["region"].last_saving and (sts or orig.nsave):
                raise _StopRecompute()
            return
        if self.region is not None:
            node.nsave += len(sts)
            if sts and final:
                self.region.last_saving = len(self.region.nodes) - 1
                self.region.saving_left += 1
            elif sts and not final:
                pass
            return
        for st in sts:
            self.incref(st)
            node.saved.append(st)

    # ---------------------------------------------------------------- checkpointing
    def checkpoint(self, fn: Callable, *args):
        """Run ``fn(sim, *args)`` as a non-reentrant checkpointed region (``use_reentrant=False``)."""
        region = _Region(fn, args, [])
        for v in args:
            if isinstance(v, Var):
                self.incref(v.st)
        self.regions.append(region)
        outer, self.region = self.region, region
        try:
            out = fn(self, *args)
        finally:
            self.region = outer
        return out

    def _release_region(self, reg: _Region) -> None:
        if reg.args is None:
            return
        for v in reg.args:
            if isinstance(v, Var):
                self.decref(v.st)
        reg.args = None

    def _recompute(self, region: _Region) -> None:
        region.recomputed = True
        if region.last_saving < 0:
            return
        rc = {"region": region, "nodes": [], "vars": set(), "objs": [], "saved_nodes": 0}
        self.recomp = rc
        was, self.grad_enabled = self.grad_enabled, True
        try:
            region.fn(self, *region.args)
        except _StopRecompute:
            pass
        finally:
            self.recomp = None
            self.grad_enabled = was
        # Everything the aborted recomputation still held is let go (its frame unwinds).
        for v in rc["objs"]:
            if v.alive and id(v) in rc["vars"]:
                v.alive = False
                self.decref(v.st)

    # ---------------------------------------------------------------- backward
    def backward(self, root: Var, seed: Vec = vec(4)) -> None:
        """Run the engine from ``root`` (a scalar loss): every node reachable from it, highest sequence
        number first; frees the graph's saved tensors as nodes run."""
        if root.node is None:
            return
        for p in self.params.values():
            p.pending = p.uses
        g = G(self.alloc(seed))
        root.node.buf[root.idx] = g
        for node in reversed(self.tape):
            if all(b is None for b in node.buf):
                continue
            if node.region is not None and not node.region.recomputed and node.nsave:
                self._recompute(node.region)
            grads = node.rule(self, node, node.buf)
            gouts, node.buf = node.buf, [None] * len(node.buf)
            for go in gouts:
                if go is not None:
                    self.decref(go.st)
            for st in node.saved:
                self.decref(st)
            node.saved = []
            reg = node.region
            if reg is not None and node.nsave:
                reg.saving_left -= 1
                if reg.saving_left == 0:
                    self._release_region(reg)
            # Gradients go into the next nodes' input buffers in edge order; ready AccumulateGrad nodes
            # (top priority in the ready queue) then run in the queue's order: one or two of them run in
            # push order; with three, a binary heap pops the first, then the last, then the middle one.
            accs = []
            for edge, gr in zip(node.edges, grads):
                if gr is None:
                    continue
                if edge is None:
                    self.decref(gr.st)
                elif isinstance(edge, Param):
                    accs.append((edge, gr))
                else:
                    self._deliver(edge[0], edge[1], gr)
            if len(accs) == 3:
                accs = [accs[0], accs[2], accs[1]]
            for edge, gr in accs:
                self._to_param(edge, gr)
        # Nodes never reached keep nothing after the graph is gone; nor do checkpoints.
        for reg in self.regions:
            self._release_region(reg)
        self.regions = []
        for node in self.tape:
            for st in node.saved:
                self.decref(st)
            node.saved = []
            for go in node.buf:
                if go is not None:
                    self.decref(go.st)
        self.tape = []
        for name, p in list(self.params.items()):
            p.uses = 0
            if p.graph_leaf:  # the graph goes: its AccumulateGrad lets go of the leaf and its .grad
                if p.grad is not None:
                    self.decref(p.grad)
                self.decref(p.var.st)
                del self.params[name]

    def _deliver(self, node: Node, idx: int, g: G) -> None:
        old = node.buf[idx]
        if old is None:
            node.buf[idx] = g
            return
        node.buf[idx] = self._accumulate(old, g)

    def _accumulate(self, old: G, new: G) -> G:
        """The engine's InputBuffer sums two gradients of one tensor as ``old + new``: a new buffer, both
        old ones freed (on CPU with torch 2.13 the accountant never sees the in-place variant for the
        buffers these programs produce: they are views or shared)."""
        st = self.alloc(old.st.size)
        self.decref(old.st)
        self.decref(new.st)
        return G(st)

    def _to_param(self, p: Param, g: G) -> None:
        p.buf = g if p.buf is None else self._accumulate(p.buf, g)
        p.pending -= 1
        if p.pending > 0:
            return
        pre = self.hooks.get("pre_accumulate")
        if pre is not None:
            pre(self, p)
        g, p.buf = p.buf, None
        if p.grad is None:
            if g.st.refs == 1 and g.contig:
                if not p.graph_leaf:
                    self.recat(g.st, "grad")  # AccumulateGrad steals the buffer
                p.grad = g.st
            else:
                st = self.alloc(p.size, "grad")
                self.decref(g.st)
                p.grad = st
        else:
            self.decref(g.st)  # param.grad += g, in place
        hook = self.hooks.get("post_accumulate")
        if hook is not None:
            hook(self, p)

    def zero_grad(self) -> None:
        for p in self.params.values():
            if p.grad is not None:
                self.decref(p.grad)
                p.grad = None

    def cat_vec(self, cat: str) -> Vec:
        return tuple(self.live_cat[cat])


# ------------------------------------------------------------------------------------------------- common rules
def bwd_pass(sim: Sim, node: Node, gouts: list) -> list:
    """The gradient passes through unchanged (views, reshape of a contiguous gradient)."""
    g = gouts[0]
    sim.incref(g.st)
    return [G(g.st, g.contig)]


def bwd_transpose(sim: Sim, node: Node, gouts: list) -> list:
    """A transpose: the gradient is a transposed view (not contiguous any more)."""
    g = gouts[0]
    sim.incref(g.st)
    return [G(g.st, not g.contig)]


def bwd_reshape(sim: Sim, node: Node, gouts: list) -> list:
    """``view``/``reshape`` backward: ``grad.reshape(input shape)``, which copies a non-contiguous
    gradient."""
    g = gouts[0]
    if g.contig:
        sim.incref(g.st)
        return [G(g.st)]
    return [G(sim.alloc(g.st.size))]


__all__ = ["BASIS", "CATS", "G", "NB", "Node", "Param", "PhaseResult", "Sim", "St", "Var", "ZERO", "basis",
           "bwd_pass", "bwd_reshape", "bwd_transpose", "vadd", "veval", "vec", "vmul", "vsub"]
