"""The checks of one setup field (:class:`optimem.estimators.setup.TrainingSetup` runs them at the edge): each
returns the field's canonical value or raises :class:`UserError` in one line; :class:`named_field` turns that into
a :class:`SetupError` naming the field (the command line names its flag instead)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import UserError

ALL_LINEAR = "all-linear"
_OFF = ("", "none", "no", "off", "false", "fp32", "float32")


class SetupError(UserError):
    """A setup field with a bad value: ``field`` names it (the command line names its flag instead)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class named_field:
    """``with named_field(name):`` -- a UserError raised inside becomes a :class:`SetupError` naming ``name``."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, UserError) and not isinstance(exc, SetupError):
            raise SetupError(str(exc), self.name) from None
        return False


def choice(name: str, value: Any, allowed: tuple) -> str:
    key = str(value).strip().lower() if isinstance(value, str) else value
    if key not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return key


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer (at least 1), got {value!r}")


def mixed_precision(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    key = str(value).replace("torch.", "").strip().lower()
    key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(key, key)
    if key not in ("bf16", "fp16"):
        raise UserError(f"unknown dtype {value!r} for mixed precision: use none, bf16 or fp16")
    return key


def regex(name: str, text: Any) -> str:
    if not isinstance(text, str):
        raise UserError(f"{name} must be a regular expression (a string), got {text!r}")
    try:
        re.compile(text)
    except re.error as exc:
        raise UserError(f"bad {name} regex {text!r}: {exc}") from None
    return text


def targets(value: Any) -> str | tuple[str, ...] | None:
    """``optim_target_modules`` as the Trainer takes it: a string (a regex, or ``all-linear``) or a list of
    names/regexes (a one-element list is its string)."""
    if value in (None, "", [], ()):
        return None
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise UserError(f"optim_target_modules must be a string or a list of strings, got {value!r}")
    for item in items:
        if item.replace("_", "-") != ALL_LINEAR:
            regex("optim_target_modules", item)
    return items[0] if len(items) == 1 else tuple(items)


__all__ = ["ALL_LINEAR", "SetupError", "choice", "mixed_precision", "named_field", "positive_int", "regex", "targets"]
