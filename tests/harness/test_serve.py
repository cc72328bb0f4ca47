"""``bench serve``'s answers without a browser: the page's figures are ``estimate()``'s, the commands it shows give
the same figures, bad values are inline messages naming the field, the ``TrainingArguments`` snippet describes the
same setup, and the results tab reads, plots and compares a results file. (The page in a real browser:
tests/e2e/test_serve_browser.py.)"""
from __future__ import annotations

import shlex
import socket

import pytest

from optimem import estimate
from optimem.harness.ui.form import Form, estimate_argv, parse, plan_argv
from optimem.harness.ui.views import answer, training_arguments_snippet

from conftest import COMMITTED_RESULTS

OPTIMS = ["adamw_torch", "adafactor", "adamw_bnb_8bit"]


def _form(**changes) -> Form:
    values = dict(model="tiny-llama", task="causal-lm", dtype="fp32", mixed_precision="none", batch_size=2,
                  seq_len=64, grad_accum=1, gradient_checkpointing=False, lora="", quantize="none", optim=OPTIMS,
                  num_processes=1, sharding="none")
    gpus = changes.pop("gpus", ["l4", "h100-sxm"])
    values.update(changes)
    return Form(values, gpus=gpus)


@pytest.fixture(scope="module")
def good():
    ans = answer(_form())
    assert not ans.error, ans.error
    return ans


def test_the_page_shows_estimates_figures(good):
    assert [r[0] for r in good.estimate_rows] == OPTIMS
    for row, bar in zip(good.estimate_rows, good.bars):
        est = estimate("tiny-llama", row[0], batch_size=2, seq_len=64)
        assert row[6] == f"{est.bytes['peak']:,}"  # the exact peak column
        assert bar.label == row[0]
        tensors = {k: v for k, v in bar.parts.items() if k != "cuda_terms"}
        assert sum(tensors.values()) == est.bytes["peak"]
        assert tensors == {k: est.phases[est.peak_phase][k] for k in tensors}
        assert bar.parts["cuda_terms"] == est.cuda["peak_reserved"] - est.bytes["peak"]
        assert f'data-optim="{row[0]}" data-category="optimizer_state" data-bytes="' \
               f'{est.phases[est.peak_phase]["optimizer_state"]}"' in good.chart_svg or \
               est.phases[est.peak_phase]["optimizer_state"] == 0


def test_the_commands_shown_give_the_same_figures(good):
    from optimem.harness.commands.estimate import run_estimates

    lines = good.commands.splitlines()
    assert lines[0].startswith("bench estimate --model tiny-llama ") and lines[1].startswith("bench plan ")
    _, _, shown, _ = run_estimates(parse("estimate", shlex.split(lines[0])[2:]))
    assert [e.bytes for e in shown] == [e.bytes for e in good.estimates]
    # the plan rows: every optimizer on every GPU, each fitting tiny-llama
    assert {(r[0], r[1]) for r in good.plan_rows} == {(o, g) for o in OPTIMS for g in
                                                      ("NVIDIA L4", "NVIDIA H100 SXM 80GB")}
    assert all(r[2] == "yes" for r in good.plan_rows)
    assert "Recommended" in good.recommendation


def test_the_flags_come_from_the_one_table():
    argv = estimate_argv(_form(batch_size=4, gradient_checkpointing=True, mixed_precision="bf16"))
    args = parse("estimate", argv)
    assert (args.batch_size, args.gradient_checkpointing, args.mixed_precision) == (4, True, "bf16")
    plan = parse("plan", plan_argv(_form(num_processes=4, sharding="zero3"), max_seq=True))
    assert (plan.num_processes, plan.sharding, plan.max_seq, plan.batch_size) == (4, "zero3", True, 2)


@pytest.mark.parametrize("changes,field,needle", [
    ({"batch_size": 0}, "batch_size", "Micro-batch (--batch-size): batch_size must be a positive integer"),
    ({"seq_len": None}, "seq_len", "Sequence length (--seq-len): give a whole number"),
    ({"grad_accum": 1.5}, "grad_accum", "(--grad-accum): give a whole number"),
    ({"model": "/etc/passwd"}, "model", "never reads files on the server"),
    ({"model": "../estimators/configs/tiny-llama.json"}, "model", "looks like a path"),
    ({"model": "no-such-model"}, "model", "unknown model 'no-such-model'"),
    ({"model": "nosuch-org/nosuch-model"}, "model", "nosuch-org/nosuch-model"),  # offline Hub miss: a message
    ({"dtype": "fp33"}, "dtype", "Weights dtype (--dtype)"),
    ({"optim": []}, "optim", "pick at least one optimizer"),
    ({"gpus": []}, "gpus", "pick at least one GPU type"),
    ({"num_processes": 4}, "sharding", "several GPUs need a sharding scheme"),
    ({"lora": "r=abc"}, "lora", "LoRA (--lora)"),
    ({"quantize": "nf4"}, "quantize", "--lora"),
    ({"seq_len": -5}, "seq_len", "Sequence length (--seq-len): seq_len must be a positive integer"),
])
def test_a_bad_value_is_a_message_naming_the_field(changes, field, needle):
    ans = answer(_form(**changes))
    assert needle in ans.error and ans.error_field == field, (ans.error, ans.error_field)
    assert "Traceback" not in ans.error and "\n" not in ans.error


def test_an_internal_error_is_one_line_and_the_next_answer_works(monkeypatch, capsys):
    import optimem.harness.ui.views as views

    def broken(argv):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(views, "_estimates", broken)
    ans = answer(_form(batch_size=5))
    assert ans.error == "internal error: RuntimeError: boom (the server's log has the traceback)"
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.undo()
    assert not answer(_form(batch_size=5)).error


def test_an_uploaded_config_is_the_model(tmp_path):
    from optimem.estimators.catalog import resolve

    cfg = tmp_path / "my-config.json"
    cfg.write_text(resolve("tiny-llama").path.read_text())
    form = _form(optim=["adamw_torch"])
    form.config, form.config_name = str(cfg), "my-config.json"
    ans = answer(form)
    assert not ans.error
    assert ans.estimates[0].bytes == estimate("tiny-llama", "adamw_torch", batch_size=2, seq_len=64).bytes
    assert "--model my-config.json" in ans.commands and str(tmp_path) not in ans.commands
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20))
    form.config = str(big)
    assert "more than a config.json holds" in answer(form).error


def test_the_training_arguments_snippet_is_the_same_setup():
    from optimem.estimators.user_objects import from_training_arguments

    ans = answer(_form(optim=["adafactor"], batch_size=3, grad_accum=2, gradient_checkpointing=True,
                       mixed_precision="bf16"))
    scope: dict = {}
    exec(ans.snippet.replace("output_dir='out'", "output_dir=OUT, use_cpu=True"),
         {"OUT": "/tmp/optimem-test-serve-out"}, scope)
    back = from_training_arguments(scope["args"], model="tiny-llama", seq_len=64, device="cuda")
    assert back == ans.estimates[0].setup


def test_sharded_rows_and_snippet():
    ans = answer(_form(num_processes=2, sharding="zero3", optim=["adamw_torch"]))
    assert not ans.error, ans.error
    assert "deepspeed=" in ans.snippet and "'stage': 3" in ans.snippet
    assert "--num-gpus 2 --sharding zero3" in ans.commands
    assert "sharding_overhead" in ans.bars[0].parts or "weights" in ans.bars[0].parts


def test_the_results_tab_reads_plots_and_compares():
    from optimem.harness.ui.results_view import results

    ans = results(str(COMMITTED_RESULTS), str(COMMITTED_RESULTS))
    assert not ans.error
    assert ans.predicted_vs_measured.axes and ans.breakdown.axes
    assert len(ans.error_rows) == 24 and ans.phase_rows
    assert "no regressions" in ans.comparison
    assert "upload a JSONL results file" in results(None).error


def test_the_results_tab_refuses_what_is_not_records(tmp_path):
    from optimem.harness.ui.results_view import results

    bad = tmp_path / "notes.jsonl"
    bad.write_text("hello\n")
    assert "no run record" in results(str(bad)).error


def test_serve_refuses_a_port_in_use(capsys):
    from optimem.harness.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and len(err.strip().splitlines()) == 1


def test_serve_says_when_it_serves_every_network(monkeypatch, capsys):
    import optimem.harness.commands.serve as serve
    from optimem.harness.cli import main

    served = []
    monkeypatch.setattr(serve, "launch", lambda host, port, block=True: served.append((host, port, block)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--host", "0.0.0.0", "--port", str(port)]) == 0
    assert served == [("0.0.0.0", port, True)]
    out, err = capsys.readouterr()
    assert "every network" in err and f"http://127.0.0.1:{port}" in out


def test_serve_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from optimem.harness.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve"]) == 2
    assert "pip install 'optimem[ui]'" in capsys.readouterr().err


def test_bench_serve_serves_the_page(tmp_path):
    """The real command in its own process: the page answers on 127.0.0.1 within seconds, and Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file, err_file = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "optimem.harness.cli", "serve", "--port", str(port)],
                            stdout=out_file, stderr=err_file, text=True, cwd=tmp_path,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        deadline, page = time.monotonic() + 120, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "optimem" in page, (tmp_path / "err.txt").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out_file.close()
        err_file.close()
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert f"bench serve: http://127.0.0.1:{port}" in out
    assert "Traceback" not in err
