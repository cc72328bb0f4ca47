"""`bench run` end to end: a worker process per run, one record per run appended whole, and a run that
crashes, runs out of memory, hangs or is interrupted never takes the caller down nor tears the results file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from optimem.harness.cli import main
from optimem.harness.launcher import run_isolated
from optimem.harness.record import read_records, validate
from optimem.harness.scenario import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def bench(capsys, *argv):
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.slow


def test_readme_command_prints_a_readable_result(capsys, tmp_path):
    out_file = tmp_path / "runs.jsonl"
    code, out, err = bench(capsys, "--optim", "adamw_bnb_8bit", "--out", str(out_file))
    assert code == 0, out + err
    assert "adamw_bnb_8bit on tiny-llama: ok" in out
    for words in ("optimizer state", "measured", "predicted", "model load", "forward", "backward",
                  "optimizer step", "samples/s", "tokens/s", f"record appended to {out_file}"):
        assert words in out, words
    assert "Traceback" not in out + err
    (record,) = list(read_records(out_file))
    validate(record)
    assert record["status"] == "ok" and record["config"]["optim"] == "adamw_bnb_8bit"
    assert record["measured"]["optimizer_state_bytes"] == record["predicted"]["bytes"]["optimizer_state"]
    assert record["env"]["optimizer_package"]["name"] == "bitsandbytes"
    assert record["env"]["optimizer_package"]["version"]
    assert record["run"]["isolated"] is True and record["run"]["returncode"] == 0
    # default steps/warmup: the timed steps ran without the tensor accountant
    assert record["measured"]["throughput"]["measured_steps"] == 4
    assert record["measured"]["tracker"]["tensor_tracked_steps"] == 2


@pytest.mark.slow


def test_json_record_with_accumulation_checkpointing_and_autocast(capsys, tmp_path):
    out_file = tmp_path / "runs.jsonl"
    out_file.write_text("")
    code, out, err = bench(capsys, "--optim", "adamw_torch", "--steps", "2", "--warmup", "1", "--grad-accum", "2",
                           "--gradient-checkpointing", "--bf16", "--batch-size", "1", "--seq-len", "32",
                           "--out", str(out_file), "--json")
    assert code == 0, err
    record = json.loads(out)
    validate(record)
    assert [json.loads(x) for x in lines(out_file)] == [record]
    c = record["config"]
    assert (c["grad_accum"], c["gradient_checkpointing"], c["mixed_precision"], c["batch_size"], c["seq_len"]) == \
        (2, True, "bf16", 1, 32)
    m = record["measured"]
    assert m["phases"]["step0.forward"]["occurrences"] == 2  # two micro-batches, folded into one phase
    assert m["optimizer_state_bytes"] == record["predicted"]["bytes"]["optimizer_state"]
    assert m["throughput"]["samples_per_step"] == 2 and m["throughput"]["tokens_per_step"] == 64


@pytest.mark.slow


def test_out_of_memory_is_a_status_not_a_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMEM_FAULT", "oom@step0.backward")
    out_file = tmp_path / "runs.jsonl"
    code, out, err = bench(capsys, "--optim", "sgd", "--steps", "2", "--warmup", "1", "--out", str(out_file))
    assert code == 3
    assert "Traceback" not in out + err
    assert "OUT OF MEMORY" in out
    assert err.strip().count("\n") == 0 and "out of memory in step0.backward" in err
    (record,) = list(read_records(out_file))
    validate(record)
    assert record["status"] == "oom" and record["detail"] is None
    assert record["config"]["optim"] == "sgd" and record["config"]["steps"] == 2
    phases = record["measured"]["phases"]
    assert phases["step0.backward"]["interrupted"] is True
    assert phases["step0.forward"]["peak_bytes"] > phases["model_load"]["end_bytes"] > 0


def _fake(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.slow


def test_timeout_kills_the_worker_and_its_children():
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            "print(p.pid, flush=True); time.sleep(600)")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"optimem-timeout-{os.getpid()}.log"
    started = time.perf_counter()
    outcome = run_isolated(RunConfig(), timeout_s=3, command=_fake(code), log_path=str(log))
    assert time.perf_counter() - started < 20
    assert outcome.payload["status"] == "error"
    assert outcome.payload["reason"].startswith("timed out after 3 s")
    grandchild = int(log.read_text().split()[0])
    time.sleep(0.5)
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    log.unlink()


def test_crashing_worker_is_an_error_record():
    outcome = run_isolated(RunConfig(), timeout_s=60,
                           command=_fake("import os, signal; print('boom'); os.kill(os.getpid(), signal.SIGSEGV)"))
    assert outcome.payload["status"] == "error"
    assert "SIGSEGV" in outcome.payload["reason"]
    outcome = run_isolated(RunConfig(), timeout_s=60, command=_fake("import sys; print('bad'); sys.exit(7)"))
    assert outcome.payload["status"] == "error" and "code 7" in outcome.payload["reason"] and "bad" in \
        outcome.payload["reason"]


def test_worker_killed_by_sigkill_counts_as_oom():
    outcome = run_isolated(RunConfig(), timeout_s=60,
                           command=_fake("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert outcome.payload["status"] == "oom"
    assert "out-of-memory killer" in outcome.payload["reason"]


def _start_bench(out_file: Path) -> subprocess.Popen:
    env = dict(os.environ, OPTIMEM_FAULT="hang@step0.forward",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "optimem.harness.cli", "run", "--optim", "sgd", "--steps", "2",
                             "--warmup", "1", "--out", str(out_file)], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_worker(proc: subprocess.Popen, timeout: float = 120.0) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "optimem.harness.worker" in " ".join(child.cmdline()):
                    time.sleep(1.0)
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError("the worker never started")


def _gone(p: psutil.Process, timeout: float = 15.0) -> bool:
    try:
        p.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_run_leaves_whole_lines_only(tmp_path, how):
    out_file = tmp_path / "runs.jsonl"
    out_file.write_text('{"earlier": "record"}\n')
    proc = _start_bench(out_file)
    try:
        worker = _wait_for_worker(proc)
        os.kill(proc.pid, signal.SIGINT if how == "sigint" else signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if how == "sigint":
            assert proc.returncode == 130
            assert b"interrupted" in err and b"Traceback" not in err
        # the worker never outlives its launcher, and the file has only whole lines (here: the old one)
        assert _gone(worker), "worker still running"
        assert out_file.read_text() == '{"earlier": "record"}\n'
    finally:
        if proc.poll() is None:
            proc.kill()
