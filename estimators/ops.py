"""The aten ops the architecture programs use, as :class:`~estimators.memsim.Sim` calls.

Each function allocates what the real op allocates (outputs in order), saves what autograd saves, and
gives a backward rule that allocates what the derivative formula allocates, in the order PyTorch does
(checked against the tensor accountant's op-level log on CPU). Sizes are byte vectors (see
``memsim``); ``n`` arguments are element-count vectors and ``es`` element sizes in bytes.

Conventions read from PyTorch's generated autograd code and confirmed on traces:

* a binary op's gradients are computed for the *second* input first, then the first; a gradient that
  must be reduced to a broadcast input's shape is reduced afterwards (``sum_to``), freeing the full-size
  one;
* ``mm`` computes the weight's gradient first, ``addmm`` the input's, then the weight's, then the bias's;
* the engine sums two gradients of one tensor out of place (a new buffer; both old ones freed).
"""
from __future__ import annotations

from .memsim import G, Node, Sim, Var, bwd_pass, bwd_reshape, bwd_transpose, vec, vmul

F32 = 4


def nvec(bs: int = 0, c: int = 0, b: int = 0, s: int = 0, ss: int = 0, bss: int = 0):
    """An element count: ``c + b*B + s*S + bs*B*S + ss*S*S + bss*B*S*S``."""
    return vec(c, b, s, bs, ss, bss)


def sz(n, es: int):
    return vmul(n, es)


# ------------------------------------------------------------------------------------------------- rules
def _full_grads(sim: Sim, node: Node, sizes: list, out_size, order=None) -> list:
    """Gradients of an elementwise op with broadcasting: full-size products for each input that needs
    one (last input first), then reductions of the broadcast ones to their own size."""
    k = len(node.edges)
    full: list = [None] * k
    for i in (order if order is not None else reversed(range(k))):
        if node.edges[i] is not None:
            full[i] = sim.alloc(out_size)
    out: list = [None] * k
    for i in range(k):
        if full[i] is None:
            continue
        if sizes[i] != out_size:
            red = sim.alloc(sizes[i])
            sim.decref(full[i])
            out[i] = G(red)
        else:
            out[i] = G(full[i])
    return out


def rule_mul(sim, node, gouts):
    sizes, out_size = node.ctx
    return _full_grads(sim, node, sizes, out_size)


def rule_add(sim, node, gouts):
    """``a + b``: the gradient passes to both (shared), reduced for a broadcast input."""
    sizes, out_size = node.ctx
    g = gouts[0]
    res: list = []
    for i, e in enumerate(node.edges):
        if e is None:
            res.append(None)
        elif sizes[i] != out_size:
            res.append(G(sim.alloc(sizes[i])))
        else:
            sim.incref(g.st)
            res.append(G(g.st, g.contig))
    return res


def rule_alloc_inputs(sim, node, gouts):
    """One fresh gradient per input that needs one, of the input's size, in input order
    (``silu_backward``, ``embedding_dense_backward``, ``_log_softmax_backward_data``...)."""
    sizes = node.ctx
    return [G(sim.alloc(s)) if e is not None else None for e, s in zip(node.edges, sizes)]


def rule_alloc_inputs_rev(sim, node, gouts):
    sizes = node.ctx
    res: list = [None] * len(sizes)
    for i in reversed(range(len(sizes))):
        if node.edges[i] is not None:
            res[i] = G(sim.alloc(sizes[i]))
    return res


def rule_pow(sim, node, gouts):
    """``x.pow(k)``: ``grad * (k * x.pow(k - 1))``: two temporaries and the result."""
    (size,) = node.ctx
    a = sim.alloc(size)
    b = sim.alloc(size)
    r = sim.alloc(size)
    sim.decref(b)
    sim.decref(a)
    return [G(r)]


def rule_pow2(sim, node, gouts):
    """``x.pow(2)``... same formula as :func:`rule_pow`."""
    return rule_pow(sim, node, gouts)


def rule_scale(sim, node, gouts):
    """``x * python_scalar`` / ``x / scalar``: one new tensor."""
    (size,) = node.ctx
    return [G(sim.alloc(size))]


def rule_mean(sim, node, gouts):
    """``mean(dim)``: ``grad.expand(input) / n`` -- one input-sized tensor."""
    (size,) = node.ctx
    return [G(sim.alloc(size))]


def rule_rsqrt(sim, node, gouts):
    """``rsqrt``: ``-0.5 * grad * result.pow(3)``: the same two temporaries and result as :func:`rule_pow`."""
    return rule_pow(sim, node, gouts)


def rule_mm(sim, node, gouts):
    """``x @ W.t()`` (``nn.Linear`` without bias, input folded to 2-D): weight gradient first, then the
    input's (a view of a 2-D result: never summed in place)."""
    x_size, w_size = node.ctx
    res: list = [None, None]
    if node.edges[1] is not None:
        res[1] = G(sim.alloc(w_size))
    if node.edges[0] is not None:
        res[0] = G(sim.alloc(x_size))
    return res


def rule_addmm(sim, node, gouts):
    """``addmm(bias, x, W)`` (Conv1D, Linear with bias; edges in that order): the input's gradient, the
    weight's, then the bias's (``sum``)."""
    x_size, w_size, b_size = node.ctx
    res: list = [None, None, None]
    if node.edges[1] is not None:
        res[1] = G(sim.alloc(x_size))
    if node.edges[2] is not None:
        res[2] = G(sim.alloc(w_size))
    if node.edges[0] is not None:
        res[0] = G(sim.alloc(b_size))
    return res


def rule_linear_bias(sim, node, gouts):
    """``F.linear(x, W, b)`` on a 3-D input (decomposed to ``addmm`` on the folded input): input, weight,
    bias."""
    return rule_addmm(sim, node, gouts)


# ------------------------------------------------------------------------------------------------- ops
def mul(sim: Sim, a: Var, b: Var, out_size=None) -> Var:
    """``a * b`` (broadcasting); saves each input the other's gradient needs."""
    out_size = out_size or (a.size if sum(a.size) >= sum(b.size) else b.size)
    save = []
    if b.rg:
        save.append(a)
    if a.rg:
        save.append(b)
    return sim.op("mul", [a, b], [out_size], save=save, rule=rule_mul, ctx=([a.size, b.size], out_size))[0]


def add(sim: Sim, a: Var, b: Var, out_size=None) -> Var:
    out_size = out_size or (a.size if sum(a.size) >= sum(b.size) else b.size)
    return sim.op("add", [a, b], [out_size], rule=rule_add, ctx=([a.size, b.size], out_size))[0]


def scale(sim: Sim, x: Var, out_size=None) -> Var:
    """``x * python_number`` (or ``/``, ``-x``): nothing saved."""
    out_size = out_size or x.size
    return sim.op("scale", [x], [out_size], rule=rule_scale, ctx=(x.size,))[0]


def add_scalar(sim: Sim, x: Var) -> Var:
    return sim.op("add_scalar", [x], [x.size], rule=bwd_pass)[0]


def pow_(sim: Sim, x: Var, out_size=None) -> Var:
    return sim.op("pow", [x], [out_size or x.size], save=[x], rule=rule_pow, ctx=(x.size,))[0]


def mean_last(sim: Sim, x: Var, out_size) -> Var:
    return sim.op("mean", [x], [out_size], rule=rule_mean, ctx=(x.size,))[0]


def rsqrt(sim: Sim, x: Var) -> Var:
    return sim.op("rsqrt", [x], [x.size], save=["out0"], rule=rule_rsqrt, ctx=(x.size,))[0]


def unary_saving_input(sim: Sim, name: str, x: Var, out_size=None) -> Var:
    """``silu``, ``gelu``, ``relu``...: the backward needs the input and allocates one input-sized
    gradient."""
    return sim.op(name, [x], [out_size or x.size], save=[x], rule=rule_alloc_inputs, ctx=[x.size])[0]


def unary_saving_output(sim: Sim, name: str, x: Var) -> Var:
    """``tanh``, ``sigmoid``, ``exp``: the backward needs the result."""
    return sim.op(name, [x], [x.size], save=["out0"], rule=rule_alloc_inputs, ctx=[x.size])[0]


def to_copy(sim: Sim, x: Var, out_size) -> Var:
    """``x.to(dtype)``: a copy; the backward casts the gradient back (a new tensor)."""
    return sim.op("to", [x], [out_size], rule=rule_alloc_inputs, ctx=[x.size])[0]


def linear(sim: Sim, x: Var, w: Var, out_size, bias: Var | None = None) -> Var:
    """``nn.Linear`` on a 3-D input: ``mm`` (no bias) or ``addmm`` (bias) on the folded input."""
    # autograd saves the input only for the weight's gradient and the weight only for the input's
    save = ([x] if w.rg else []) + ([w] if x.rg else [])
    if bias is None:
        return sim.op("mm", [x, w], [out_size], save=save, rule=rule_mm, ctx=(x.size, w.size))[0]
    return sim.op("addmm", [bias, x, w], [out_size], save=save, rule=rule_addmm,
                  ctx=(x.size, w.size, bias.size))[0]


def embedding(sim: Sim, w: Var, ids: Var, out_size) -> Var:
    return sim.op("embedding", [w, ids], [out_size], save=[ids], rule=rule_alloc_inputs, ctx=[w.size, ids.size])[0]


def dropout(sim: Sim, x: Var, p: float, training: bool = True, device: str = "cpu", es: int = 4) -> Var:
    """``nn.Dropout`` in training. On CPU: a mask of the input's dtype (``empty_like`` + ``bernoulli_``)
    and the product; the mask is saved, the backward is one product. On CUDA ``native_dropout`` returns
    the output and a one-byte boolean mask (``es``: the input's element size)."""
    if not training or p <= 0:
        return x
    if device != "cpu":
        mask_size = tuple(v // es for v in x.size)
        out, mask = sim.op("native_dropout", [x], [x.size, mask_size], save=["out1"], rule=rule_alloc_inputs,
                           ctx=[x.size])
        sim.drop(mask)
        return out
    mvar = sim.const(x.size)
    out = sim.op("dropout", [x], [x.size], save=[mvar], rule=rule_alloc_inputs, ctx=[x.size])[0]
    sim.drop(mvar)
    return out


def transpose(sim: Sim, x: Var) -> Var:
    return sim.view(x, bwd_transpose)


def reshape_view(sim: Sim, x: Var) -> Var:
    """``view``/``reshape`` of a contiguous tensor (the backward reshapes the gradient, copying it when
    it is not contiguous)."""
    return sim.view(x, bwd_reshape)


def view(sim: Sim, x: Var) -> Var:
    return sim.view(x, bwd_pass)


__all__ = ["F32", "add", "add_scalar", "dropout", "embedding", "linear", "mean_last", "mul", "nvec", "pow_",
           "reshape_view", "rsqrt", "scale", "sz", "to_copy", "transpose", "unary_saving_input",
           "unary_saving_output", "view"]
