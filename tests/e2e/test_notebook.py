"""notebooks/results.ipynb runs top to bottom on the committed results and draws the figures."""
from __future__ import annotations

import os

import pytest
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import COMMITTED_RESULTS

pytestmark = pytest.mark.slow  # the inner loop (-m 'not slow') skips this file

ROOT = Path(__file__).resolve().parents[2]


def test_results_notebook_executes(monkeypatch):
    # name the committed file: by default the notebook reads the newest results/*.jsonl, which may be a user's
    monkeypatch.setenv("OPTIMEM_RESULTS", str(COMMITTED_RESULTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(ROOT / "notebooks" / "results.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the three figures of bench plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"reading results/{COMMITTED_RESULTS.name}" in text
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "QLoRA nf4" in shown and "full fine-tune" in shown, "the LoRA/QLoRA section beside full fine-tuning"
