"""The harness's data for ``--task image-text-to-text``: seeded samples of :mod:`optimem.estimators.trace.images`
(the batch builder the tracer uses too), stored once, and its collator (each key's samples concatenated)."""
from __future__ import annotations

import torch

from optimem.estimators.trace.images import ImageSpec, collate, sample, spec_for


class ImageTextSamples(torch.utils.data.Dataset):
    """``n`` samples of ``seq`` text tokens and ``spec.images`` images each, made at construction (seeds ``seed``,
    ``seed + 1``, ...); an item is the stored sample itself (fetching allocates nothing)."""

    def __init__(self, spec: ImageSpec, n: int, seq: int, seed: int):
        self.items = [sample(spec, seq, seed + i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def image_text_data(cfg, n: int) -> tuple[ImageTextSamples, object]:
    """The dataset and collator of a run of ``cfg`` (a RunConfig of task image-text-to-text): the image spec is the
    estimator's (:func:`~optimem.estimators.trace.images.spec_for`: tokens per image counted on trace tensors)."""
    spec = spec_for(cfg.source, cfg.task, cfg.image_size, cfg.images_per_sample)
    return ImageTextSamples(spec, n, cfg.seq_len, cfg.seed), collate


__all__ = ["ImageTextSamples", "image_text_data"]
