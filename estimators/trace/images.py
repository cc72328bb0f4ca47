"""The batch of an image-text-to-text fine-tune (``--task image-text-to-text``): one builder for the tracer and the
harness's real Trainer run, so that the estimate and the measurement see the same tensors.

A sample is ``images`` images of ``size`` x ``size`` pixels and ``seq`` text tokens: each image's placeholder tokens
(``config.image_token_id`` / ``image_token_index``, repeated as many times as the model's own
``get_image_features`` returns feature rows per image, counted on trace tensors: :func:`image_spec`) followed by
one text token, then the rest of the text. ``labels`` are the ids with every image token masked to -100 (what a
user's collator does); ``attention_mask`` is ones; ``mm_token_type_ids`` / ``token_type_ids`` (1 on image tokens)
are given where the model's forward takes them. The pixels take the form the forward's signature asks for: a
patch-flattened ``(patches, channels * temporal_patch * patch * patch)`` tensor with ``image_grid_thw`` (Qwen2-VL
style), ``(1, images, C, H, W)`` with ``pixel_attention_mask`` (Idefics3 style), else ``(images, C, H, W)`` (with
``image_sizes`` where taken). Every per-sample tensor has a leading dimension and a batch is their concatenation
along it (:func:`collate`): one allocation per key.

Sizes: ``--seq-len`` counts the text tokens; each sample's sequence is ``seq + images * tokens_per_image``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, replace

import torch

from ..errors import UserError, one_line
from ..vision import TASK
from .function_rules import ScalarData
from .model import build_traced_model
from .tensor import TraceMode, TraceTensor, from_real

FIRST_ID = 3
"""Text ids are drawn from here to the vocabulary's end, special token ids left out (as
``harness/run_config.FIRST_SYNTHETIC_ID`` starts the text tasks' ids)."""
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


@dataclass(frozen=True)
class ImageSpec:
    """What the batch builder needs of the model: ``size`` (pixels, square), ``images`` per sample, ``tokens`` per
    image, the image token id, the pixel ``form`` (``flat``, ``nested`` or ``plain``), channels, patch sizes, the
    forward's extra keys (``extra``), the text vocabulary and the special token ids no text token may take."""

    size: int
    images: int
    tokens: int
    image_token: int
    form: str
    channels: int
    patch: int
    temporal: int
    extra: tuple[str, ...]
    vocab: int
    specials: tuple[int, ...] = ()


def _configs(config) -> list:
    """``config`` and its sub-configs (``sub_configs``: ``vision_config``, ``vlm_config``, ``encoder``...),
    breadth first."""
    out, todo = [], [config]
    while todo:
        c = todo.pop(0)
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo += [getattr(c, k, None) for k in (getattr(c, "sub_configs", None) or {})]
    return out


def vision_config(config):
    """The first (sub-)config, breadth first, that names an ``image_size`` or a ``patch_size`` (PI0's is inside its
    ``vlm_config``, T5Gemma2's inside its ``encoder``)."""
    return next((c for c in _configs(config)[1:] + [config]
                 if _size_of(getattr(c, "image_size", None)) or _size_of(getattr(c, "patch_size", None))), None)


def _size_of(v) -> int | None:
    if isinstance(v, (list, tuple)) and v:
        v = v[0]
    if isinstance(v, dict):
        v = v.get("height") or v.get("shortest_edge")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def default_image_size(config) -> int | None:
    """The vision config's ``image_size`` (the size its position embeddings were made for); a vision config without
    one (Qwen2-VL style: any multiple of the patch grid) gets the smallest image its patch merger takes, ``patch_size
    * spatial_merge_size * 2`` pixels (2 x 2 merged tokens). None: the config names neither."""
    vc = vision_config(config)
    size = _size_of(getattr(vc, "image_size", None))
    if size:
        return size
    patch = _size_of(getattr(vc, "patch_size", None))
    if patch:
        return patch * (getattr(vc, "spatial_merge_size", None) or 1) * 2
    return None


def image_token_id(config) -> int:
    for c in _configs(config):
        for key in IMAGE_TOKEN_KEYS:
            v = getattr(c, key, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    raise UserError(f"{getattr(config, 'model_type', 'this model')}: its config names no image token "
                    f"({' / '.join(IMAGE_TOKEN_KEYS)}): optimem cannot place images in its text")


def _special_ids(config) -> list[int]:
    out = []
    for c in _configs(config):
        for k, v in vars(c).items():
            if (k.endswith("_token_id") or k.endswith("_token_index")) and isinstance(v, int) \
                    and not isinstance(v, bool) and v >= FIRST_ID:
                out.append(v)
    return out


def _vocab(config) -> int:
    """The text vocabulary: the text config's, else the first (sub-)config's that names one."""
    try:
        v = config.get_text_config().vocab_size
    except AttributeError:
        v = None
    if not isinstance(v, int):
        v = next((c.vocab_size for c in _configs(config) if isinstance(getattr(c, "vocab_size", None), int)), 0)
    return int(v)


def _form(forward_params) -> str:
    if "image_grid_thw" in forward_params:
        return "flat"
    if "pixel_attention_mask" in forward_params:
        return "nested"
    return "plain"


def pixel_sample(spec: ImageSpec, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One sample's pixel inputs (see the module docstring), values from ``g``."""
    n, c, s = spec.images, spec.channels, spec.size
    if spec.form == "flat":
        grid = s // spec.patch
        rows = n * grid * grid  # one temporal patch: the image repeated temporal_patch_size times
        dim = c * spec.temporal * spec.patch * spec.patch
        return {"pixel_values": torch.rand(rows, dim, generator=g),
                "image_grid_thw": torch.tensor([[1, grid, grid]] * n, dtype=torch.long)}
    if spec.form == "nested":
        return {"pixel_values": torch.rand(1, n, c, s, s, generator=g),
                "pixel_attention_mask": torch.ones(1, n, s, s, dtype=torch.bool)}
    out = {"pixel_values": torch.rand(n, c, s, s, generator=g)}
    if "image_sizes" in spec.extra:
        out["image_sizes"] = torch.tensor([[s, s]] * n, dtype=torch.long)
    return out


def text_sample(spec: ImageSpec, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One sample's text tensors, ``(1, seq + images * tokens)`` each (see the module docstring)."""
    length = seq + spec.images * spec.tokens
    allowed = torch.arange(FIRST_ID, max(spec.vocab, FIRST_ID + 1))
    allowed = allowed[~torch.isin(allowed, torch.tensor(spec.specials, dtype=torch.long))]
    ids = allowed[torch.randint(0, len(allowed), (1, length), generator=g)]
    image = torch.zeros(1, length, dtype=torch.bool)
    for i in range(spec.images):
        start = i * (spec.tokens + 1)
        image[0, start:start + spec.tokens] = True
    ids[image] = spec.image_token
    labels = ids.clone()
    labels[image] = -100
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in spec.extra:
            out[key] = image.long()
    return out


def sample(spec: ImageSpec, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """One training sample (text and pixels), seeded."""
    g = torch.Generator().manual_seed(seed)
    return {**text_sample(spec, seq, g), **pixel_sample(spec, g)}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The batch: every key's per-sample tensors concatenated along their leading dimension (one allocation each)."""
    return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}


def real_batch(spec: ImageSpec, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The collated batch of ``batch`` samples (seeds ``seed``, ``seed + 1``, ...)."""
    return collate([sample(spec, seq, seed + i) for i in range(batch)])


def layout(spec: ImageSpec) -> tuple[tuple[str, int, int], ...]:
    """Each batch key's bytes per sample as ``(key, constant, per text token)`` (exact: two sequence lengths)."""
    a, b = sample(spec, 8, 0), sample(spec, 9, 0)
    out = []
    for k in a:
        na, nb = (t.numel() * t.element_size() for t in (a[k], b[k]))
        out.append((k, na - 8 * (nb - na), nb - na))
    return tuple(out)


def _features_rows(out) -> int:
    """Feature rows in what ``get_image_features`` returned (a tensor, a list of tensors, or an output object whose
    ``pooler_output`` holds them)."""
    if hasattr(out, "pooler_output") and out.pooler_output is not None:
        out = out.pooler_output
    elif not isinstance(out, (torch.Tensor, list, tuple)) and hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if isinstance(out, (list, tuple)):
        return sum(_features_rows(t) for t in out)
    return out.numel() // out.shape[-1]


def image_spec(model, size: int | None, images: int) -> ImageSpec:
    """The :class:`ImageSpec` of ``model`` (built on trace tensors, or real) for images of ``size`` pixels
    (None: :func:`default_image_size`); the tokens per image are counted by running the model's own
    ``get_image_features`` on one image, under the trace mode when the model is made of trace tensors."""
    config = model.config
    size = size or default_image_size(config)
    if not size:
        raise UserError(f"{config.model_type}: its vision config names no image_size or patch_size: give --image-size")
    vc = vision_config(config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = set(inspect.signature(base.forward).parameters)
    patch = _size_of(getattr(vc, "patch_size", None)) or 1
    spec = ImageSpec(size, images, 0, image_token_id(config), _form(forward),
                     int(getattr(vc, "num_channels", None) or getattr(vc, "in_channels", None) or 3), patch,
                     int(getattr(vc, "temporal_patch_size", None) or 1),
                     tuple(k for k in ("mm_token_type_ids", "token_type_ids", "image_sizes") if k in forward),
                     _vocab(config), tuple(sorted(set(_special_ids(config)))))
    if spec.form == "flat" and size % (patch * (getattr(vc, "spatial_merge_size", None) or 1)):
        raise UserError(f"image size {size} is not a multiple of {config.model_type}'s merged patch "
                        f"({patch} x {getattr(vc, 'spatial_merge_size', 1)} pixels): give such an --image-size")
    get = getattr(base, "get_image_features", None) or getattr(getattr(base, "model", None), "get_image_features",
                                                               None)
    if get is None:
        raise UserError(f"{config.model_type}: the model has no get_image_features to count its image tokens with")
    params = set(inspect.signature(get).parameters)
    traced = isinstance(next(base.parameters()), TraceTensor)
    error = None
    # ``image_sizes`` is optional where the forward takes it (LLaVA's is for Pixtral towers): left out unless the
    # model's own code needs it.
    for extra in ((spec.extra, tuple(k for k in spec.extra if k != "image_sizes")) if "image_sizes" in spec.extra
                  else (spec.extra,))[::-1]:
        trial = replace(spec, images=1, extra=extra)
        one = pixel_sample(trial, torch.Generator().manual_seed(0))
        kwargs = {k: (from_real(v) if traced else v) for k, v in one.items() if k in params or "kwargs" in params}
        try:
            with torch.no_grad(), (TraceMode() if traced else contextlib.nullcontext()), \
                    (ScalarData() if traced else contextlib.nullcontext()):
                rows = _features_rows(get(**kwargs))
            spec = replace(spec, extra=extra)
            break
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own code refused the image: one line
            error = error or exc
    else:
        raise UserError(f"{config.model_type}: get_image_features on one {size} x {size} image fails "
                        f"({one_line(error, 200)}); try another --image-size") from None
    return replace(spec, tokens=int(rows))


@functools.lru_cache(maxsize=32)
def spec_for(source, task: str | None, size: int | None, images: int) -> ImageSpec:
    """:func:`image_spec` of the model of ``source`` built on trace tensors (no memory), cached per process."""
    model, _ = build_traced_model(source, dtype="fp32", task=task, attn="sdpa", gc=False)
    return image_spec(model, size, images)


__all__ = ["ImageSpec", "TASK", "collate", "default_image_size", "image_spec", "image_token_id", "layout",
           "real_batch", "sample", "spec_for"]
