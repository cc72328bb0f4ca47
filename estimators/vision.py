"""Vision-language fine-tunes (``--task image-text-to-text``) as setup fields: ``--image-size``, ``--images-per-sample``
and the ``--freeze`` keywords ``vision`` / ``projector``. Plain data and checks (no torch); the batch itself is
:mod:`optimem.estimators.trace.images`.

The keywords name parts of a vision-language model the way transformers finds them: ``vision`` is the module
``PreTrainedModel.get_encoder(modality="image")`` looks for -- ``vision_tower``, ``visual``, ``vision_model``,
``vision_encoder``, ``image_tower`` (here at any depth: GIT's is ``git.image_encoder.vision_model``) -- and
``projector`` every other module of the base model (``model.``, ``git.``...) that is not one of those or the language
model ``get_decoder()`` looks for (``language_model``, ``text_model``, ``decoder``, ``text_decoder``): LLaVA's and
Gemma 3's ``multi_modal_projector``, Idefics3's ``connector``. (Qwen2-VL's patch merger lives inside its ``visual`` module: ``vision`` freezes it too.)
"""
from __future__ import annotations

import re
from dataclasses import replace

from .errors import UserError
from .model_check import check_sequence_length

TASK = "image-text-to-text"
IMAGE_ENCODERS = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower")
"""``transformers.PreTrainedModel.get_encoder``'s module names for ``modality="image"``."""
DECODERS = ("language_model", "text_model", "decoder", "text_decoder")
"""``transformers.PreTrainedModel.get_decoder``'s module names."""
_VISION = r"(?:^|\.)(?:" + "|".join(IMAGE_ENCODERS) + r")\."
_PROJECTOR = r"^\w+\.(?!(?:" + "|".join(IMAGE_ENCODERS + DECODERS) + r")\.)[^.]+\."
FREEZE_KEYWORDS = {"vision": _VISION, "projector": _PROJECTOR}
"""``--freeze`` keywords and the parameter-name regex each stands for (see the module docstring)."""
LM_LINEAR = r".*(?:" + "|".join(DECODERS) + r")\..*(?:proj|fc\d?|dense|linear|wi|wo|w\d)\w*"
"""A peft LoRA target (``--lora target=...``; a regex fully matching module names) of the language model's linear
layers only -- what ``lm`` in ``--lora target=lm`` stands for."""


def freeze_pattern(text: str | None) -> str | None:
    """``--freeze``'s value as a regex: ``vision``, ``projector`` or ``vision,projector`` become the regexes of
    :data:`FREEZE_KEYWORDS` (joined); anything else is returned as given (a regex of parameter names)."""
    if not isinstance(text, str):
        return text
    words = [w.strip().lower() for w in text.split(",")]
    if words and all(w in FREEZE_KEYWORDS for w in words):
        return "|".join(f"(?:{FREEZE_KEYWORDS[w]})" for w in dict.fromkeys(words))
    return text


def _keywords() -> dict[str, str]:
    return {freeze_pattern(w): w for w in ("vision", "projector", "vision,projector", "projector,vision")}


def freeze_label(pattern: str) -> str:
    """How a ``--freeze`` value reads: its keywords (``vision,projector``), else ``/regex/``."""
    return _keywords().get(pattern) or f"/{pattern}/"


def check_keyword_freeze(pattern: str | None, names, model: str) -> None:
    """UserError (one line) when ``pattern`` is a ``--freeze`` keyword's regex that matches none of the parameter
    ``names`` (a model with no vision tower, or no projector beside it)."""
    words = _keywords()
    if pattern in words and not any(re.search(pattern, n) for n in names):
        what = (f"vision tower (a module named {', '.join(IMAGE_ENCODERS)})" if words[pattern].startswith("vision")
                else "projector (a module beside its vision tower and language model)")
        raise UserError(f"--freeze {words[pattern]} matches no parameter of {model}: it has no {what}; give a regex "
                        "of parameter names")


def configured_image_size(config: dict) -> bool:
    """Whether a config (as JSON data) or one of its sub-configs names an ``image_size``."""
    return bool(config.get("image_size")) or any(configured_image_size(v) for v in config.values()
                                                 if isinstance(v, dict))


def check_image_fields(task: str, image_size, images_per_sample) -> None:
    """UserError (one line) for image fields that are not positive integers, or given for a text task."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive number of pixels (a square image's side), got {image_size!r}")
    if isinstance(images_per_sample, bool) or not isinstance(images_per_sample, int) or images_per_sample < 1:
        raise UserError(f"images per sample must be a positive integer, got {images_per_sample!r}")
    if task != TASK and (image_size is not None or images_per_sample != 1):
        raise UserError(f"{'image size' if image_size is not None else 'images per sample'} describes the images of "
                        f"--task {TASK}, not of {task}")


OTHER_ENCODERS = ("video_tower", "audio_tower", "image_encoder")
"""Encoders besides ``get_encoder("image")``'s names whose position tables are not the text's (Video-LLaVA's
``video_tower``, GIT's ``image_encoder``)."""


def text_part(inv):
    """The inventory without the vision tower's (and :data:`OTHER_ENCODERS`') parameters: the model whose learned
    positions limit the text."""
    rx = re.compile(r"(?:^|\.)(?:" + "|".join(IMAGE_ENCODERS + OTHER_ENCODERS) + r")\.")
    return replace(inv, rows=tuple(r for r in inv.rows if not rx.search(r.name)), _cache={})


def check_text_length(inv, task: str, seq_len: int, images_per_sample: int, max_positions: int | None) -> None:
    """``--seq-len`` against the model's learned text positions (:func:`text_part`: a vision tower's table is its
    patches', as GIT's and Gemma 3's are when trained as causal LMs too) and, for ``image-text-to-text``, against the
    images' text (:func:`check_image_seq`)."""
    if task == TASK:
        check_image_seq(seq_len, images_per_sample)
    check_sequence_length(text_part(inv), seq_len, max_positions=max_positions)


def check_image_seq(seq_len: int, images_per_sample: int) -> None:
    """Each image's tokens are followed by one text token: the text needs at least one more token than images."""
    if seq_len < images_per_sample + 1:
        raise UserError(f"--seq-len counts the text tokens of a sample besides its image tokens: {images_per_sample} "
                        f"image(s) need at least {images_per_sample + 1} (one after each image, one to predict), "
                        f"got {seq_len}")


__all__ = ["DECODERS", "FREEZE_KEYWORDS", "IMAGE_ENCODERS", "LM_LINEAR", "TASK", "check_image_fields",
           "check_image_seq", "check_keyword_freeze", "check_text_length", "configured_image_size", "freeze_label", "freeze_pattern", "text_part"]
