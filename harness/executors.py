"""Where a sweep's runs execute: this machine (:class:`LocalExecutor`, the default) or a Slurm cluster
(:class:`optimem.harness.slurm.SlurmExecutor`), behind one interface.

An executor's :meth:`Executor.run` takes one :class:`~optimem.harness.run_config.RunConfig` and returns its
validated record (never a partial one); the sweep appends it, keyed, locked and resumable, whatever executed
it. :meth:`Executor.cancel_all` stops what is still running or queued (Ctrl-C).
"""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol
from optimem.harness.launcher import execute
from optimem.harness.fit import available_memory

if TYPE_CHECKING:
    from optimem.harness.run_config import RunConfig
    from optimem.harness.zygote import Zygote

EXECUTORS = ("local", "slurm")


class Executor(Protocol):
    """Runs one configuration and returns its record."""

    name: str
    forks: bool
    """Whether runs may be forked from a zygote on this machine (local runs only)."""

    def run(self, cfg: RunConfig, *, timeout_s: float, track_tensors: bool | None, fault: str | None,
            on_start: Callable[[subprocess.Popen], None] | None, zygote: Zygote | None) -> dict: ...

    def cancel_all(self) -> None: ...

    def available(self, device: str) -> tuple[int | None, str]:
        """``(bytes, source)`` a run on ``device`` will have, for the check before it starts (None: unknown)."""


class LocalExecutor:
    """A worker process on this machine (:func:`optimem.harness.launcher.execute`; forked from ``zygote``
    when given)."""

    name = "local"
    forks = True

    def run(self, cfg, *, timeout_s, track_tensors=None, fault=None, on_start=None, zygote=None) -> dict:
        return execute(cfg, timeout_s=timeout_s, track_tensors=track_tensors, fault=fault, on_start=on_start,
                       zygote=zygote)

    def cancel_all(self) -> None:
        """Nothing queued: the sweep kills its own worker processes."""

    def available(self, device: str) -> tuple[int | None, str]:
        return available_memory(device)


__all__ = ["EXECUTORS", "Executor", "LocalExecutor"]
