"""optimem: training-memory estimates per optimizer and measured Trainer runs, under one import name.

``from optimem import estimate, plan, MemoryCallback``; the layers are :mod:`optimem.estimators` (GPU-free
predictions, bytes) and :mod:`optimem.harness` (real runs, records, commands). The repository's ``estimators/``
and ``harness/`` folders are installed as those subpackages (pyproject's package-dir mapping).
``plan``/``plan_setup`` and ``MemoryCallback`` are imported on first use (the callback imports transformers).
"""
from .estimators import DEFAULT_MODEL, Estimate, UserError, estimate, names

__all__ = ["DEFAULT_MODEL", "Estimate", "MemoryCallback", "UserError", "estimate", "names", "plan", "plan_setup"]


def __getattr__(name: str):
    if name == "MemoryCallback":  # lazy: the callback imports transformers
        from .harness.callback import MemoryCallback

        return MemoryCallback
    if name in ("plan", "plan_setup"):  # lazy: a warm estimate needs none of the planner's modules
        from .estimators import planner, step_memory

        return planner.plan if name == "plan" else step_memory.plan_setup
    raise AttributeError(f"module 'optimem' has no attribute {name!r}")
