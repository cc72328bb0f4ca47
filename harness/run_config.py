"""The harness's run configuration: a training setup plus what only a real run has (no torch import)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimem.estimators.errors import UserError
from optimem.estimators.model_check import check_model_config
from optimem.estimators.setup import SetupError, TrainingSetup
from optimem.estimators.packing import read_text, samples, texts


@dataclass(frozen=True)
class RunConfig(TrainingSetup):
    """One measured run: a :class:`~optimem.estimators.setup.TrainingSetup` (what shapes memory; the run's
    defaults are batch 2 x 64 tokens on ``auto``) plus what only a real run has: optimizer ``steps``, the
    ``warmup`` steps left out of throughput figures, the ``seed``, a local ``data`` file (None: synthetic
    tokens) and ``extra`` (sweep settings that are part of the run's identity, e.g. ``memory_limit_bytes``)."""

    batch_size: int = 2
    seq_len: int = 64
    steps: int = 2
    warmup: int = 1
    seed: int = 0
    data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SetupError(f"{name} must be an integer, got {value!r}", name)
        if self.steps < 1:
            raise SetupError(f"steps must be a positive integer, got {self.steps!r}", "steps")
        if self.warmup < 0:
            raise SetupError(f"warmup must be a non-negative integer, got {self.warmup!r}", "warmup")
        if not 0 <= self.seed < 2**32:
            raise SetupError(f"seed must be an integer in [0, 2**32) (what numpy's seeding takes), got {self.seed!r}",
                             "seed")
        if self.data is not None and (not isinstance(self.data, str) or not Path(self.data).is_file()):
            raise SetupError(f"{self.data}: no such file (give a local text or JSONL file)", "data")
        if not isinstance(self.extra, dict):
            raise UserError(f"extra must be a mapping, got {self.extra!r}")

    def check_trainable(self, inventory=None) -> None:
        """The setup's checks (:meth:`TrainingSetup.check_trainable`), then what a measured run needs besides:
        warmup steps shorter than the run, a ``data`` file with text in it, and a vocabulary with room for
        the synthetic token ids (:data:`FIRST_SYNTHETIC_ID` up)."""
        super().check_trainable(inventory)
        for name in ("deepspeed", "fsdp", "offload_optimizer", "offload_param"):
            if getattr(self, name) not in (None, "", "none"):
                raise SetupError(f"a measured run trains --sharding zero1-3/fsdp with optimem's own DeepSpeed / FSDP "
                                 f"config, without offload: {name} is estimated (bench estimate, bench plan), not run "
                                 "yet", name)
        if self.use_liger_kernel and self.resolved_device() == "cpu":
            raise SetupError("Liger's kernels are Triton GPU kernels: a CPU run cannot use them (bench estimate "
                             "--use-liger-kernel predicts a CUDA run from liger's source)", "use_liger_kernel")
        if self.padding_free and self.data is None:
            raise SetupError("padding-free packing packs a data file's samples: give --data FILE (a .jsonl with one "
                             "{\"text\": ...} per line, or a text file, one sample per line)", "padding_free")
        if self.group_by_length and self.data is None:
            raise SetupError("--group-by-length draws a data file's samples by length: give --data FILE (a .jsonl "
                             "with one {\"text\": ...} per line, or a text file, one sample per line)",
                             "group_by_length")
        if self.warmup >= self.steps:
            raise SetupError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps}): throughput is "
                             "measured over the steps after warmup", "warmup")
        if self.data is not None:
            try:
                if self.padding_free or self.group_by_length:
                    samples(self.data, self.seq_len)
                data_tokens(self.data)
            except UserError as exc:
                raise SetupError(str(exc), "data") from None
            return
        vocab = check_model_config(self.model).get("vocab_size")
        if vocab is not None and vocab <= FIRST_SYNTHETIC_ID:
            raise SetupError(f"{self.model}: vocab_size {vocab} leaves no token ids for synthetic data (ids "
                             f"{FIRST_SYNTHETIC_ID} and up; ids below are kept for special tokens): give a vocab_size "
                             f"above {FIRST_SYNTHETIC_ID}, or --data FILE", "model")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "extra": dict(self.extra)}

    def resolved_device(self) -> str:
        """``cuda`` or ``cpu``: ``auto`` is CUDA when torch sees a device."""
        if self.device == "auto":
            import torch  # lazy: pulls in torch, which importing this module does not

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


FIRST_SYNTHETIC_ID = 3
"""Synthetic batches draw token ids from ``[FIRST_SYNTHETIC_ID, vocab_size)`` (the ids below are BOS/EOS/PAD in
most vocabularies)."""


@functools.lru_cache(maxsize=8)
def _tokens(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    text = read_text(path)
    if path.endswith(".jsonl"):
        text = "\n".join(texts(path, text))
    tokens = tuple(text.encode("utf-8"))
    if not tokens:
        raise UserError(f"{path}: holds no text to train on (an empty file); give a file with text, or "
                        "leave --data out for synthetic tokens")
    return tokens


def data_tokens(path: str) -> list[int]:
    """The byte-level token ids of a local text file, or of the ``text`` fields of a ``.jsonl`` file (what a run
    with ``data`` trains on). UserError for a file that cannot be read, is not UTF-8, or holds no text."""
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return list(_tokens(str(path), st.st_mtime_ns, st.st_size))


__all__ = ["FIRST_SYNTHETIC_ID", "RunConfig", "data_tokens"]
