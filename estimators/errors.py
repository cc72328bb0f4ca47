"""Errors meant for the user: the CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (unknown model or optimizer, malformed arguments).

    The message is a single line saying what was wrong and what would be right.
    """


class TraceFailure(UserError):
    """The whole-step tracer could not estimate a model (not bad input: the same run may still train).

    ``kind``: ``"model"`` when the same step fails on small real CPU tensors too (the model fails on its own:
    the message carries the model's error), ``"tracer"`` when it runs there (a tracer gap), ``"unchecked"``
    when the real step was not tried (the model is too large to build on the CPU). ``bench run`` still runs and
    reports the real job when the estimate fails this way."""

    def __init__(self, message: str, kind: str = "unchecked"):
        super().__init__(message)
        self.kind = kind


def one_line(exc: BaseException, limit: int = 300, *, kind: bool = False) -> str:
    """The first non-blank line of ``exc``'s message (its type name when it has none), cut to ``limit``
    characters with ``...``; ``kind``: prefixed with the type name (``ValueError: ...``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if kind:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    elif not text:
        text = type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
