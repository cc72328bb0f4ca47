import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

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
