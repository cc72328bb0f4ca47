"""Facts about the machine and software a run used, for the record's ``env``.

Collected in the launching process without initialising CUDA (device name and driver come from NVML),
so the worker's idle-memory baseline is not disturbed; the worker adds what only it can know.
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from optimem.harness.trackers.nvml import driver_facts

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_version(dist: str | None) -> str | None:
    """Installed version of distribution ``dist`` (None if absent)."""
    if not dist:
        return None
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


OPTIONAL_PACKAGES = ("accelerate", "bitsandbytes", "torchao", "galore-torch", "apollo-torch", "lomo-optim",
                     "torch-optimi", "schedulefree", "grokadamw", "flashoptim", "nvidia-ml-py", "peft")
"""The distributions whose versions every record's ``env.packages`` holds."""


def package_versions() -> dict[str, str | None]:
    """``{distribution: installed version or None}`` for :data:`OPTIONAL_PACKAGES`."""
    return {d: package_version(d) for d in OPTIONAL_PACKAGES}


def optimizer_distribution(spec) -> str:
    """The pip distribution that provides ``spec``'s optimizer class."""
    if spec.pip or spec.package:
        name = spec.pip or spec.package
        # Registry entries name the import package for some; map the few whose distribution differs.
        return {"galore_torch": "galore-torch", "apollo_torch": "apollo-torch", "lomo_optim": "lomo-optim",
                "optimi": "torch-optimi"}.get(name, name)
    return spec.import_name


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout optimem runs from, or (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def collect_env(device: str, spec=None) -> dict[str, Any]:
    """``env`` for a run on ``device`` (``cpu`` or ``cuda``) of optimizer ``spec``."""
    import psutil  # lazy: pulls in psutil, which importing this module does not
    import torch  # lazy: pulls in torch, which importing this module does not

    commit, dirty = git_commit()
    env: dict[str, Any] = {
        "device": device, "device_name": None, "driver": None, "cuda": torch.version.cuda,
        "torch": torch.__version__, "transformers": package_version("transformers") or "unknown",
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "memory_total_bytes": int(psutil.virtual_memory().total),
        "optimizer_package": {"name": None, "version": None},
        "packages": package_versions(),
        "git_commit": commit, "git_dirty": dirty,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if spec is not None:
        dist = optimizer_distribution(spec)
        env["optimizer_package"] = {"name": dist, "version": package_version(dist)}
    if device == "cuda":
        env.update(driver_facts(0))
    else:
        env["device_name"] = env["cpu"]
    return env


__all__ = ["OPTIONAL_PACKAGES", "collect_env", "cpu_name", "git_commit", "optimizer_distribution",
           "package_version", "package_versions"]
