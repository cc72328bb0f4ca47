"""``python -m optimem.harness.distributed RESULTS.jsonl [--markdown OUT.md]``: the per-rank table."""
import sys

from optimem.harness.distributed.report import main

sys.exit(main())
