"""`bench run` failure modes that are decided without a worker, or tested in-process: unknown optimizer, bad values,
package missing, CUDA-only optimizer on CPU, out of memory, and the OOM classifier."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from optimem.estimators import REGISTRY, get_spec
from optimem.harness.cli import main
from optimem.harness.launcher import execute
from optimem.harness.record import read_records, validate
from optimem.harness.scenario import RunConfig
from optimem.harness.worker import is_oom


def bench(capsys, *argv):
    try:
        code = main(["run", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, out, err):
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unknown_optimizer_exits_2_with_the_closest_name(capsys, tmp_path):
    err = one_line_error(*bench(capsys, "--optim", "adamw_8bt", "--out", str(tmp_path / "r.jsonl")))
    assert "unknown optimizer 'adamw_8bt'" in err and "did you mean 'adamw_8bit'" in err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps"),
    (["--steps", "x"], "--steps"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--seq-len", "1.5"], "--seq-len"),
    (["--warmup", "-2"], "--warmup"),
    (["--dtype", "fp8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--timeout", "0"], "--timeout"),
    (["--steps", "1", "--warmup", "0"], "at least 2"),
    (["--steps", "3", "--warmup", "3"], "warmup (3) must be smaller than steps (3)"),
    (["--model", "no-such-model"], "unknown model"),
    (["--data", "/no/such/file.txt"], "no such file"),
    (["--optim-args", "nope=1"], "optim_args key 'nope'"),
    (["--optim-args", "garbage"], "malformed optim_args"),
    (["--bf16", "--fp16"], "not allowed with"),
])
def test_bad_values_are_one_line_exit_2(capsys, tmp_path, argv, words):
    err = one_line_error(*bench(capsys, "--optim", "sgd", *argv, "--out", str(tmp_path / "r.jsonl")))
    assert words in err
    assert not (tmp_path / "r.jsonl").exists()


def test_removed_optimizer_exits_2(capsys):
    err = one_line_error(*bench(capsys, "--optim", "adamw_hf", "--no-save"))
    assert "adamw_torch" in err


def test_missing_package_is_skipped_with_the_pip_line(capsys, tmp_path, monkeypatch):
    spec = get_spec("lion_8bit")
    missing = dataclasses.replace(spec, cls="optimem_missing_pkg.Lion8bit", package="optimem-missing-pkg")
    monkeypatch.setitem(REGISTRY, "lion_8bit", missing)
    assert not missing.installed()
    out_file = tmp_path / "r.jsonl"
    code, out, err = bench(capsys, "--optim", "lion_8bit", "--out", str(out_file), "--json")
    assert code == 0, err
    record = json.loads(out)
    validate(record)
    assert record["status"] == "skipped"
    assert "pip install optimem-missing-pkg" in record["reason"]
    assert record["measured"] is None
    assert record["predicted"]["bytes"]["optimizer_state"] > 0
    assert list(read_records(out_file)) == [record]


def test_missing_package_table_says_so(capsys, monkeypatch):
    spec = get_spec("grokadamw")
    monkeypatch.setitem(REGISTRY, "grokadamw", dataclasses.replace(spec, cls="optimem_nope.GrokAdamW",
                                                                   package="optimem-nope"))
    code, out, _ = bench(capsys, "--optim", "grokadamw", "--no-save")
    assert code == 0
    assert "grokadamw on tiny-llama: skipped" in out and "pip install optimem-nope" in out


GPU_ONLY = [s.name for s in REGISTRY.values() if s.availability == "ok" and not s.runs_on_cpu]


@pytest.mark.parametrize("name", GPU_ONLY)
def test_cuda_only_optimizer_on_cpu_is_skipped_with_the_reason(name):
    spec = get_spec(name)
    cfg = RunConfig(optim=name, device="cpu", steps=2, warmup=1, dtype="bf16",
                    optim_target_modules="all-linear" if spec.needs_target_modules else None)
    record = execute(cfg, isolate=False)
    validate(record)
    assert record["status"] == "skipped"
    if spec.installed():
        assert "cannot run on CPU" in record["reason"] and spec.cpu_note in record["reason"]
    else:
        assert spec.install_line() in record["reason"]


def test_cuda_requested_without_cuda_is_skipped(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, _ = bench(capsys, "--optim", "sgd", "--device", "cuda", "--no-save", "--json")
    record = json.loads(out)
    assert code == 0 and record["status"] == "skipped" and "no CUDA device" in record["reason"]


def test_out_of_memory_in_process_keeps_what_was_measured():
    record = execute(RunConfig(optim="adamw_torch", steps=2, warmup=1), isolate=False, fault="oom@step0.optimizer_step")
    validate(record)
    assert record["status"] == "oom"
    assert record["reason"].startswith("out of memory in step0.optimizer_step:")
    assert record["detail"] is None  # no traceback for an OOM
    phases = record["measured"]["phases"]
    assert list(phases) == ["model_load", "setup", "step0.forward", "step0.backward", "step0.optimizer_step"]
    assert phases["step0.optimizer_step"]["interrupted"] is True
    assert phases["step0.backward"]["tensors"]["breakdown_at_end"]["gradients"] == record["measured"]["parameters_bytes"]


def test_other_errors_keep_the_traceback_in_detail():
    record = execute(RunConfig(optim="sgd", steps=2, warmup=1), isolate=False, fault="error@step0.forward")
    validate(record)
    assert record["status"] == "error"
    assert record["reason"].startswith("RuntimeError in step0.forward: simulated failure")
    assert "Traceback" in record["detail"]


def test_oom_classifier():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 1099511627776 bytes"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))
    with pytest.raises(RuntimeError) as info:
        torch.empty(2 ** 62, dtype=torch.uint8)
    assert is_oom(info.value)
