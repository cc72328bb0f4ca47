"""Benchmarks run with pytest-benchmark; they are not part of the default test run (see README)."""
import logging
import os
import shutil
import tempfile
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
for _name in ("torchao", "torch.utils._pytree", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# Benchmarks neither read nor fill the user's optimem cache: a fresh one per session (benchmarks of the warm
# path fill it first; those of the cold path turn it off).
_CACHE = tempfile.mkdtemp(prefix="optimem-bench-cache-")
os.environ["OPTIMEM_CACHE_DIR"] = _CACHE
os.environ.pop("OPTIMEM_NO_CACHE", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)
