"""optimem: training-memory estimates per optimizer and measured Trainer runs, under one import name.

``from optimem import estimate, plan_setup, MemoryCallback``; the layers are :mod:`optimem.estimators` (GPU-free
predictions, bytes) and :mod:`optimem.harness` (real runs, records, commands). The repository's ``estimators/``
and ``harness/`` folders are installed as those subpackages (pyproject's package-dir mapping).
``MemoryCallback`` is imported on first use, so ``import optimem`` stays free of torch and transformers.
"""
from .estimators import DEFAULT_MODEL, Estimate, UserError, estimate, names

__all__ = ["DEFAULT_MODEL", "Estimate", "MemoryCallback", "UserError", "estimate", "names"]


def __getattr__(name: str):
    if name == "MemoryCallback":  # lazy: the callback imports transformers
        from .harness.callback import MemoryCallback

        return MemoryCallback
    raise AttributeError(f"module 'optimem' has no attribute {name!r}")
