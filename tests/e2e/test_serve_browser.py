"""``bench serve``'s page in a real browser: Debian's headless chromium (``/usr/bin/chromium``, installed by
``.ci/run``) driven by playwright (no browser download). One server on a free 127.0.0.1 port for the module,
stopped after. The test types a model, picks optimizers and reads the rendered figures back against
``estimate()``; a bad value shows its inline message and the page keeps answering; a results upload draws its
plot. ``python tests/e2e/test_serve_browser.py --screenshot results/serve.png`` writes the README's screenshot."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("OPTIMEM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "cpu-amd-epyc-2026-11-23.jsonl"
START = {"model": "", "dtype": "fp32", "mixed_precision": "none", "batch_size": 2, "seq_len": 64,
         "optim": ["adamw_torch"]}
"""The page opens with no model (an inline message, no trace), so the test types one."""
ROWS_JS = ("sel => [...document.querySelectorAll(sel + ' [role=row]')].map(r => [...r.querySelectorAll("
           "'[role=gridcell]')].map(c => c.innerText.trim())).filter(r => r.length && r[0])")
"""A Gradio dataframe's body rows as lists of cell texts (its rows are ARIA rows of grid cells)."""
SEGMENTS_JS = ("() => [...document.querySelectorAll('#memory-chart rect.segment')].map(r => [r.dataset.optim, "
               "r.dataset.category, Number(r.dataset.bytes)])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set OPTIMEM_CHROMIUM)")
    pytest.importorskip("gradio", reason="bench serve needs the [ui] extra (gradio)")
    sync = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
    from optimem.harness.ui.app import launch

    port = _free_port()
    demo = launch("127.0.0.1", port, block=False, start=START, gpus=["l4", "h100-sxm"])
    try:
        with sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            pg = browser.new_page(viewport={"width": 1280, "height": 1600})
            pg.set_default_timeout(90_000)
            pg.goto(f"http://127.0.0.1:{port}/")
            yield pg
            browser.close()
    finally:
        demo.close()


def test_type_a_model_pick_optimizers_and_read_the_figures(page):
    from optimem import estimate

    page.wait_for_selector('#form-error:has-text("Model (--model)")')  # no model yet: the inline message
    model = page.locator("#model textarea").first
    model.fill("tiny-llama")
    model.press("Enter")
    page.wait_for_selector("#memory-chart rect.segment", state="attached")
    box = page.locator("#optim input").first
    for name in ("adafactor", "adamw_bnb_8bit"):
        box.click()
        box.fill(name)
        box.press("Enter")
    page.locator("h2").first.click()
    page.wait_for_selector('#memory-chart rect[data-optim="adamw_bnb_8bit"]', state="attached")
    page.wait_for_function("() => document.querySelectorAll('#estimate-table [role=gridcell]').length >= 30")
    rows = {r[0]: r for r in page.evaluate(ROWS_JS, "#estimate-table")}
    drawn: dict = {}
    for optim, category, n in page.evaluate(SEGMENTS_JS):
        drawn.setdefault(optim, {})[category] = n
    assert set(rows) == set(drawn) == {"adamw_torch", "adafactor", "adamw_bnb_8bit"}
    for optim in rows:
        est = estimate("tiny-llama", optim, batch_size=2, seq_len=64)
        at_peak = est.phases[est.peak_phase]
        assert rows[optim][6] == f"{est.bytes['peak']:,}"  # the table's exact peak
        assert {k: v for k, v in drawn[optim].items() if k != "cuda_terms"} == \
               {k: at_peak[k] for k in drawn[optim] if k != "cuda_terms" and at_peak[k]}
        assert drawn[optim]["cuda_terms"] == est.cuda["peak_reserved"] - est.bytes["peak"]
    plan = page.evaluate(ROWS_JS, "#plan-table")
    assert {(r[0], r[1]) for r in plan} >= {("adafactor", "NVIDIA L4"), ("adamw_torch", "NVIDIA H100 SXM 80GB")}
    assert "bench estimate --model tiny-llama" in page.locator("#commands").inner_text()
    assert "TrainingArguments(" in page.locator("#snippet").inner_text()


def test_a_bad_value_is_an_inline_message_and_the_page_keeps_answering(page):
    batch = page.locator("#batch_size input").first
    batch.fill("0")
    batch.press("Enter")
    page.wait_for_selector('#form-error:has-text("Micro-batch (--batch-size)")')
    assert "Traceback" not in page.content()
    batch.fill("3")
    batch.press("Enter")
    page.wait_for_function("() => !document.querySelector('#form-error').innerText.trim()")
    page.wait_for_selector('#memory-chart title:has-text("micro-batch 3")', state="attached")


def test_a_results_upload_draws_its_plot(page):
    page.get_by_role("tab", name="Results").click()
    page.locator("#results-upload input[type=file]").set_input_files(str(RESULTS))
    page.wait_for_selector("#pvm-plot img", state="attached")
    page.wait_for_selector('#results-summary:has-text("24 configurations")')
    assert page.evaluate(ROWS_JS, "#error-table")


def screenshot(path: str) -> None:
    """The README's picture: the planning tab for Llama-3-8B in bf16 with three optimizers on three GPUs."""
    from playwright.sync_api import sync_playwright

    from optimem.harness.ui.app import launch

    port = _free_port()
    demo = launch("127.0.0.1", port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            pg = browser.new_page(viewport={"width": 1280, "height": 1000})
            pg.goto(f"http://127.0.0.1:{port}/")
            pg.wait_for_selector("#memory-chart rect.segment", state="attached", timeout=300_000)
            pg.wait_for_timeout(500)
            pg.screenshot(path=path, full_page=True)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    screenshot(sys.argv[sys.argv.index("--screenshot") + 1])
