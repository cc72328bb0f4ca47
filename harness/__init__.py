"""optimem harness: real Trainer jobs per optimizer, measured (memory by phase, optimizer state, throughput).

``from optimem.harness import MemoryCallback`` gives the callback for the user's own ``Trainer`` (:mod:`optimem.harness.callback`);
it is imported on first use, so ``import optimem.harness`` (and every ``bench`` command) stays free of transformers.
"""

__all__ = ["MemoryCallback"]


def __getattr__(name: str):
    if name == "MemoryCallback":  # lazy: the callback imports transformers
        from optimem.harness.callback import MemoryCallback

        return MemoryCallback
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
