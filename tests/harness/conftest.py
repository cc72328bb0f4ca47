"""Fixtures of the harness tests: ``slurm``, a Slurm cluster this machine can submit to."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UP = Path(__file__).resolve().parents[2].parent / "shared" / "slurm" / "up.sh"
"""The script that starts the single-node Slurm of this project's machines (``.ci/run`` runs it too)."""


def _sinfo_ok() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def slurm() -> None:
    """A Slurm cluster this machine can submit to: up already, or started by ../shared/slurm/up.sh (as root)."""
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'optimem[slurm]')")
    if shutil.which("sbatch") and _sinfo_ok():
        return
    if not UP.is_file():
        pytest.skip(f"no Slurm cluster: sbatch/sinfo do not answer and {UP} is not there to start one")
    if os.geteuid() != 0:
        pytest.skip(f"no Slurm cluster, and {UP} must run as root to start one")
    done = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=600)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or not _sinfo_ok():
        pytest.skip(f"no Slurm cluster: {UP} said {last or done.stderr.strip()[-300:]!r}")
