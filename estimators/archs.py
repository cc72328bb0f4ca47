"""Architecture programs: the forward pass of each model family, op by op, as :class:`~.memsim.Sim` calls.

Each program mirrors the transformers 5 modeling code of its family (``models/llama``, ``models/gpt2``,
``models/t5``) closely enough that the simulator allocates, saves and frees what the real forward does, in
the same order, for any batch size and sequence length. What a program reads comes from the model's
config (an :class:`Arch`), never from its name: hidden size, heads and key/value heads, head size,
intermediate size and MLP kind, activation, norm kind, biases, dropout, tied embeddings, vocabulary.

Python's reference semantics matter for the forward's peak: a local variable keeps its tensor alive until
it is rebound or its function returns, so the programs ``drop`` tensors where the modeling code lets go of
them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from . import ops
from .memsim import G, Sim, Var, bwd_pass, vec
from .ops import F32, nvec, sz

I64 = 8
BOOL = 1


@dataclass(frozen=True)
class Arch:
    """What the memory programs need from a model config (see :func:`arch_from_config`)."""

    family: str  # "decoder" (Llama-like), "gpt2", "t5"
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    act: str = "silu"
    gated_mlp: bool = True
    attn_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    n_positions: int = 0
    decoder_layers: int = 0
    rel_buckets: int = 0
    embed_scale: bool = False
    norm_plus_one: bool = False
    scale_decoder_outputs: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Setting:
    """How the step runs: parameter dtype bytes ``es``; autocast dtype bytes (0: none); attention
    implementation; gradient checkpointing; whether dropout is active (training)."""

    es: int = 4
    autocast: int = 0
    attn: str = "sdpa"
    gc: bool = False
    training: bool = True
    device: str = "cpu"

    @property
    def cs(self) -> int:
        """Element size of matmul outputs (autocast's lower precision, else the parameters')."""
        return self.autocast or self.es


def arch_from_config(cfg) -> Arch:
    """An :class:`Arch` from a transformers ``PretrainedConfig`` (defaults filled in by its class)."""
    mt = getattr(cfg, "model_type", "")
    g = functools.partial(getattr, cfg)
    tied = bool(g("tie_word_embeddings", False))
    if mt == "gpt2":
        h = cfg.n_embd
        return Arch("gpt2", mt, cfg.n_layer, h, cfg.n_head, cfg.n_head, h // cfg.n_head, cfg.n_inner or 4 * h,
                    cfg.vocab_size, tied, act=cfg.activation_function, gated_mlp=False, attn_bias=True, o_bias=True,
                    mlp_bias=True, attn_dropout=cfg.attn_pdrop, resid_dropout=cfg.resid_pdrop,
                    embd_dropout=cfg.embd_pdrop, n_positions=cfg.n_positions)
    if mt in ("t5", "mt5", "umt5"):
        proj = getattr(cfg, "feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = getattr(cfg, "dense_act_fn", None) or (proj.split("-", 1)[1] if gated else proj)
        return Arch("t5", mt, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_heads, cfg.d_kv, cfg.d_ff,
                    cfg.vocab_size, tied, act=act, gated_mlp=gated, attn_dropout=cfg.dropout_rate,
                    resid_dropout=cfg.dropout_rate, embd_dropout=cfg.dropout_rate,
                    decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
                    rel_buckets=cfg.relative_attention_num_buckets,
                    scale_decoder_outputs=bool(getattr(cfg, "scale_decoder_outputs", tied)))
    h = g("hidden_size")
    nh = g("num_attention_heads")
    nkv = g("num_key_value_heads", None) or nh
    hd = g("head_dim", None) or h // nh
    act = g("hidden_act", None) or g("hidden_activation", None) or "silu"
    notes = []
    if mt not in ("llama", "mistral", "qwen2", "gemma"):
        notes.append(f"model_type '{mt}' is estimated with the Llama-family program (an approximation)")
    bias = bool(g("attention_bias", False)) or mt == "qwen2"
    return Arch("decoder", mt, g("num_hidden_layers"), h, nh, nkv, hd, g("intermediate_size"), g("vocab_size"), tied,
                act=act, gated_mlp=True, attn_bias=bias, o_bias=bool(g("attention_bias", False)),
                mlp_bias=bool(g("mlp_bias", False)), attn_dropout=float(g("attention_dropout", 0.0) or 0.0),
                embed_scale=mt == "gemma", norm_plus_one=mt == "gemma", notes=tuple(notes))


# ------------------------------------------------------------------------------------------------- helpers
class Model:
    """The parameters of one model as simulator leaves (``Var``), by role."""

    def __init__(self, sim: Sim, arch: Arch, st: Setting, trainable=None):
        self.sim, self.a, self.st = sim, arch, st
        self.trainable = trainable or (lambda name: True)

        self.wcache: dict = {}

    def p(self, name: str, numel: int) -> Var:
        return self.sim.param(name, numel * self.st.es, self.trainable(name), self.st.es)

    def dropout(self, x: Var, p: float, es: int | None = None) -> Var:
        """``nn.Dropout`` (``es``: the input's element size, default the activations')."""
        st = self.st
        return ops.dropout(self.sim, x, p, st.training, st.device, es or st.es)

    # ---------------------------------------------------------------- autocast
    def cast_w(self, w: Var) -> Var:
        """Autocast's cached cast of a parameter to the lower precision: made once per autocast context
        (the forward; a checkpoint recomputation has its own) and kept by the cache until it exits."""
        sim = self.sim
        cache = sim.recomp.setdefault("wcache", {}) if sim.recomp is not None else self.wcache
        key = id(w)
        v = cache.get(key)
        if v is None:
            v = cache[key] = ops.to_copy(sim, w, tuple(x // self.st.es * self.st.autocast for x in w.size))
        return v

    def end_autocast(self) -> None:
        """The autocast context exits (after the loss): its weight casts are let go."""
        for v in self.wcache.values():
            self.sim.drop(v)
        self.wcache = {}

    def linear(self, x: Var, w: Var, out_n, bias: Var | None = None, x_es: int | None = None) -> Var:
        """An ``nn.Linear`` / ``Conv1D`` on ``x`` (element size ``x_es``, default the parameters'): under
        autocast its input is cast to the lower precision (a new copy per call unless already there) and its
        weight and bias come from the autocast cache; the output is in the lower precision."""
        st = self.st
        if not st.autocast:
            return ops.linear(self.sim, x, w, sz(out_n, st.es), bias)
        x_es = x_es or st.es
        ac = st.autocast
        wc = self.cast_w(w)  # autocast casts the weight, then the input, then the bias
        xc = x if x_es == ac else ops.to_copy(self.sim, x, tuple(v // x_es * ac for v in x.size))
        bc = self.cast_w(bias) if bias is not None else None
        out = ops.linear(self.sim, xc, wc, sz(out_n, ac), bc)
        if xc is not x:
            self.sim.drop(xc)
        return out


def _slice_bwd(sim, node, gouts):
    (size,) = node.ctx
    return [G(sim.alloc(size))]


def _cat_bwd(sim, node, gouts):
    g = gouts[0]
    out = []
    for e in node.edges:
        if e is None:
            out.append(None)
        else:
            sim.incref(g.st)
            out.append(G(g.st, False))
    return out


def rotate_half_mul_add(sim: Sim, x: Var, cos: Var, sin: Var, out_size=None) -> Var:
    """``(x * cos) + (rotate_half(x) * sin)`` of Llama's ``apply_rotary_pos_emb`` (``out_size``: the
    promoted result's bytes when ``x`` and the tables differ in dtype)."""
    out_size = out_size or x.size
    m1 = ops.mul(sim, x, cos, out_size=out_size)
    x1 = sim.view(x, _slice_bwd, ctx=(x.size,))
    x2 = sim.view(x, _slice_bwd, ctx=(x.size,))
    half = tuple(v // 2 for v in x.size)
    neg = ops.scale(sim, x2, out_size=half)
    cat = sim.op("cat", [neg, x1], [x.size], rule=_cat_bwd)[0]
    sim.drop(neg, x1, x2)
    m2 = ops.mul(sim, cat, sin, out_size=out_size)
    sim.drop(cat)
    out = ops.add(sim, m1, m2)
    sim.drop(m1, m2)
    return out


def _sdpa_flash_bwd(sim, node, gouts):
    q, k, v = node.ctx
    res = [None, None, None]
    for i, s in enumerate((q, k, v)):
        if node.edges[i] is not None:
            res[i] = G(sim.alloc(s), False)
    return res


def sdpa_flash(sim: Sim, q: Var, k: Var, v: Var, out_size, lse_size) -> tuple[Var, Var]:
    """``_scaled_dot_product_flash_attention_for_cpu`` (no mask or dropout; GQA handled by the kernel):
    outputs ``out`` and the fp32 ``logsumexp``; saves q, k, v, out and logsumexp."""
    out, lse = sim.op("sdpa_flash", [q, k, v], [out_size, lse_size], save=[k, q, v, "out1", "out0"],
                      rule=_sdpa_flash_bwd, ctx=(q.size, k.size, v.size))
    return out, lse


def _sdpa_fused_bwd(sim, node, gouts):
    sizes, accum = node.ctx
    if accum:  # FlashAttention-2's fp32 dq accumulator
        sim.tmp(accum)
    return [G(sim.alloc(s), False) if e is not None else None for e, s in zip(node.edges, sizes)]


def sdpa_fused(sim: Sim, q: Var, k: Var, v: Var, heads: int, es: int, mask: Var | None = None) -> Var:
    """CUDA's fused SDPA kernels (FlashAttention for 16-bit inputs without a mask, memory-efficient
    attention otherwise; both handle dropout and GQA in the kernel): the output, an fp32 logsumexp per
    query row and the RNG seed/offset; saves q, k, v, the output, the logsumexp (and the mask). The
    backward allocates dq, dk, dv (and the mask's gradient), plus FlashAttention-2's fp32 dq accumulator.
    Not validated against a GPU (no CUDA device was available when this was written)."""
    flash = es != F32 and mask is None
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    out, lse, rng = sim.op("sdpa_cuda", inputs, [q.size, vec(bs=heads * F32), vec(16)],
                           save=inputs[:3] + ([mask] if mask is not None else []) + ["out0", "out1", "out2"],
                           rule=_sdpa_fused_bwd,
                           ctx=([x.size for x in inputs], tuple(v_ * F32 // es for v_ in q.size) if flash else None))
    sim.drop(lse, rng)
    return out


def rmsnorm(sim: Sim, x: Var, w: Var, a: Arch, st: Setting, n) -> Var:
    """Llama's RMSNorm: computed in fp32, the result cast back and scaled by the weight."""
    es = st.es
    h = ops.to_copy(sim, x, sz(n, F32)) if es != F32 else x
    p = ops.pow_(sim, h)
    nrow = tuple(v // a.hidden for v in n)
    var = ops.mean_last(sim, p, sz(nrow, F32))
    sim.drop(p)
    t = ops.add_scalar(sim, var)
    r = ops.rsqrt(sim, t)
    sim.drop(t)
    y = ops.mul(sim, h, r, out_size=sz(n, F32))
    sim.drop(r)
    if h is not x:
        sim.drop(h)
    if es != F32:
        y2 = ops.to_copy(sim, y, sz(n, es))
        sim.drop(y)
        y = y2
    if a.norm_plus_one:
        w1 = ops.add_scalar(sim, w)
        out = ops.mul(sim, y, w1, out_size=sz(n, es))
        sim.drop(w1)
    else:
        out = ops.mul(sim, w, y, out_size=sz(n, es))
    sim.drop(y, var)
    return out


def act_fn(sim: Sim, name: str, x: Var) -> Var:
    name = (name or "silu").lower()
    if name in ("gelu_new", "gelu_pytorch_tanh_python", "gelu_fast"):
        return _gelu_new(sim, x)
    if name in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu", "gelu_python"):
        return ops.unary_saving_input(sim, name, x) if name != "relu" else \
            sim.op("relu", [x], [x.size], save=["out0"], rule=ops.rule_alloc_inputs, ctx=[x.size])[0]
    return ops.unary_saving_input(sim, name, x)


def _gelu_new(sim: Sim, x: Var) -> Var:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` (GPT-2's ``gelu_new``), op by op."""
    half = ops.scale(sim, x)
    p3 = ops.pow_(sim, x)
    c = ops.scale(sim, p3)
    sim.drop(p3)
    s = ops.add(sim, x, c)
    sim.drop(c)
    m = ops.scale(sim, s)
    sim.drop(s)
    t = ops.unary_saving_output(sim, "tanh", m)
    sim.drop(m)
    one = ops.add_scalar(sim, t)
    sim.drop(t)
    out = ops.mul(sim, half, one)
    sim.drop(half, one)
    return out


# ------------------------------------------------------------------------------------------------- Llama family
def decoder_layer(sim: Sim, x: Var, cos: Var, sin: Var, i: int, M: Model, mask: Var | None = None) -> Var:
    a, st = M.a, M.st
    es, cs = st.es, st.cs
    H, nh, nkv, hd, I = a.hidden, a.heads, a.kv_heads, a.head_dim, a.intermediate
    nBSH = nvec(bs=H)
    pre = f"model.layers.{i}."
    h = rmsnorm(sim, x, M.p(pre + "input_layernorm.weight", H), a, st, nBSH)
    # attention
    def proj(name, out_f, bias):
        w = M.p(pre + f"self_attn.{name}.weight", out_f * H)
        b = M.p(pre + f"self_attn.{name}.bias", out_f) if bias else None
        return M.linear(h, w, nvec(bs=out_f), bias=b)

    q0 = proj("q_proj", nh * hd, a.attn_bias)
    qv = ops.reshape_view(sim, q0)
    q = ops.transpose(sim, qv)
    k0 = proj("k_proj", nkv * hd, a.attn_bias)
    kv_ = ops.reshape_view(sim, k0)
    k = ops.transpose(sim, kv_)
    v0 = proj("v_proj", nkv * hd, a.attn_bias)
    vv = ops.reshape_view(sim, v0)
    v = ops.transpose(sim, vv)
    sim.drop(qv, kv_, vv)
    # q * cos: the rotary tables are in the activations' dtype, so under autocast (bf16 q, fp32 cos) the
    # rotated q and k come out in fp32
    re_ = max(cs, es)
    qe = rotate_half_mul_add(sim, q, cos, sin, sz(nvec(bs=nh * hd), re_))
    ke = rotate_half_mul_add(sim, k, cos, sin, sz(nvec(bs=nkv * hd), re_))
    sim.drop(q, k, q0, k0)
    if st.attn == "eager":
        ao = _eager_attention(sim, qe, ke, v, a, st, re_, mask)
    else:
        qa, ka = qe, ke
        if re_ != cs:  # autocast casts SDPA's inputs (key first, then query; value already is)
            ka = ops.to_copy(sim, ke, sz(nvec(bs=nkv * hd), cs))
            qa = ops.to_copy(sim, qe, sz(nvec(bs=nh * hd), cs))
        ao, lse = sdpa_flash(sim, qa, ka, v, sz(nvec(bs=nh * hd), cs), sz(nvec(bs=nh), F32))
        sim.drop(lse)
        if qa is not qe:
            sim.drop(qa, ka)
    at = ops.transpose(sim, ao)
    sim.drop(ao)
    ar = ops.reshape_view(sim, at)
    sim.drop(at)
    wo = M.p(pre + "self_attn.o_proj.weight", H * nh * hd)
    bo = M.p(pre + "self_attn.o_proj.bias", H) if a.o_bias else None
    o = M.linear(ar, wo, nBSH, bias=bo, x_es=cs)
    sim.drop(ar, qe, ke, v, v0)
    sim.drop(h)
    h1 = ops.add(sim, x, o, out_size=sz(nBSH, max(es, cs)))
    sim.drop(o)
    # MLP
    h2 = rmsnorm(sim, h1, M.p(pre + "post_attention_layernorm.weight", H), a, st, nBSH)
    nBSI = nvec(bs=I)
    gw = M.p(pre + "mlp.gate_proj.weight", I * H)
    uw = M.p(pre + "mlp.up_proj.weight", I * H)
    dw = M.p(pre + "mlp.down_proj.weight", H * I)
    mb = a.mlp_bias
    g = M.linear(h2, gw, nBSI, bias=M.p(pre + "mlp.gate_proj.bias", I) if mb else None)
    ga = act_fn(sim, a.act, g)
    sim.drop(g)
    u = M.linear(h2, uw, nBSI, bias=M.p(pre + "mlp.up_proj.bias", I) if mb else None)
    gu = ops.mul(sim, ga, u)
    sim.drop(ga, u)
    d = M.linear(gu, dw, nBSH, bias=M.p(pre + "mlp.down_proj.bias", H) if mb else None, x_es=cs)
    sim.drop(gu, h2)
    out = ops.add(sim, h1, d, out_size=sz(nBSH, max(es, cs)))
    sim.drop(d, h1)
    return out


def _softmax_bwd(sim, node, gouts):
    (size,) = node.ctx
    return [G(sim.alloc(size))]


def _eager_mask(sim: Sim, st: Setting) -> Var:
    """``create_causal_mask`` for eager attention: boolean (S, S) and (B, 1, S, S) steps, then the
    (B, 1, S, S) float mask the layers add (it lives until the model's forward returns)."""
    le = sim.const(vec(ss=BOOL))
    both = sim.const(vec(ss=BOOL))
    sim.drop(le)
    full = sim.const(vec(bss=BOOL))
    sim.drop(both)
    sim.tmp(vec(4), vec(4))
    mask = sim.const(vec(bss=st.es))
    sim.drop(full)
    return mask


def _eager_attention(sim: Sim, q: Var, k: Var, v: Var, a: Arch, st: Setting, qk_es: int,
                     mask: Var | None = None) -> Var:
    """Llama's ``eager_attention_forward``: ``repeat_kv`` copies (GQA), ``q @ k^T`` on contiguous copies
    (the rotated q and k keep the projections' transposed layout), ``* scaling``, ``+ mask``, softmax in
    fp32 cast back to q's dtype, ``@ v``, transpose + contiguous."""
    cs = st.cs
    nh, nkv, hd = a.heads, a.kv_heads, a.head_dim
    full_qk = sz(nvec(bs=nh * hd), qk_es)
    rep = nh // max(nkv, 1)
    kr = sim.op("repeat_kv", [k], [full_qk], rule=ops.rule_scale, ctx=(k.size,))[0]
    vr = sim.op("repeat_kv", [v], [sz(nvec(bs=nh * hd), cs)], rule=ops.rule_scale, ctx=(v.size,))[0]
    scores_n = nvec(bss=nh)
    qk_cs = cs if st.autocast else qk_es
    qc = sim.op("clone", [q], [full_qk], rule=_clone_bwd)[0]
    if st.autocast and qk_es != cs:  # matmul under autocast: 16-bit copies of both operands
        qa = ops.to_copy(sim, qc, sz(nvec(bs=nh * hd), cs))
        ka = ops.to_copy(sim, kr, sz(nvec(bs=nh * hd), cs))
        sim.drop(qc)
        qc, kk = qa, ka
    else:
        kk = kr
    s0 = sim.op("bmm", [qc, kk], [sz(scores_n, qk_cs)], save=_bmm_save(qc, kk), rule=_bmm_bwd, ctx=(qc.size, kk.size))[0]
    sim.drop(qc)
    if kk is not kr:
        sim.drop(kk)
    sim.drop(kr)
    s1 = ops.scale(sim, s0)
    sim.drop(s0)
    if mask is not None:
        s2 = ops.add(sim, s1, mask, out_size=s1.size)
        sim.drop(s1)
        s1 = s2
    sm = sim.op("softmax", [s1], [sz(scores_n, F32)], save=["out0"], rule=_softmax_bwd, ctx=(s1.size,))[0]
    sim.drop(s1)
    if qk_es != F32:  # .to(query.dtype)
        sm2 = ops.to_copy(sim, sm, sz(scores_n, qk_es))
        sim.drop(sm)
        sm = sm2
    if st.autocast and sm.size != sz(scores_n, cs):
        sm2 = ops.to_copy(sim, sm, sz(scores_n, cs))
        sim.drop(sm)
        sm = sm2
    out = sim.op("bmm", [sm, vr], [sz(nvec(bs=nh * hd), cs)], save=_bmm_save(sm, vr), rule=_bmm_bwd,
                 ctx=(sm.size, vr.size))[0]
    sim.drop(sm, vr)
    t = ops.transpose(sim, out)
    sim.drop(out)
    c = sim.op("contiguous", [t], [out.size], rule=ops.rule_alloc_inputs, ctx=[out.size])[0]
    sim.drop(t)
    return c


def decoder_forward(sim: Sim, M: Model, ids: Var, labels: Var):
    """``LlamaForCausalLM.forward`` with labels: embeddings, rotary tables, layers, final norm, lm_head,
    ``ForCausalLMLoss``. Returns ``(loss, logits)``."""
    a, st = M.a, M.st
    es = st.es
    H, V, hd = a.hidden, a.vocab, a.head_dim
    nBSH = nvec(bs=H)
    emb_w = M.p("model.embed_tokens.weight", V * H)
    x = ops.embedding(sim, emb_w, ids, sz(nBSH, es))
    if st.gc:  # enable_input_require_grads: the embeddings' output requires grad even when they are frozen
        sim.make_leaf(x)
    if a.embed_scale:
        xs = ops.scale(sim, x)
        sim.drop(x)
        x = xs
    pos0 = sim.const(vec(s=I64))
    pos = sim.const(vec(s=I64))
    sim.drop(pos0)
    if st.attn == "eager":
        mask = _eager_mask(sim, st)
    else:
        mask = None
        sim.tmp(vec(bs=BOOL), vec(I64), vec(BOOL))  # the mask check on attention_mask (all ones: no mask)
    # rotary tables (no grad): fp32, cast to the activations' dtype
    f0 = sim.const(vec(s=F32))
    fr = sim.const(vec(s=hd // 2 * F32))
    sim.drop(f0)
    emb = sim.const(vec(s=hd * F32))
    c0 = sim.const(vec(s=hd * F32))
    cos = sim.const(vec(s=hd * F32))
    sim.drop(c0)
    s0 = sim.const(vec(s=hd * F32))
    sin = sim.const(vec(s=hd * F32))
    sim.drop(s0, fr, emb)
    if es != F32:
        cos2, sin2 = sim.const(vec(s=hd * es)), sim.const(vec(s=hd * es))
        sim.drop(cos, sin)
        cos, sin = cos2, sin2
    h = x
    for i in range(a.layers):
        if st.gc:
            # the checkpoint keeps the layer's inputs (hidden states, rotary tables, position ids) alive
            nh_ = sim.checkpoint(lambda s, hh, m, c, sn, _p, i=i: decoder_layer(s, hh, c, sn, i, M, m),
                                 h, mask, cos, sin, pos)
        else:
            nh_ = decoder_layer(sim, h, cos, sin, i, M, mask)
        if h is not x:
            sim.drop(h)
        h = nh_
    hn = rmsnorm(sim, h, M.p("model.norm.weight", H), a, st, nBSH)
    sim.drop(h, x, pos, cos, sin, mask)
    w_head = emb_w if a.tied else M.p("lm_head.weight", V * H)
    logits = M.linear(hn, w_head, nvec(bs=V))
    loss = causal_lm_loss(sim, logits, labels, V)
    sim.drop(hn)
    return loss, [_outputs_fp32(sim, M, logits)]


# ------------------------------------------------------------------------------------------------- loss
def _outputs_fp32(sim: Sim, M: Model, logits: Var) -> Var:
    """Under mixed precision accelerate wraps the model's forward in ``torch.autocast`` (whose exit drops
    the cached weight casts) and then ``convert_outputs_to_fp32``: the 16-bit logits are replaced by an
    fp32 copy."""
    M.end_autocast()
    if not M.st.autocast or logits.size == sz(nvec(bs=M.a.vocab), F32):
        return logits
    out = sim.const(sz(nvec(bs=M.a.vocab), F32))
    sim.drop(logits)
    return out


def _nll_bwd(sim, node, gouts):
    (size,) = node.ctx
    return [G(sim.alloc(size))]


def cross_entropy_sum(sim: Sim, logits32: Var, target: Var, V: int) -> Var:
    """``F.cross_entropy(..., reduction="sum")`` on fp32 logits: ``log_softmax`` (saves its output) then
    ``nll_loss`` (saves the target and the total weight). Returns the summed loss (a scalar)."""
    lsm = sim.op("log_softmax", [logits32], [logits32.size], save=["out0"], rule=_softmax_bwd,
                 ctx=(logits32.size,))[0]
    tw = Var(None, vec())
    loss, tw = sim.op("nll_loss", [lsm, target], [vec(F32), vec(F32)], save=[target, "out1"], rule=_nll_bwd,
                      ctx=(lsm.size,))
    sim.drop(lsm, tw)
    return loss


def causal_lm_loss(sim: Sim, logits: Var, labels: Var, V: int) -> Var:
    """transformers' ``ForCausalLMLoss``: upcast the logits to fp32 (a copy unless they are fp32),
    pad + shift the labels (a padded copy and a contiguous shifted copy), cross-entropy summed, divided by
    ``num_items_in_batch``."""
    l32 = logits
    if logits.size != sz(nvec(bs=V), F32):
        l32 = ops.to_copy(sim, logits, sz(nvec(bs=V), F32))
    padded = sim.const(vec(b=I64, bs=I64))
    shifted = sim.const(vec(bs=I64))
    lv = ops.view(sim, l32)
    if l32 is not logits:
        sim.drop(l32)
    loss_sum = cross_entropy_sum(sim, lv, shifted, V)
    sim.drop(lv)
    loss = sim.op("div", [loss_sum], [vec(F32)], rule=bwd_pass)[0]
    sim.drop(loss_sum, padded, shifted)
    return loss


__all__ = ["Arch", "Model", "Setting", "arch_from_config", "causal_lm_loss", "decoder_forward"]


# ------------------------------------------------------------------------------------------------- GPT-2
def layer_norm(sim: Sim, x: Var, w: Var, b: Var, st: Setting, n) -> Var:
    """``nn.LayerNorm`` over the last dimension of ``n`` (B*S rows): ``native_layer_norm`` returns the
    output, the mean and the reciprocal std per row (in the input's dtype on CPU, fp32 on CUDA); saves
    input, weight, bias, mean and rstd; the backward allocates the input's, weight's and bias's
    gradients."""
    stat_es = F32 if st.device != "cpu" else st.es
    nrow = nvec(bs=1)
    out, mean, rstd = sim.op("layer_norm", [x, w, b], [x.size, sz(nrow, stat_es), sz(nrow, stat_es)],
                             save=[x, w, b, "out1", "out2"], rule=ops.rule_alloc_inputs,
                             ctx=[x.size, w.size, b.size])
    sim.drop(mean, rstd)
    return out


def _split_bwd(sim, node, gouts):
    """``split`` backward: the three gradients concatenated into one new tensor."""
    (size,) = node.ctx
    return [G(sim.alloc(size))]


def _bmm_bwd(sim, node, gouts):
    """``bmm(a, b)``: ``b``'s gradient first, then ``a``'s."""
    sa, sb = node.ctx
    res: list = [None, None]
    if node.edges[1] is not None:
        res[1] = G(sim.alloc(sb))
    if node.edges[0] is not None:
        res[0] = G(sim.alloc(sa))
    return res


def _bmm_save(a: Var, b: Var) -> list:
    """``bmm(a, b)`` saves ``a`` for ``b``'s gradient and ``b`` for ``a``'s."""
    return ([a] if b.rg else []) + ([b] if a.rg else [])


def _clone_bwd(sim, node, gouts):
    g = gouts[0]
    sim.incref(g.st)
    return [G(g.st, g.contig)]


def math_sdpa(sim: Sim, q: Var, k: Var, v: Var, heads: int, es: int, dropout_p: float, training: bool,
              causal: bool, mask: Var | None = None, k_copy: bool = True, v_copy: bool = True) -> Var:
    """``_scaled_dot_product_attention_math`` (what CPU SDPA runs with dropout or a float mask).

    16-bit inputs are upcast to fp32 copies first and everything below runs in fp32: q and k^T scaled by
    sqrt(scale) (fresh tensors), a causal mask built as a float (S, S) tensor, contiguous copies of q, k^T
    and v for ``bmm`` (none for k^T / v already laid out for it: ``k_copy`` / ``v_copy``), scores
    (B*heads, S, S), the mask added, softmax, dropout (mask + output), ``attn @ v``; the result (and the
    attention weights, returned and dropped by ``F.scaled_dot_product_attention``) cast back. Returns the
    (B, heads, S, hd) output."""
    low = es != F32
    keep_in: list = []
    if low:  # query_acc / key_acc / value_acc
        q = ops.to_copy(sim, q, tuple(x * F32 // es for x in q.size))
        k = ops.to_copy(sim, k, tuple(x * F32 // es for x in k.size))
        v = ops.to_copy(sim, v, tuple(x * F32 // es for x in v.size))
        keep_in = [q, k, v]
    cs = F32 if low else es
    qs = ops.scale(sim, q)
    own_mask = None
    if causal and mask is None:
        ones = sim.const(vec(ss=BOOL))
        tril = sim.const(vec(ss=BOOL))
        sim.drop(ones)
        own_mask = sim.const(vec(ss=cs))
        sim.drop(tril)
        mask = own_mask
    kt = ops.transpose(sim, k)
    ks = ops.scale(sim, kt)
    sim.drop(kt)
    qc = sim.op("clone", [qs], [q.size], rule=_clone_bwd)[0]
    kc = sim.op("clone", [ks], [k.size], rule=_clone_bwd)[0] if k_copy else ks
    scores_n = nvec(bss=heads)
    s0 = sim.op("bmm", [qc, kc], [sz(scores_n, cs)], save=_bmm_save(qc, kc), rule=_bmm_bwd, ctx=(qc.size, kc.size))[0]
    sim.drop(qc)
    if kc is not ks:
        sim.drop(kc)
    sim.drop(ks)
    if mask is not None:
        s1 = ops.add(sim, s0, mask, out_size=s0.size)
        sim.drop(s0)
    else:
        s1 = s0
    sm = sim.op("softmax", [s1], [s1.size], save=["out0"], rule=_softmax_bwd, ctx=(s1.size,))[0]
    sim.drop(s1)
    attn = ops.dropout(sim, sm, dropout_p, training)
    if attn is not sm:
        sim.drop(sm)
    attn_low = ops.to_copy(sim, attn, sz(scores_n, es)) if low else None  # evaluated first (make_tuple)
    vc = sim.op("clone", [v], [v.size], rule=_clone_bwd)[0] if v_copy else v
    out = sim.op("bmm", [attn, vc], [q.size], save=_bmm_save(attn, vc), rule=_bmm_bwd, ctx=(attn.size, vc.size))[0]
    sim.drop(attn)
    if vc is not v:
        sim.drop(vc)
    if low:
        o2 = ops.to_copy(sim, out, tuple(x * es // F32 for x in out.size))
        sim.drop(out)
        out = o2
    sim.drop(qs)
    if own_mask is not None:
        sim.drop(own_mask)
    sim.drop(*reversed(keep_in))
    if attn_low is not None:
        sim.drop(attn_low)
    return out


def gpt2_block(sim: Sim, x: Var, i: int, M: Model, mask: Var | None = None) -> Var:
    a, st = M.a, M.st
    es, cs = st.es, st.cs
    H, nh, I = a.hidden, a.heads, a.intermediate
    nBSH = nvec(bs=H)
    pre = f"transformer.h.{i}."
    tr = st.training
    h = layer_norm(sim, x, M.p(pre + "ln_1.weight", H), M.p(pre + "ln_1.bias", H), st, nBSH)
    qkv = M.linear(h, M.p(pre + "attn.c_attn.weight", H * 3 * H), nvec(bs=3 * H),
                   bias=M.p(pre + "attn.c_attn.bias", 3 * H))
    # split -> (q, k, v) views; each .view().transpose(1, 2)
    parts = _split(sim, qkv, 3)
    kv_ = ops.view(sim, parts[1])
    k = ops.transpose(sim, kv_)
    vv = ops.reshape_view(sim, parts[2])
    v = ops.transpose(sim, vv)
    qv = ops.reshape_view(sim, parts[0])
    q = ops.transpose(sim, qv)
    sim.drop(kv_, vv, qv, *parts)
    if st.attn == "eager":
        ao = _gpt2_eager(sim, q, k, v, a, st, mask)
    elif st.device != "cpu":
        ao = sdpa_fused(sim, q, k, v, nh, cs)
    elif a.attn_dropout > 0 and tr:
        ao = math_sdpa(sim, q, k, v, nh, cs, a.attn_dropout, tr, causal=True)
    else:
        ao, lse = sdpa_flash(sim, q, k, v, sz(nBSH, cs), sz(nvec(bs=nh), F32))
        sim.drop(lse)
    at = ops.transpose(sim, ao)
    sim.drop(ao)
    ac = sim.op("clone", [at], [sz(nBSH, cs)], rule=_clone_bwd)[0] if st.attn == "eager" or (
        a.attn_dropout > 0 and tr and st.device == "cpu") else ops.reshape_view(sim, at)
    sim.drop(at)
    o = M.linear(ac, M.p(pre + "attn.c_proj.weight", H * H), nBSH, bias=M.p(pre + "attn.c_proj.bias", H), x_es=cs)
    sim.drop(ac)
    od = M.dropout(o, a.resid_dropout, cs)
    if od is not o:
        sim.drop(o)
    sim.drop(q, k, v, qkv)
    h1 = ops.add(sim, od, x, out_size=sz(nBSH, max(es, cs)))
    sim.drop(h)
    h2 = layer_norm(sim, h1, M.p(pre + "ln_2.weight", H), M.p(pre + "ln_2.bias", H), st, nBSH)
    f = M.linear(h2, M.p(pre + "mlp.c_fc.weight", H * I), nvec(bs=I), bias=M.p(pre + "mlp.c_fc.bias", I))
    fa = act_fn(sim, a.act, f)
    sim.drop(f)
    f2 = M.linear(fa, M.p(pre + "mlp.c_proj.weight", I * H), nBSH, bias=M.p(pre + "mlp.c_proj.bias", H), x_es=cs)
    sim.drop(fa)
    fd = M.dropout(f2, a.resid_dropout, cs)
    if fd is not f2:
        sim.drop(f2)
    sim.drop(h2)
    out = ops.add(sim, h1, fd, out_size=sz(nBSH, max(es, cs)))
    sim.drop(od, fd, h1)
    return out


def _split(sim: Sim, x: Var, k: int) -> list[Var]:
    """``x.split(size, dim=-1)`` into ``k`` views sharing one backward node (``cat`` of the gradients)."""
    outs = []
    node = None
    if x.rg and sim.grad_enabled:
        node = sim._node("split", _split_bwd, [x], k, (x.size,))
    for i in range(k):
        o = Var(x.st, tuple(s // k for s in x.size))
        sim.incref(x.st)
        if sim.recomp is not None:
            sim.recomp["vars"].add(id(o))
            sim.recomp["objs"].append(o)
        if node is not None:
            o.node, o.idx, o.rg = node, i, True
        outs.append(o)
    return outs


def _gpt2_eager(sim: Sim, q: Var, k: Var, v: Var, a: Arch, st: Setting, mask: Var | None) -> Var:
    """GPT-2's ``eager_attention_forward``: ``q @ k^T`` on contiguous copies, ``* scaling``, ``+ mask``,
    softmax (in the activations' dtype), dropout, ``@ v`` (on a contiguous copy)."""
    cs = st.cs
    scores = sz(nvec(bss=a.heads), cs)
    qc = sim.op("clone", [q], [q.size], rule=_clone_bwd)[0]
    kt = ops.transpose(sim, k)
    kc = sim.op("clone", [kt], [k.size], rule=_clone_bwd)[0]
    sim.drop(kt)
    s0 = sim.op("bmm", [qc, kc], [scores], save=_bmm_save(qc, kc), rule=_bmm_bwd, ctx=(qc.size, kc.size))[0]
    sim.drop(qc, kc)
    s1 = ops.scale(sim, s0)
    sim.drop(s0)
    if mask is not None:
        s2 = ops.add(sim, s1, mask, out_size=scores)
        sim.drop(s1)
        s1 = s2
    sm = sim.op("softmax", [s1], [scores], save=["out0"], rule=_softmax_bwd, ctx=(scores,))[0]
    sim.drop(s1)
    attn = ops.dropout(sim, sm, a.attn_dropout, st.training, st.device, cs)
    if attn is not sm:
        sim.drop(sm)
    vc = sim.op("clone", [v], [v.size], rule=_clone_bwd)[0]
    out = sim.op("bmm", [attn, vc], [q.size], save=_bmm_save(attn, vc), rule=_bmm_bwd, ctx=(attn.size, vc.size))[0]
    sim.drop(attn, vc)
    return out


def gpt2_forward(sim: Sim, M: Model, ids: Var, labels: Var):
    """``GPT2LMHeadModel.forward`` with labels."""
    a, st = M.a, M.st
    es = st.es
    H, V = a.hidden, a.vocab
    nBSH = nvec(bs=H)
    wte = M.p("transformer.wte.weight", V * H)
    wpe = M.p("transformer.wpe.weight", a.n_positions * H)
    x = ops.embedding(sim, wte, ids, sz(nBSH, es))
    if st.gc:
        sim.make_leaf(x)
    pos0 = sim.const(vec(s=I64))
    pos = sim.const(vec(s=I64))
    sim.drop(pos0)
    pe = ops.embedding(sim, wpe, pos, vec(s=H * es))
    h0 = ops.add(sim, x, pe, out_size=sz(nBSH, es))
    if st.attn == "eager":
        mask = _eager_mask(sim, st)
    else:
        mask = None
        sim.tmp(vec(bs=BOOL), vec(I64), vec(BOOL))
    h = M.dropout(h0, a.embd_dropout)
    if h is not h0:
        sim.drop(h0)
    for i in range(a.layers):
        if st.gc:
            nh_ = sim.checkpoint(lambda s, hh, m, _p, i=i: gpt2_block(s, hh, i, M, m), h, mask, pos)
        else:
            nh_ = gpt2_block(sim, h, i, M, mask)
        sim.drop(h)
        h = nh_
    hn = layer_norm(sim, h, M.p("transformer.ln_f.weight", H), M.p("transformer.ln_f.bias", H), st, nBSH)
    sim.drop(h, x, pe, pos, mask)
    w_head = wte if a.tied else M.p("lm_head.weight", V * H)
    logits = M.linear(hn, w_head, nvec(bs=V))
    loss = causal_lm_loss(sim, logits, labels, V)
    sim.drop(hn)
    return loss, [_outputs_fp32(sim, M, logits)]


# ------------------------------------------------------------------------------------------------- T5
def _replay(sim: Sim, events) -> dict:
    """Allocate/free untracked (no-grad) tensors in order: ``("A", name, size)`` / ``("F", name)``.
    Returns the still-live tensors by name."""
    live: dict = {}
    for ev in events:
        if ev[0] == "A":
            live[ev[1]] = sim.const(ev[2])
        else:
            sim.drop(live.pop(ev[1]))
    return live


def t5_bucket_events(bidirectional: bool):
    """``T5Attention._relative_position_bucket`` and its ``arange``s, op by op (int64/fp32/bool (S, S)
    tensors; ``buckets`` stays: the embedding saves it)."""
    S8, SS8, SS4, SS1 = vec(s=I64), vec(ss=I64), vec(ss=F32), vec(ss=BOOL)
    head = [("A", "ar0", S8), ("A", "ctx", S8), ("F", "ar0"), ("A", "mem", S8), ("A", "rel", SS8)]
    if bidirectional:
        mid = [("A", "gt", SS1), ("A", "gtl", SS8), ("F", "gt"), ("A", "gtm", SS8), ("F", "gtl"),
               ("A", "buckets", SS8), ("F", "gtm"), ("A", "abs", SS8)]
        src = "abs"
    else:
        mid = [("A", "z", SS8), ("A", "min", SS8), ("F", "z"), ("A", "abs", SS8), ("F", "min")]
        src = "abs"
    small = [("A", "lt", SS1), ("A", "f", SS4), ("A", "d", SS4), ("F", "f"), ("A", "lg", SS4), ("F", "d"),
             ("A", "d2", SS4), ("F", "lg"), ("A", "m", SS4), ("F", "d2"), ("A", "l", SS8), ("F", "m"),
             ("A", "large", SS8), ("F", "l"), ("A", "full", SS8), ("A", "large2", SS8), ("F", "full"),
             ("F", "large"), ("A", "where", SS8)]
    if bidirectional:
        tail = [("F", "where"), ("F", src), ("F", "lt"), ("F", "large2")]
    else:
        tail = [("A", "buckets", SS8), ("F", "where"), ("F", src), ("F", "lt"), ("F", "large2")]
    return head + mid + small + tail


def t5_position_bias(sim: Sim, M: Model, stack: str, bidirectional: bool) -> Var:
    """``compute_bias``: the bucket tensor (kept: the embedding saves it), the (S, S, heads) embedding
    of the relative-attention-bias table, viewed as (1, heads, S, S)."""
    a, st = M.a, M.st
    live = _replay(sim, t5_bucket_events(bidirectional))
    w = M.p(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", a.rel_buckets * a.heads)
    buckets = live.pop("buckets")
    pb = ops.embedding(sim, w, buckets, vec(ss=a.heads * st.es))
    for name in ("ctx", "mem", "rel"):
        sim.drop(live.pop(name))
    sim.drop(buckets)
    out = ops.view(sim, pb)
    sim.drop(pb)
    return out


def t5_layernorm(sim: Sim, x: Var, w: Var, st: Setting, n, nrow) -> Var:
    """``T5LayerNorm``: variance in fp32; ``x * rsqrt(var + eps)`` (fp32 when ``x`` is not), cast back to
    the weight's dtype, scaled by the weight."""
    es = st.es
    if es != F32:
        h32 = ops.to_copy(sim, x, sz(n, F32))
        p = ops.pow_(sim, h32)
        sim.drop(h32)
    else:
        p = ops.pow_(sim, x)
    var = ops.mean_last(sim, p, sz(nrow, F32))
    sim.drop(p)
    t = ops.add_scalar(sim, var)
    r = ops.rsqrt(sim, t)
    sim.drop(t)
    y = ops.mul(sim, x, r, out_size=sz(n, F32))
    sim.drop(r)
    if es != F32:
        y2 = ops.to_copy(sim, y, sz(n, es))
        sim.drop(y)
        y = y2
    out = ops.mul(sim, w, y, out_size=sz(n, es))
    sim.drop(y, var)
    return out


def _where_bwd(sim, node, gouts):
    (size,) = node.ctx
    sim.tmp(vec(4))
    return [G(sim.alloc(size))]


def t5_attention(sim: Sim, M: Model, pre: str, h: Var, kv_src: Var, pb: Var | None, kind: str,
                 cache: list | None, amask: Var | None = None) -> tuple[Var, Var]:
    """``T5Attention`` with SDPA (the math path: dropout and a float mask). ``kind``: ``enc`` (self,
    bidirectional), ``dec`` (self, causal), ``cross``. Returns ``(output, position_bias)``."""
    a, st = M.a, M.st
    es, cs = st.es, st.cs
    H, nh, dk = a.hidden, a.heads, a.head_dim
    inner = nh * dk
    nI = nvec(bs=inner)
    q0 = M.linear(h, M.p(pre + "q.weight", inner * H), nI)
    qv = ops.reshape_view(sim, q0)
    q = ops.transpose(sim, qv)
    k0 = M.linear(kv_src, M.p(pre + "k.weight", inner * H), nI)
    kv_ = ops.view(sim, k0)
    k = ops.transpose(sim, kv_)
    v0 = M.linear(kv_src, M.p(pre + "v.weight", inner * H), nI)
    vv = ops.reshape_view(sim, v0)
    v = ops.transpose(sim, vv)
    sim.drop(qv, kv_, vv)
    cached = cache is not None
    if cached:
        kc = sim.op("cat", [k], [k.size], rule=bwd_pass)[0]
        vc = sim.op("cat", [v], [v.size], rule=bwd_pass)[0]
        sim.drop(k, k0, v, v0)
        cache.extend((kc, vc))  # the DynamicCache holds both copies until the model output is dropped
        k, v = kc, vc
    if pb is None:
        if kind == "cross":
            # zeros; T5Attention makes them require grad under gradient checkpointing
            pb = sim.leaf(vec(ss=nh * cs)) if st.gc else sim.const(vec(ss=nh * cs))
        else:
            pb = t5_position_bias(sim, M, pre.split(".")[0], bidirectional=kind == "enc")
    if st.attn == "eager":
        ao = _t5_eager(sim, q, k, v, pb, amask if kind == "dec" else None, a, st, cached)
        return _t5_attn_out(sim, M, pre, ao, q, q0, k, v, k0, v0, cached, nI, H, inner), pb
    # create_position_bias_mask(...).contiguous()
    if kind == "dec":
        ar = [sim.const(vec(s=I64)), sim.const(vec(s=I64))]
        cond = sim.const(vec(ss=BOOL))
        sim.drop(*ar)
        sim.tmp(vec(4))
        w = sim.op("where", [pb], [pb.size], save=[cond], rule=_where_bwd, ctx=(pb.size,))[0]
        sim.drop(cond)
        mask = sim.op("clone", [w], [w.size], rule=_clone_bwd)[0]
        sim.drop(w)
    elif kind == "enc":
        mask = sim.op("clone", [pb], [pb.size], rule=_clone_bwd)[0]
    else:
        mask = pb
    mask_c = mask
    if st.autocast and mask.size != vec(ss=nh * cs):  # autocast casts SDPA's float mask too
        mask_c = ops.to_copy(sim, mask, vec(ss=nh * cs))
    if st.device != "cpu":
        ao = sdpa_fused(sim, q, k, v, nh, cs, mask=mask_c)
    else:
        # the cache holds contiguous copies of k and v: k^T and v need no copy for bmm then
        ao = math_sdpa(sim, q, k, v, nh, cs, a.attn_dropout, st.training, causal=False, mask=mask_c,
                       k_copy=not cached, v_copy=not cached)
    if mask_c is not mask:
        sim.drop(mask_c)
    if mask is not pb:
        sim.drop(mask)
    return _t5_attn_out(sim, M, pre, ao, q, q0, k, v, k0, v0, cached, nI, H, inner), pb


def _t5_attn_out(sim: Sim, M: Model, pre: str, ao: Var, q, q0, k, v, k0, v0, cached: bool, nI, H: int,
                 inner: int) -> Var:
    """``attn_output.transpose(1, 2).contiguous()`` (a copy), the output projection, the locals let go."""
    cs = M.st.cs
    at = ops.transpose(sim, ao)
    sim.drop(ao)
    ac = sim.op("clone", [at], [sz(nI, cs)], rule=_clone_bwd)[0]
    sim.drop(at)
    o = M.linear(ac, M.p(pre + "o.weight", H * inner), nvec(bs=H), x_es=cs)
    sim.drop(ac, q, q0)
    if not cached:
        sim.drop(k, v, k0, v0)
    return o


def _t5_eager(sim: Sim, q: Var, k: Var, v: Var, pb: Var, amask: Var | None, a: Arch, st: Setting,
              cached: bool) -> Var:
    """T5's ``eager_attention_forward``: ``q @ k^T`` on contiguous copies (none for the decoder cache's
    k and v), ``* scaling`` (a new tensor even at 1.0), ``+ position_bias``, ``+ attention_mask`` (the
    decoder's causal mask), softmax, dropout, ``@ v``."""
    cs = st.cs
    scores = sz(nvec(bss=a.heads), cs)
    qc = sim.op("clone", [q], [q.size], rule=_clone_bwd)[0]
    kt = ops.transpose(sim, k)
    kc = kt if cached else sim.op("clone", [kt], [k.size], rule=_clone_bwd)[0]
    s0 = sim.op("bmm", [qc, kc], [scores], save=_bmm_save(qc, kc), rule=_bmm_bwd, ctx=(qc.size, kc.size))[0]
    sim.drop(qc)
    if kc is not kt:
        sim.drop(kc)
    sim.drop(kt)
    s1 = ops.scale(sim, s0)
    sim.drop(s0)
    s2 = ops.add(sim, s1, pb, out_size=scores)
    sim.drop(s1)
    if amask is not None:
        s3 = ops.add(sim, s2, amask, out_size=scores)
        sim.drop(s2)
        s2 = s3
    sm = sim.op("softmax", [s2], [scores], save=["out0"], rule=_softmax_bwd, ctx=(scores,))[0]
    sim.drop(s2)
    attn = ops.dropout(sim, sm, a.attn_dropout, st.training, st.device, cs)
    if attn is not sm:
        sim.drop(sm)
    vc = v if cached else sim.op("clone", [v], [v.size], rule=_clone_bwd)[0]
    out = sim.op("bmm", [attn, vc], [q.size], save=_bmm_save(attn, vc), rule=_bmm_bwd, ctx=(attn.size, vc.size))[0]
    sim.drop(attn)
    if vc is not v:
        sim.drop(vc)
    return out


def _t5_wo(sim: Sim, M: Model, x: Var, w: Var, n) -> Var:
    """``T5DenseGatedActDense`` / ``T5DenseActDense``: a hidden state whose dtype differs from ``wo``'s
    weight (16-bit under autocast, fp32 weight) is cast to the weight's dtype first (the 16-bit one is let
    go); autocast then casts it back for the matmul. Consumes ``x``."""
    st = M.st
    if st.autocast:
        x32 = ops.to_copy(sim, x, tuple(v // st.autocast * st.es for v in x.size))
        sim.drop(x)
        out = M.linear(x32, w, n, x_es=st.es)
        sim.drop(x32)
        return out
    out = M.linear(x, w, n, x_es=st.cs)
    sim.drop(x)
    return out


def t5_ff(sim: Sim, M: Model, pre: str, x: Var) -> Var:
    a, st = M.a, M.st
    es, cs = st.es, st.cs
    H, I = a.hidden, a.intermediate
    nBSH = nvec(bs=H)
    h = t5_layernorm(sim, x, M.p(pre + "layer_norm.weight", H), st, nBSH, nvec(bs=1))
    d = pre + "DenseReluDense."
    if a.gated_mlp:
        g0 = M.linear(h, M.p(d + "wi_0.weight", I * H), nvec(bs=I))
        g = act_fn(sim, a.act, g0)
        sim.drop(g0)
        lin = M.linear(h, M.p(d + "wi_1.weight", I * H), nvec(bs=I))
        m = ops.mul(sim, g, lin)
        md = M.dropout(m, a.resid_dropout, cs)
        if md is not m:
            sim.drop(m)
        f = _t5_wo(sim, M, md, M.p(d + "wo.weight", H * I), nBSH)
        sim.drop(md, g, lin)
    else:
        w0 = M.linear(h, M.p(d + "wi.weight", I * H), nvec(bs=I))
        g = act_fn(sim, a.act, w0)
        sim.drop(w0)
        gd = M.dropout(g, a.resid_dropout, cs)
        if gd is not g:
            sim.drop(g)
        f = _t5_wo(sim, M, gd, M.p(d + "wo.weight", H * I), nBSH)
        sim.drop(gd)
    sim.drop(h)
    fd = M.dropout(f, a.resid_dropout, cs)
    out = ops.add(sim, x, fd, out_size=sz(nBSH, max(es, cs)))
    sim.drop(fd)
    if fd is not f:
        sim.drop(f)
    return out


def t5_sublayer_attn(sim: Sim, M: Model, pre: str, x: Var, kv_src: Var | None, pb, kind: str, cache,
                     amask: Var | None = None):
    a, st = M.a, M.st
    H = a.hidden
    nBSH = nvec(bs=H)
    h = t5_layernorm(sim, x, M.p(pre + "layer_norm.weight", H), st, nBSH, nvec(bs=1))
    att = "EncDecAttention." if kind == "cross" else "SelfAttention."
    o, pb = t5_attention(sim, M, pre + att, h, kv_src if kv_src is not None else h, pb, kind, cache, amask)
    od = M.dropout(o, a.resid_dropout, st.cs)
    out = ops.add(sim, x, od, out_size=sz(nBSH, max(st.es, st.cs)))
    sim.drop(od, h)
    if od is not o:
        sim.drop(o)
    return out, pb


def t5_block(sim: Sim, M: Model, stack: str, i: int, x: Var, pb, enc: Var | None, cpb, cache, amask=None):
    pre = f"{stack}.block.{i}.layer."
    h, pb = t5_sublayer_attn(sim, M, pre + "0.", x, None, pb, "dec" if enc is not None else "enc", cache, amask)
    if enc is not None:
        h2, cpb = t5_sublayer_attn(sim, M, pre + "1.", h, enc, cpb, "cross", cache)
        sim.drop(h)
        h = h2
    out = t5_ff(sim, M, pre + ("2." if enc is not None else "1."), h)
    sim.drop(h)
    return out, pb, cpb


def t5_stack(sim: Sim, M: Model, stack: str, ids: Var, enc: Var | None, cache: list | None) -> Var:
    a, st = M.a, M.st
    H = a.hidden
    nBSH = nvec(bs=H)
    x = ops.embedding(sim, M.p("shared.weight", a.vocab * H), ids, sz(nBSH, st.es))
    if st.gc:
        sim.make_leaf(x)
    sim.tmp(vec(bs=BOOL), vec(BOOL))
    amask = None
    if enc is not None and st.attn == "eager":  # the decoder's causal mask, a (B, 1, S, S) float tensor
        le = sim.const(vec(ss=BOOL))
        sim.tmp(vec(4), vec(4))
        amask = sim.const(vec(bss=st.es))
        sim.drop(le)
    h = M.dropout(x, a.embd_dropout)
    pb = cpb = None
    n = a.layers if enc is None else a.decoder_layers
    for i in range(n):
        if st.gc:
            res = sim.checkpoint(lambda s, hh, am, p1, e, p2, i=i: _t5_block_gc(s, M, stack, i, hh, p1, e, p2, am),
                                 h, amask, pb, enc, cpb)
            nh_, pb2, cpb2 = res
        else:
            nh_, pb2, cpb2 = t5_block(sim, M, stack, i, h, pb, enc, cpb, cache, amask)
        if h is not x:
            sim.drop(h)
        h = nh_
        pb, cpb = pb2, cpb2
    hn = t5_layernorm(sim, h, M.p(f"{stack}.final_layer_norm.weight", H), st, nBSH, nvec(bs=1))
    sim.drop(h)
    out = M.dropout(hn, a.embd_dropout)
    if out is not hn:
        sim.drop(hn)
    sim.drop(x, pb, cpb, amask)
    return out


def _t5_block_gc(sim, M, stack, i, h, pb, enc, cpb, amask=None):
    return t5_block(sim, M, stack, i, h, pb, enc, cpb, None, amask)


def t5_forward(sim: Sim, M: Model, ids: Var, labels: Var):
    """``T5ForConditionalGeneration.forward`` with labels (decoder inputs shifted from the labels;
    ``CrossEntropyLoss`` with mean reduction on the logits as they are)."""
    a, st = M.a, M.st
    H, V = a.hidden, a.vocab
    cache: list | None = None if st.gc else []
    enc = t5_stack(sim, M, "encoder", ids, None, None)
    dec_ids = sim.const(vec(bs=I64))
    sim.tmp(vec(bs=I64, b=-I64))
    sim.tmp(vec(I64))
    sim.tmp(vec(bs=BOOL))
    dec = t5_stack(sim, M, "decoder", dec_ids, enc, cache)
    if a.scale_decoder_outputs:
        scaled = ops.scale(sim, dec)
        sim.drop(dec)
        dec = scaled
    w_head = M.p("shared.weight", V * H) if a.tied else M.p("lm_head.weight", V * H)
    logits = M.linear(dec, w_head, nvec(bs=V), x_es=st.cs if a.scale_decoder_outputs and st.autocast else None)
    lv = ops.view(sim, logits)
    if st.autocast:  # cross_entropy runs in fp32 under autocast: the logits are cast first
        lv2 = ops.to_copy(sim, lv, sz(nvec(bs=V), F32))
        sim.drop(lv)
        lv = lv2
    lsm = sim.op("log_softmax", [lv], [lv.size], save=["out0"], rule=_softmax_bwd, ctx=(lv.size,))[0]
    sim.drop(lv)
    loss, tw = sim.op("nll_loss", [lsm, labels], [vec(F32), vec(F32)], save=[labels, "out1"], rule=_nll_bwd,
                      ctx=(lsm.size,))
    sim.drop(lsm, tw, dec, dec_ids)
    # the output holds the encoder's last hidden state and the cache (a k and v copy per decoder attention)
    # until it is dropped
    return loss, [_outputs_fp32(sim, M, logits), enc, *(cache or [])]
