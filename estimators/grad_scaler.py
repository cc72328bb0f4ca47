"""fp16's ``torch.amp.GradScaler("cuda")`` in a CUDA training step: what it allocates, as a rule read from source.

Under ``TrainingArguments(fp16=True)`` on CUDA, accelerate's ``Accelerator`` holds a ``GradScaler`` and the step
runs (accelerate ``Accelerator.backward`` / ``clip_grad_norm_``, torch 2.13 ``torch/amp/grad_scaler.py``):

* ``scaler.scale(loss).backward()``: the first ``scale`` creates ``_scale`` (``torch.full((), 65536.0)``, fp32)
  and ``_growth_tracker`` (``torch.full((), 0)``, int32), kept for the run; ``loss * _scale`` is a new 1-element
  fp32 tensor alive until ``backward()`` returns, and backward's root gradient (``ones_like`` of it) meets
  ``MulBackward0``'s output (the loss's gradient) -- one more 4-byte tensor for a moment;
* after the last micro-step's backward, the Trainer's ``max_grad_norm`` (1.0 by default) clips through
  ``Accelerator.clip_grad_norm_``, which calls ``unscale_``: ``inv_scale = _scale.double().reciprocal().float()``
  (8, 8 then 4 bytes, the double freed once the reciprocal exists, ``inv_scale`` freed when ``unscale_``
  returns) and ``found_inf = torch.full((), 0.0)`` (4 bytes, kept in the scaler's per-optimizer state);
  ``torch._amp_foreach_non_finite_check_and_unscale_`` works in place on each device/dtype list of gradients
  (nothing allocated per parameter or group on the Python side);
* ``optimizer.step()`` (``AcceleratedOptimizer``): ``scaler.step`` (``found_inf.item()``), ``scaler.update``
  (``torch._amp_update_scale_`` in place, then the per-optimizer state is reset: ``found_inf`` freed).

Left out: ``clip_grad_norm_``'s own norms (not modelled under any precision), the fused-optimizer path of
``scaler.step`` (``_step_supports_amp_scaling``), ``ShardedGradScaler`` (FSDP) and DeepSpeed's loss scaler.
Every size is bytes; on the device each tensor takes one 512-byte block of the caching allocator.
"""
from __future__ import annotations

from .memsim import Sim, St, vec

SCALE = 4  # _scale: 1-element fp32
GROWTH_TRACKER = 4  # _growth_tracker: 1-element int32
SCALED_LOSS = 4  # loss * _scale: 1-element fp32
FOUND_INF = 4  # found_inf: 1-element fp32
INV_SCALE = (8, 8, 4)  # _scale.double(), .reciprocal(), .float()

NOTE = ("fp16 GradScaler (rule from torch/amp/grad_scaler.py and accelerate, not measured): _scale and "
        "_growth_tracker from the first backward on, the scaled loss in each backward, unscale_'s inv_scale and "
        "found_inf at the clip after the last backward (found_inf kept until scaler.update); gradients unscaled "
        "in place")


def scale_loss(sim: Sim, scaler: list[St]) -> St:
    """``scaler.scale(loss)`` then ``.backward()``'s root gradient: creates ``_scale`` / ``_growth_tracker`` into
    ``scaler`` (the run's persistent scaler tensors) when empty; returns the scaled loss (free it when the backward
    returns)."""
    if not scaler:
        scaler.extend((sim.alloc(vec(SCALE), "other"), sim.alloc(vec(GROWTH_TRACKER), "other")))
    scaled = sim.alloc(vec(SCALED_LOSS), "tmp")
    sim.tmp(vec(SCALED_LOSS))  # ones_like(scaled loss) alongside MulBackward0's output
    return scaled


def unscale(sim: Sim) -> St:
    """``scaler.unscale_(optimizer)``: the ``inv_scale`` chain (transient) and ``found_inf`` (returned: free it at
    ``scaler.update``)."""
    double = sim.alloc(vec(INV_SCALE[0]), "tmp")
    recip = sim.alloc(vec(INV_SCALE[1]), "tmp")
    sim.decref(double)
    inv = sim.alloc(vec(INV_SCALE[2]), "tmp")
    sim.decref(recip)
    found_inf = sim.alloc(vec(FOUND_INF), "other")
    sim.decref(inv)  # after the in-place _amp_foreach_non_finite_check_and_unscale_
    return found_inf


__all__ = ["FOUND_INF", "GROWTH_TRACKER", "INV_SCALE", "NOTE", "SCALE", "SCALED_LOSS", "scale_loss", "unscale"]
