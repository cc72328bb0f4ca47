"""The harness's run configuration: a training setup plus what only a real run has (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estimators.errors import UserError
from estimators.setup import TrainingSetup


@dataclass(frozen=True)
class RunConfig(TrainingSetup):
    """One measured run: a :class:`~estimators.setup.TrainingSetup` (what shapes memory; the run's
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
                raise UserError(f"{name} must be an integer, got {value!r}")
        if self.steps < 1:
            raise UserError(f"steps must be a positive integer, got {self.steps!r}")
        if self.warmup < 0:
            raise UserError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.data is not None and not Path(self.data).is_file():
            raise UserError(f"--data {self.data}: no such file (give a local text or JSONL file)")
        if not isinstance(self.extra, dict):
            raise UserError(f"extra must be a mapping, got {self.extra!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "extra": dict(self.extra)}

    def resolved_device(self) -> str:
        """``cuda`` or ``cpu``: ``auto`` is CUDA when torch sees a device."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


__all__ = ["RunConfig"]
