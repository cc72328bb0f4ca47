"""One micro-step of ``Trainer.training_step`` on trace tensors, with its event log.

What runs is the real model's forward (wrapped as accelerate wraps it under ``bf16``/``fp16``: autocast, then
``convert_outputs_to_fp32``), the model's own loss, and the lines of ``Trainer.training_step`` /
``compute_loss`` / ``Accelerator.backward`` that touch tensors: ``num_items_in_batch`` passed to a forward
that takes loss kwargs, ``loss *= 1`` (``average_tokens_across_devices``), ``loss / gradient_accumulation_steps``
when the model does not scale it, accelerate's ``loss / 1``, ``backward()``, ``tr_loss += loss.detach()``.

Markers in the log (see :class:`~optimem.estimators.trace.tensor.Recorder`): the model's forward returning (where the
harness's forward phase ends), each parameter's tensor hook (what LOMO's update hangs on, before the gradient
is accumulated), each parameter's post-accumulate-grad hook (its ``.grad`` storage id: a gradient from then
on; layer-wise optimizers step there) and ``backward()`` returning (LOMO's last ``grad_func``).
"""
from __future__ import annotations

from types import MethodType

import torch

from .cuda_autocast import cuda_autocast
from .cuda_rules import kernels_of
from .events import BWD_END, FWD_END, PRE_ACC  # marker codes; a gradient is ("g", parameter index, storage id)
from .meta_kernels import cpp_meta_kernels
from .model import ModelFacts
from .tensor import Recorder, TraceMode, TraceTensor, from_real, set_recorder


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def wrap_autocast(model: torch.nn.Module, mixed: str | None) -> None:
    """``Accelerator.prepare_model`` under mixed precision: the forward runs in ``torch.autocast`` and its
    16-bit outputs are converted to fp32."""
    if not mixed:
        return
    # lazy: pulls in accelerate, psutil, yaml, which importing this module does not
    from accelerate.utils import convert_outputs_to_fp32

    ctx = torch.autocast(device_type="cpu", dtype=AUTOCAST[mixed])
    model.forward = MethodType(ctx(model.forward.__func__), model)
    model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)


def real_batch(facts: ModelFacts, batch: int, seq: int, task: str | None, seed: int = 0,
               packed: bool = False) -> dict[str, torch.Tensor]:
    """The collated batch the harness's synthetic dataset gives (``input_ids`` random in [3, vocab),
    ``attention_mask`` ones, ``labels`` a copy of the ids, or one class per sample for sequence
    classification), each sample ending with ``facts.closing_token`` when there is one, as real CPU tensors. ``packed``: what ``DataCollatorWithFlattening``
    makes of a micro-batch of ``batch x seq`` tokens -- rows of packed samples, here two per row (the split changes
    values, not sizes: the model's packed-sequence mask is ``seq x seq`` whatever the count), ``position_ids``
    restarting at each sample, each sample's first label -100, no attention mask."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        ids = torch.randint(3, max(facts.vocab_size, 4), (batch, seq), generator=g)
        half = max(seq // 2, 1)
        pos = torch.cat([torch.arange(half), torch.arange(seq - half)]).repeat(batch, 1)
        labels = ids.clone()
        labels[pos == 0] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    ids = torch.randint(3, max(facts.vocab_size, 4), (batch, seq), generator=g)
    if facts.closing_token is not None:
        ids[:, -1] = facts.closing_token
    labels = torch.randint(0, facts.num_labels, (batch,), generator=g) if task == "sequence-classification" \
        else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_batch(facts: ModelFacts, batch: int, seq: int, task: str | None, seed: int = 0,
               packed: bool = False) -> dict[str, TraceTensor]:
    """:func:`real_batch` as trace tensors that keep their values."""
    return {k: from_real(v) for k, v in real_batch(facts, batch, seq, task, seed, packed).items()}


def num_items(facts: ModelFacts, batches: list[dict]) -> TraceTensor | None:
    """``Trainer._get_num_items_in_batch``: label tokens of the step's batches (None when the forward takes no
    loss kwargs)."""
    if not facts.accepts_loss_kwargs:
        return None
    labels = [b["labels"][..., 1:] if facts.shifts_labels else b["labels"] for b in batches]
    n = sum(x.ne(-100).sum() for x in labels)
    return n / 1


class StepHooks:
    """The forward hook and per-parameter hooks that put markers into the recorder."""

    def __init__(self, model: torch.nn.Module, rec: Recorder):
        self.rec = rec
        self.handles = [model.register_forward_hook(lambda m, a, o: rec.mark(FWD_END))]
        self.params: list[tuple[str, torch.nn.Parameter]] = list(model.named_parameters())
        for i, (_, p) in enumerate(self.params):
            if not p.requires_grad:
                continue
            self.handles.append(p.register_hook(lambda g, i=i: rec.mark(PRE_ACC, i)))
            self.handles.append(p.register_post_accumulate_grad_hook(lambda t, i=i: self._grad(i, t)))

    def _grad(self, i: int, p: torch.Tensor) -> None:
        if self.rec.active and p.grad is not None:
            self.rec.events.append(("g", i, self.rec.storage_id(p.grad)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def micro_step(model: torch.nn.Module, facts: ModelFacts, batch: dict, items, grad_accum: int, tr_loss,
               rec: Recorder, device: str = "cpu") -> list[tuple]:
    """Run one micro-step (forward, loss, backward) with ``device``'s kernels (``estimators/trace/cuda_rules``) and,
    for ``cuda``, CUDA's autocast policy (``estimators/trace/cuda_autocast``), and return its event log."""
    old = set_recorder(rec)
    rec.events = []
    rec.active = True
    try:
        with cpp_meta_kernels(), TraceMode(), kernels_of(device), cuda_autocast(device == "cuda"):
            _training_step(model, facts, batch, items, grad_accum, tr_loss, rec)
    finally:
        rec.active = False
        set_recorder(old)
    return rec.events


def _training_step(model, facts: ModelFacts, batch: dict, items, grad_accum: int, tr_loss, rec: Recorder) -> None:
    loss = _compute_loss(model, facts, batch, items)
    if not (facts.accepts_loss_kwargs and items is not None):
        loss = loss / grad_accum
    _accelerate_backward(loss)
    rec.mark(BWD_END)
    step_loss = loss.detach()
    del loss
    tr_loss += step_loss
    del step_loss


def _compute_loss(model, facts: ModelFacts, batch: dict, items):
    inputs = dict(batch)
    if facts.accepts_loss_kwargs and items is not None:
        inputs = {**inputs, "num_items_in_batch": items}
    outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    if facts.accepts_loss_kwargs and items is not None:
        loss *= 1  # average_tokens_across_devices: num_processes // tp_size
    return loss


def _accelerate_backward(loss) -> None:
    loss = loss / 1  # Accelerator.backward: the Trainer's accelerator accumulates over 1 step
    loss.backward()


__all__ = ["AUTOCAST", "BWD_END", "FWD_END", "PRE_ACC", "StepHooks", "make_batch", "real_batch", "micro_step", "num_items",
           "wrap_autocast"]
