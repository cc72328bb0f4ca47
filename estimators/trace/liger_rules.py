"""Liger kernels on trace tensors: the model patched as the Trainer patches it, the Triton kernels as per-op rules.

``TrainingArguments(use_liger_kernel=True)`` makes the Trainer call ``liger_kernel.transformers.
_apply_liger_kernel_to_instance(model=model, **liger_kernel_config)`` (``transformers/integrations/liger.py``).
:func:`patch` does the same on the traced model (the module-level swaps it makes -- ``apply_rotary_pos_emb``,
the RMSNorm / MLP classes -- are taken back at once and put in place only while a step is traced:
:func:`active`). Triton cannot run here (no GPU, and trace tensors have no device memory), so the four autograd
functions the patched Llama-family model calls run as rules that allocate and save what liger-kernel's own source
(``liger_kernel/ops/*.py``) does -- a rule from source, not a measurement:

* ``LigerRMSNormFunction``: forward allocates ``Y`` (the input's dtype) and an fp32 ``RSTD`` per row and saves
  ``X``, ``W``, ``RSTD``; backward writes ``dX`` into ``dY`` (``in_place=True``, the default), allocates the
  per-SM fp32 partial sums ``_dW`` (``SM_COUNT x hidden``) and sums them into ``dW`` in ``W``'s dtype.
* ``LigerSiLUMulFunction``: forward allocates ``c`` and saves ``a``, ``b``; backward writes ``da``, ``db`` into
  ``a``, ``b`` (nothing new).
* ``LigerRopeFunction``: rotates ``q``, ``k`` in place (saves ``cos``, ``sin``); backward makes ``dq``, ``dk``
  contiguous in the (batch, seq, heads, dim) layout (copies) and rotates them in place.
* ``LigerFusedLinearCrossEntropyFunction``: never materialises the logits. Forward allocates ``grad_input`` (the
  hidden states' shape and dtype), ``grad_weight`` (the head's shape and dtype: the head's gradient exists from
  the forward on), an fp32 loss per token and one chunk of logits, ``chunk x vocab`` in the hidden states' dtype,
  with ``chunk = min(next_pow2(ceil(BT / ceil(V / H))), BT)`` -- traced at its budget, ``BT x H`` elements, since
  the power-of-two rounding is no polynomial in batch and sequence length (the real chunk is within 2x of it); it saves ``grad_input`` and ``grad_weight``, which
  backward returns (scaled in place when the upstream gradient is not 1).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import sys

import torch
import logging
F32 = torch.float32
SM_COUNT = 132
"""Streaming multiprocessors the RMSNorm backward's partial sums are sized by (an H100 SXM's 132; the real figure
is the GPU's ``multi_processor_count``)."""
OPTIONS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy", "cross_entropy")
"""``liger_kernel_config`` keys optimem reads (the ``apply_liger_kernel_to_<model>`` keywords)."""
MODELLED = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose Liger patch uses only the four functions ruled here."""
_CHUNK_MEM_CONST = 1


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
        X = X.contiguous()
        Y = torch.empty(X.shape, dtype=X.dtype, device=X.device)
        rstd_dtype = F32 if str(getattr(casting_mode, "value", casting_mode)) in ("llama", "gemma", "0", "1") \
            else X.dtype
        RSTD = torch.empty((X.numel() // X.shape[-1],), dtype=rstd_dtype, device=X.device)
        ctx.in_place = in_place
        ctx.save_for_backward(X, W, RSTD)
        return Y

    @staticmethod
    def backward(ctx, dY):
        X, W, _ = ctx.saved_tensors
        dY = dY.contiguous()
        dW = None
        if ctx.needs_input_grad[1]:
            partial = torch.empty((SM_COUNT, X.shape[-1]), dtype=F32, device=X.device)
            dX = dY if ctx.in_place else torch.zeros_like(dY)
            dW = partial.sum(dim=0).to(W.dtype)
            del partial
        else:
            dX = dY if ctx.in_place else torch.zeros_like(dY)
        return dX, dW, None, None, None, None, None


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, gate_multiplier=1.0, down_multiplier=1.0):
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc.contiguous()
        return a, b, None, None  # da, db written over a, b


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # no copy for HF's views
        ctx.save_for_backward(cos.contiguous(), sin.contiguous())
        return q.transpose(1, 2), k.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk):
        dq, dk = dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous()
        return dq.transpose(1, 2), dk.transpose(1, 2), None, None, None, None, None


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args, **kwargs):
        bound = _SIGNATURES["flce"].bind(ctx, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        x, w = a["_input"], a["weight"]
        ctx.n_inputs = len(a) - 1
        BT, H = x.shape
        budget = int(a.get("chunk_mem_const") or _CHUNK_MEM_CONST)
        grad_input = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        grad_weight = torch.zeros(w.shape, dtype=a.get("accum_dtype") or w.dtype, device=w.device) \
            if w.requires_grad else None
        loss_1d = torch.zeros((BT,), dtype=F32, device=x.device)
        # liger's chunk of logits: min(next_pow2(ceil(BT / ceil(V / (C H)))), BT) rows of V, which a trace cannot
        # fit as a polynomial in batch and sequence; held here at its budget, C x BT x H elements (the rounding
        # makes the real chunk between half and twice that, and V rows at least when BT is that small)
        logits = torch.empty((BT * budget, H), dtype=x.dtype, device=x.device)
        del logits
        loss = loss_1d.sum()
        del loss_1d
        ctx.save_for_backward(grad_input, grad_weight)
        return loss, None, None, None

    @staticmethod
    def backward(ctx, grad_output, *_):
        grad_input, grad_weight = ctx.saved_tensors
        return (grad_input, grad_weight) + (None,) * (ctx.n_inputs - 2)


_SIGNATURES: dict[str, inspect.Signature] = {}


def _targets():
    # lazy: pulls in transformers, liger_kernel, which importing this module does not
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    # lazy: pulls in transformers, liger_kernel, which importing this module does not
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    # lazy: pulls in transformers, liger_kernel, which importing this module does not
    from liger_kernel.ops.rope import LigerRopeFunction
    # lazy: pulls in transformers, liger_kernel, which importing this module does not
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return ((LigerRMSNormFunction, _RMSNorm), (LigerSiLUMulFunction, _SiLUMul), (LigerRopeFunction, _Rope),
            (LigerFusedLinearCrossEntropyFunction, _FusedLinearCE))


def options(config: str | None) -> dict:
    """``liger_kernel_config`` as keyword arguments (JSON text; None: liger's defaults)."""
    return json.loads(config) if config else {}


def patch(model: torch.nn.Module, config: str | None) -> dict:
    """Patch ``model`` as the Trainer does (see the module doc); returns the module-level swaps the patch made
    (``{(module name, attribute): value}``), already taken back (:func:`active` puts them in place)."""
    for name in ("liger_kernel", "transformers"):  # backend probes and deprecation notes of the patched forward
        logging.getLogger(name).setLevel(logging.ERROR)
    # lazy: pulls in transformers, liger_kernel, which importing this module does not
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    watched = [sys.modules[type(model).__module__]]
    before = [dict(vars(m)) for m in watched]
    _apply_liger_kernel_to_instance(model=model, **options(config))
    swaps = {}
    for module, old in zip(watched, before):
        for key, value in list(vars(module).items()):
            if old.get(key, None) is not value:
                swaps[(module.__name__, key)] = value
                if key in old:
                    setattr(module, key, old[key])
                else:
                    delattr(module, key)
    return swaps


@contextlib.contextmanager
def active(swaps: dict | None):
    """The module-level swaps of :func:`patch` and the kernel rules, for one traced step."""
    if swaps is None:
        yield
        return
    # lazy: pulls in transformers, liger_kernel, which importing this module does not
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    _SIGNATURES.setdefault("flce", inspect.signature(LigerFusedLinearCrossEntropyFunction.forward))
    saved = []
    for (mod, key), value in swaps.items():
        module = sys.modules[mod]
        saved.append((module, key, vars(module).get(key, _MISSING)))
        setattr(module, key, value)
    kernels = []
    for cls, rule in _targets():
        kernels.append((cls, cls.__dict__["forward"], cls.__dict__["backward"]))
        cls.forward, cls.backward = rule.__dict__["forward"], rule.__dict__["backward"]
    try:
        yield
    finally:
        for cls, fwd, bwd in kernels:
            cls.forward, cls.backward = fwd, bwd
        for module, key, value in saved:
            if value is _MISSING:
                delattr(module, key)
            else:
                setattr(module, key, value)


_MISSING = object()

__all__ = ["MODELLED", "OPTIONS", "SM_COUNT", "active", "options", "patch"]
