"""What a trace depends on besides the config and the shape (plain data: importing it needs no torch)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TraceSetting:
    """Everything a trace depends on besides the config and the shape: parameter ``dtype``, ``mixed``
    precision (``bf16``/``fp16`` autocast or None), ``attn`` implementation asked for, gradient checkpointing
    ``gc``, ``task`` head, ``frozen`` parameter names, ``device`` (``cpu``, or ``cuda`` for CUDA's op rules), ``peft``,
    ``liger``, ``packed``."""

    dtype: str = "fp32"
    mixed: str | None = None
    attn: str = "sdpa"
    gc: bool = False
    task: str | None = None
    frozen: tuple[str, ...] = ()
    device: str = "cpu"
    peft: str | None = None
    liger: str | None = None
    """Liger kernels: the ``liger_kernel_config`` as JSON text (``{}``: liger's defaults); None: not patched."""
    packed: bool = False
    """Padding-free packing: each micro-batch one row of its samples' tokens (``DataCollatorWithFlattening``)."""
    images: tuple[int | None, int] | None = None
    """image-text-to-text: ``(image size in pixels or None for the config's, images per sample)``
    (:mod:`optimem.estimators.trace.images`); None: a text task."""


__all__ = ["TraceSetting"]
