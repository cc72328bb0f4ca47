"""The CUDA kernels' allocations, as per-op rules on top of the CPU trace (``device="cuda"`` estimates).

A trace runs on CPU trace tensors (a fake CUDA device aborts a CPU build of torch as soon as SDPA asks for
the GPU's properties), so the few ops whose CUDA kernels allocate differently from their CPU kernels are
swapped, at the ``torch.nn.functional`` level, for what CUDA would run:

* ``scaled_dot_product_attention``: CUDA's fused kernels -- FlashAttention-2 for 16-bit inputs without a mask
  (head size a multiple of 8, at most 256), memory-efficient attention otherwise (masks allowed; not with
  ``enable_gqa``), else the math composite. A fused kernel returns the output and an fp32 logsumexp per query
  row (plus its RNG seed/offset) and saves q, k, v, the output, the logsumexp and the mask; its backward
  allocates dq, dk, dv, and FlashAttention-2 an fp32 dq accumulator. The mem-efficient kernel's padding of
  the logsumexp to 32 rows is left out (at most ``B * heads * 124`` bytes), so sizes stay polynomial.
* ``dropout``: CUDA's fused ``native_dropout`` (the output and a one-byte boolean mask, which is saved)
  instead of CPU's mask in the input's dtype.
* ``native_layer_norm``: mean and rstd in fp32 (the meta function's, CUDA's choice), not CPU's input dtype.
* ``bitsandbytes::gemm_4bit`` (a 4-bit layer's forward matmul): bitsandbytes' CUDA dispatch
  (``backends/cuda/ops.py``) runs its unfused fallback -- the absmax dequantized to fp32 (with double
  quantization: a second fp32 copy plus the offset), the whole weight dequantized into an ``[N, K]`` tensor of
  the input's dtype, then ``F.linear`` -- and holds those transients until the op returns; the CPU kernel is one
  opaque op whose inner tensors a CPU run's accountant never sees. For ``M = batch x seq`` of at most 1536 rows
  some GPUs run a fused kernel instead, which allocates only the output: there the rule is an upper bound of
  the weight's dequantized size.

Under ``--bf16``/``--fp16`` every other op follows CUDA's autocast policy, asked of torch's AutocastCUDA kernels
(``estimators/trace/cuda_autocast.py``); the attention rule above casts its inputs to the lower precision itself
(CUDA's policy for ``scaled_dot_product_attention``), then runs without autocast.

These rules follow the kernels' source; no GPU was available to validate them (see the CUDA terms in
``estimators/cuda_overhead.py`` for what the allocator adds on top).
"""
from __future__ import annotations

import contextlib

import torch

F32 = torch.float32
_ACTIVE = {"device": "cpu"}


def device() -> str:
    """The device whose kernels the trace in progress follows."""
    return _ACTIVE["device"]


class _FusedSDPA(torch.autograd.Function):
    """A fused CUDA attention kernel's allocations (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, flash: bool, dropout: bool):
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=F32, device=q.device)
        seeds = (torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)) if dropout else ()
        ctx.flash = flash
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)), *seeds)
        ctx.mask = mask is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # once: a checkpoint unpacks each saved tensor a single time
        q, k, v = saved[:3]
        if ctx.flash:  # FlashAttention-2's fp32 accumulator for dq
            acc = torch.empty(q.shape, dtype=F32, device=q.device)
            del acc
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dmask = None
        if ctx.mask and ctx.needs_input_grad[3]:  # a learned bias (T5's relative positions): its gradient
            mask = saved[5]
            dmask = torch.empty(mask.shape, dtype=mask.dtype, device=mask.device)
        return dq, dk, dv, dmask, None, None


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if torch.is_autocast_enabled("cpu"):
        # CUDA's autocast runs scaled_dot_product_attention in the lower precision: its floating inputs are cast
        # (CPU's policy, which the trace runs under, would leave them alone), then the kernel runs without autocast
        low = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(low) if t.is_floating_point() else t for t in (q, k, v))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(low)
        with torch.autocast("cpu", enabled=False):
            return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    hd = q.shape[-1]
    same_hd = hd == k.shape[-1] == v.shape[-1]
    low = q.dtype in (torch.float16, torch.bfloat16)
    if low and attn_mask is None and same_hd and hd % 8 == 0 and hd <= 256:
        return _FusedSDPA.apply(q, k, v, None, True, dropout_p > 0)
    gqa = enable_gqa and k.shape[-3] != q.shape[-3]
    if not gqa and same_hd and hd % (8 if low else 4) == 0:
        return _FusedSDPA.apply(q, k, v, attn_mask, False, dropout_p > 0)
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal, None,
                                                             scale=scale, enable_gqa=enable_gqa)[0]


def _dropout(x, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return x
    return torch.native_dropout(x, p, True)[0]


def _gemm_4bit_cuda(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
                    absmax_offset=None):
    """bitsandbytes' CUDA fallback for ``gemm_4bit`` (``_dequant_linear_fallback``): its allocations, each alive
    until the op returns, and the output."""
    held = []  # alive until the op returns, as the fallback's locals are
    if absmax_8bit is not None:
        absmax_dq = torch.empty(absmax_8bit.shape, dtype=F32, device=A.device)
        held += [absmax_dq, absmax_dq + absmax_offset]
    b_dq = torch.empty(tuple(shapeB), dtype=A.dtype, device=A.device)
    return torch.nn.functional.linear(A, b_dq, bias)


class _OpPacket:
    """Stands in for ``torch.ops.bitsandbytes.<op>`` (its ``.default`` overload is ``fn``)."""

    def __init__(self, fn):
        self.default = fn

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)


@contextlib.contextmanager
def _bnb_ops_of(dev: str):
    import sys

    if dev != "cuda" or "bitsandbytes" not in sys.modules:
        yield
        return
    ns = torch.ops.bitsandbytes
    old = ns.gemm_4bit
    ns.gemm_4bit = _OpPacket(_gemm_4bit_cuda)
    try:
        yield
    finally:
        ns.gemm_4bit = old


@contextlib.contextmanager
def kernels_of(dev: str):
    """Trace with ``dev``'s kernels (``cuda``: the rules above -- ``torch.nn.functional``'s attention and
    dropout are swapped for the block, checkpoint recomputations in the backward included; ``cpu``: the trace
    as it runs)."""
    F = torch.nn.functional
    old = _ACTIVE["device"], F.scaled_dot_product_attention, F.dropout
    _ACTIVE["device"] = dev
    if dev == "cuda":
        F.scaled_dot_product_attention, F.dropout = _sdpa, _dropout
    try:
        with _bnb_ops_of(dev):
            yield
    finally:
        _ACTIVE["device"], F.scaled_dot_product_attention, F.dropout = old


__all__ = ["device", "kernels_of"]
