import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
# The test suite never reaches the real Hugging Face Hub: Hub ids resolve from the cache only, unless a test
# (tests/estimators/test_hub.py) points HF_ENDPOINT at its stand-in server on 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = ROOT / "results" / "cpu-amd-epyc-2026-11-23.jsonl"
"""The committed CPU sweep the README's figures come from: the one results file tests read. Tests never glob
results/ (a user's `bench run` appends to results/runs.jsonl there)."""

# The suite never reads (nor fills) the user's optimem cache: one fresh cache directory per test session,
# inherited by every subprocess a test starts.
_CACHE = tempfile.mkdtemp(prefix="optimem-test-cache-")
os.environ["OPTIMEM_CACHE_DIR"] = _CACHE
os.environ.pop("OPTIMEM_NO_CACHE", None)


# A suite started in the background of a non-interactive shell (`cmd &`, many CI runners) inherits SIGINT
# ignored, as POSIX shells do for background commands, and so does every process it starts: Python then installs
# no KeyboardInterrupt handler and a SIGINT does nothing. The tests that interrupt a run with SIGINT stand for a
# user's Ctrl-C, so the suite gives SIGINT its default handling (inherited as such by the processes it starts).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


UP = ROOT.parent / "shared" / "slurm" / "up.sh"
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
