"""The Gradio page of ``bench serve``: a planning tab (:func:`optimem.harness.ui.views.answer`) and a results tab
(:func:`optimem.harness.ui.results_view.results`). :func:`build` makes the ``gr.Blocks``; :func:`launch` serves
it (127.0.0.1 unless told otherwise; uploads only, size-capped; no queue worker runs two estimates at once)."""
from __future__ import annotations

import os
from pathlib import Path

from optimem.estimators import names
from optimem.estimators.gpus import load_gpus
from optimem.estimators.setup import CLI, SHARDINGS, TASKS
from optimem.harness.ui.form import FORM_FIELDS, Form, label
from optimem.harness.ui.results_view import MAX_RESULTS_BYTES, PHASE_COLUMNS, results
from optimem.harness.ui.views import ESTIMATE_COLUMNS, PLAN_COLUMNS, answer
from optimem.harness.plots import ERROR_HEADERS

DEFAULTS = {"model": "meta-llama/Meta-Llama-3-8B", "task": "causal-lm", "dtype": "bf16", "mixed_precision": "bf16",
            "batch_size": 1, "seq_len": 2048, "grad_accum": 1, "gradient_checkpointing": False, "lora": "",
            "quantize": "none", "optim": ["adamw_torch", "adamw_bnb_8bit", "adafactor"], "num_processes": 1,
            "sharding": "none"}
"""What the page opens with (a setup the planner answers in milliseconds once the model is traced)."""
DEFAULT_GPUS = ["l4", "a100-80gb", "h100-sxm"]
TITLE = "optimem: memory and fit for transformers.Trainer optimizers"
INTRO = ("Pick a model and optimizers: the tables, the chart and the plan follow every change. Figures are "
         "`optimem.estimate()`'s (bytes, shown in binary units; the estimate is the traced training step, not a "
         "measurement) and `bench plan`'s; the commands below reproduce them on the command line.")


def _inputs(gr, start: dict, start_gpus: list[str]) -> dict:
    """The planning tab's input components by field name (plus ``gpus`` and ``config``), showing ``start``."""
    DEFAULTS = start  # noqa: N806 - the page's opening values
    info = {f: CLI[f].help for f in FORM_FIELDS}
    c: dict = {}
    with gr.Row():
        c["model"] = gr.Textbox(DEFAULTS["model"], label=label("model"), info="catalog name or Hub id org/name",
                                elem_id="model", scale=3)
        c["config"] = gr.File(label="or upload a config.json", file_types=[".json"], type="filepath",
                              elem_id="config-upload", scale=2, height=90)
        c["task"] = gr.Dropdown(list(TASKS), value=DEFAULTS["task"], label=label("task"), elem_id="task")
    with gr.Row():
        c["dtype"] = gr.Dropdown(["fp32", "bf16", "fp16"], value=DEFAULTS["dtype"], label=label("dtype"),
                                 elem_id="dtype", allow_custom_value=True)
        c["mixed_precision"] = gr.Dropdown(["none", "bf16", "fp16"], value=DEFAULTS["mixed_precision"],
                                           label=label("mixed_precision"), elem_id="mixed_precision")
        for f in ("batch_size", "seq_len", "grad_accum"):
            c[f] = gr.Number(DEFAULTS[f], label=label(f), precision=0, elem_id=f, info=info[f])
        c["gradient_checkpointing"] = gr.Checkbox(DEFAULTS["gradient_checkpointing"],
                                                  label=label("gradient_checkpointing"), elem_id="ckpt")
    with gr.Row():
        c["lora"] = gr.Textbox(DEFAULTS["lora"], label=label("lora"), placeholder="r=16,alpha=32,target=all-linear",
                               elem_id="lora", scale=2)
        c["quantize"] = gr.Dropdown(["none", "nf4", "fp4", "int8"], value=DEFAULTS["quantize"],
                                    label=label("quantize"), elem_id="quantize")
    c["optim"] = gr.Dropdown(names(include_unavailable=False), value=DEFAULTS["optim"], multiselect=True,
                             label=label("optim"), elem_id="optim")
    with gr.Row():
        c["gpus"] = gr.Dropdown(sorted(load_gpus()), value=start_gpus, multiselect=True, label=label("gpus"),
                                elem_id="gpus", scale=3)
        c["num_processes"] = gr.Number(DEFAULTS["num_processes"], label=label("num_processes"), precision=0,
                                       elem_id="num_gpus")
        c["sharding"] = gr.Dropdown(list(SHARDINGS), value=DEFAULTS["sharding"], label=label("sharding"),
                                    elem_id="sharding")
    return c


def _form(keys: list[str], values: tuple) -> Form:
    got = dict(zip(keys, values))
    config = got.pop("config", None)
    gpus = got.pop("gpus", None) or []
    path = config if isinstance(config, str) else getattr(config, "name", None)
    return Form(got, gpus=list(gpus), config=path, config_name=Path(path).name if path else None)


def build(start: dict | None = None, gpus: list[str] | None = None):
    """The page (a ``gr.Blocks``), not yet served; ``start`` changes the opening values of :data:`DEFAULTS`,
    ``gpus`` the GPUs first chosen."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr  # lazy: pulls in gradio, pandas, which importing this module does not
    import pandas as pd  # lazy: pulls in pandas, which importing this module does not


    seen: set[str] = set()
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}\n{INTRO}")
        with gr.Tab("Plan", id="plan"):
            c = _inputs(gr, {**DEFAULTS, **(start or {})}, list(gpus or DEFAULT_GPUS))
            error = gr.Markdown("", elem_id="form-error")
            gr.Markdown("### Estimate per optimizer (`bench estimate`)")
            est_table = gr.Dataframe(headers=ESTIMATE_COLUMNS, interactive=False, elem_id="estimate-table",
                                     wrap=True)
            chart = gr.HTML(elem_id="chart")
            gr.Markdown("### Fit per GPU (`bench plan`)")
            plan_table = gr.Dataframe(headers=PLAN_COLUMNS, interactive=False, elem_id="plan-table", wrap=True)
            rec = gr.Markdown(elem_id="recommendation")
            notes = gr.Markdown(elem_id="notes")
            commands = gr.Code(language="shell", label="the same on the command line", elem_id="commands")
            snippet = gr.Code(language="python", label="TrainingArguments (the first optimizer picked)", elem_id="snippet")
        keys = list(c)
        outputs = [error, est_table, chart, plan_table, rec, notes, commands, snippet]

        def update(*values, progress=gr.Progress()):
            form = _form(keys, values)
            model = form.config or str(form.get("model") or "")
            if model not in seen:  # a model not seen yet is traced first: a few seconds
                progress(0.1, desc=f"tracing {Path(model).name if form.config else model} (first estimate of a "
                                   "model: a few seconds)")
            ans = answer(form)
            if ans.error:
                return [f"⚠️ **{ans.error}**"] + [gr.update() for _ in outputs[1:]]
            seen.add(model)
            return ["", pd.DataFrame(ans.estimate_rows, columns=ESTIMATE_COLUMNS), ans.chart_svg,
                    pd.DataFrame(ans.plan_rows, columns=PLAN_COLUMNS), ans.recommendation,
                    "\n".join(f"- {n}" for n in ans.notes), ans.commands, ans.snippet]

        # the model box answers when typing ends (Enter or leaving it), not on every keystroke of a name
        triggers = [c["model"].submit, c["model"].blur] + [comp.change for k, comp in c.items() if k != "model"]
        gr.on(triggers, update, inputs=list(c.values()), outputs=outputs,
              trigger_mode="always_last", concurrency_limit=1, concurrency_id="estimate")
        demo.load(update, inputs=list(c.values()), outputs=outputs, concurrency_limit=1, concurrency_id="estimate")

        with gr.Tab("Results", id="results"):
            gr.Markdown("Upload a results file (`bench run` / `bench sweep` JSONL): predicted vs measured, the memory "
                        "at the peak by category and phase, and `bench compare` against a baseline file.")
            with gr.Row():
                current = gr.File(label="results file (JSONL)", file_types=[".jsonl", ".json"], type="filepath",
                                  elem_id="results-upload")
                baseline = gr.File(label="baseline to compare with (optional)", file_types=[".jsonl", ".json"],
                                   type="filepath", elem_id="baseline-upload")
            summary = gr.Markdown(elem_id="results-summary")
            pvm = gr.Plot(label="predicted vs measured", elem_id="pvm-plot")
            breakdown = gr.Plot(label="memory at the peak by category", elem_id="breakdown-plot")

            errors = gr.Dataframe(headers=ERROR_HEADERS, interactive=False, elem_id="error-table")
            phases = gr.Dataframe(headers=PHASE_COLUMNS, interactive=False, elem_id="phase-table")
            comparison = gr.Markdown(elem_id="comparison")

            def show(path, base):
                if not path:
                    return ["Upload a results file.", None, None, None, None, ""]
                ans = results(path, base)
                if ans.error:
                    return [f"⚠️ **{ans.error}**", None, None, None, None, ""]
                return [ans.summary, ans.predicted_vs_measured, ans.breakdown,
                        pd.DataFrame(ans.error_rows, columns=ERROR_HEADERS),
                        pd.DataFrame(ans.phase_rows, columns=PHASE_COLUMNS), ans.comparison]

            gr.on([current.change, baseline.change], show, inputs=[current, baseline],
                  outputs=[summary, pvm, breakdown, errors, phases, comparison])
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, start: dict | None = None,
           gpus: list[str] | None = None):
    """Serve the page on ``host:port`` (``start``, ``gpus``: see :func:`build`). ``block``: serve until
    interrupted (else return the running ``gr.Blocks``; ``.close()`` stops it)."""
    demo = build(start, gpus)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_RESULTS_BYTES, share=False,
                prevent_thread_lock=not block, quiet=True, show_error=False, footer_links=[],
                ssr_mode=False, inbrowser=False)
    return demo


__all__ = ["DEFAULTS", "build", "launch"]
