"""Padding-free packing of a data file's samples: their lengths, and the worst micro-batch a run can draw.

A padding-free run (``--padding-free --data FILE``) trains on the file's samples -- each line of a text file, or
the ``text`` of each line of a ``.jsonl`` file, as byte-level tokens (UTF-8 bytes, what ``bench run --data``
tokenizes), cut at ``seq_len`` -- and ``DataCollatorWithFlattening`` packs each micro-batch's ``batch_size`` samples
into one row. Whatever order the Trainer's sampler draws them in, no micro-batch holds more tokens than the
``batch_size`` longest samples together (:func:`worst_micro_batch`): the estimate is made for that micro-batch.
Counts are tokens, not bytes of memory.

Pad-to-longest (``--group-by-length --data FILE``: each micro-batch padded to its longest sample, the samples drawn
by transformers' ``LengthGroupedSampler``): the micro-batch that holds the file's longest sample is padded to it, in
any draw order -- the sampler only moves it to the front (megabatches of up to 50 x batch, each sorted longest
first, the one holding the longest sample swapped first) -- so the worst micro-batch is ``batch x longest``
(:func:`padded_worst`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError


def read_text(path: str) -> str:
    """A data file's text (UserError, one line, for a file that cannot be read or is not UTF-8)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the data file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file (byte {exc.start} is not UTF-8); give a UTF-8 text or JSONL "
                        "file") from None


def texts(path: str, text: str) -> list[str]:
    """The samples of a data file: the ``text`` field of each line of a ``.jsonl`` file, else each non-blank line
    (UserError, one line, for a bad JSONL line)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                obj = json.loads(line)
            except ValueError:
                raise UserError(f"{path}: line {i} is not JSON (a .jsonl data file holds one JSON object per line, "
                                "with a 'text' field)") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}: line {i} has no 'text' string (each line: {{\"text\": \"...\"}})")
            line = obj["text"]
        out.append(line)
    return out


def samples(path: str, seq_len: int) -> list[list[int]]:
    """The file's samples as byte-level token ids, each cut at ``seq_len`` (UserError, one line, for a file that
    cannot be read, is not UTF-8, has a bad JSONL line or holds no sample)."""
    out = []
    for line in texts(path, read_text(path)):
        ids = list(line.encode("utf-8"))[:seq_len]
        if len(ids) >= 2:  # a sample of one token has no label to train on
            out.append(ids)
    if not out:
        raise UserError(f"{path}: holds no sample of two or more tokens to pack (one sample per line)")
    return out


def worst_micro_batch(lengths: list[int], batch_size: int) -> int:
    """Tokens of the largest micro-batch any draw of ``batch_size`` samples can make: the longest ones together."""
    return sum(sorted(lengths, reverse=True)[:batch_size])


def padded_worst(lengths: list[int], batch_size: int) -> tuple[int, int]:
    """``(rows, seq)`` of the largest pad-to-longest micro-batch: ``min(batch, samples)`` rows of the longest."""
    return min(batch_size, len(lengths)), max(lengths)


def packed_seq_len(tokens: int, batch_size: int) -> int:
    """The per-sample length whose ``batch_size x seq`` packed row covers ``tokens`` (exact when it divides)."""
    return max(math.ceil(tokens / batch_size), 2)


__all__ = ["packed_seq_len", "padded_worst", "read_text", "samples", "texts", "worst_micro_batch"]
