"""Sweeps fork every run from a zygote that imported torch, transformers and the optimizer packages once
(harness/zygote.py), and a forked run is still a process of its own: a crash takes only it down, a hang is
killed by the timeout with everything it started, the records are exact, and nothing outlives the sweep."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest

from optimem.estimators import cache
from optimem.harness.cli import main
from optimem.harness.launcher import run_isolated
from optimem.harness.process import worker_env
from optimem.harness.record import read_records, validate
from optimem.harness.scenario import RunConfig
from optimem.harness.zygote import Zygote, preload_modules

pytestmark = pytest.mark.slow  # real Trainer runs or processes throughout: the inner loop (-m 'not slow') skips this file

ROOT = Path(__file__).resolve().parents[2]


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pids: set[int], timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_sweep_runs_are_forked_and_still_isolated(tmp_path, capsys):
    out = tmp_path / "sweep.jsonl"
    before = _descendants()
    code = main(["sweep", "--optim", "sgd", "adamw_torch", "--shape", "1x16", "--steps", "2", "--warmup", "1",
                 "--fault", "sgd=crash@step0.forward", "--out", str(out), "--progress", "none", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1  # a run ended in an error, and the sweep went on
    records = {r["config"]["optim"]: r for r in read_records(out)}
    for rec in records.values():
        validate(rec)
        assert rec["run"]["launch"] == "zygote", rec["run"]
    crash, ok = records["sgd"], records["adamw_torch"]
    assert crash["status"] == "error" and "SIGSEGV" in crash["reason"] and crash["run"]["returncode"] == -11
    # the run after the crash was forked from the same zygote and measured exactly
    assert ok["status"] == "ok" and ok["measured"]["optimizer_state_bytes"] == ok["predicted"]["bytes"]["optimizer_state"]
    assert ok["measured"]["phases"]["steady.optimizer_step"]["occurrences"] == 1
    assert summary["counts"] == {"error": 1, "ok": 1}
    # the zygote and every run are gone once the sweep returns
    assert _gone(_descendants() - before), "a zygote or a forked run outlived the sweep"


def test_a_module_that_initialises_cuda_is_left_to_the_run(tmp_path, monkeypatch):
    """A zygote reporting that a preloaded module initialised CUDA is replaced by one that does not import it,
    and the launcher remembers that (the next zygote does not try again). A forked run that hangs is killed by
    its timeout."""
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "cache"))
    assert "bitsandbytes.optim" in preload_modules()
    fake = tmp_path / "fake_zygote.py"
    fake.write_text(
        "import json, os, sys\n"
        f"open({str(tmp_path / 'starts')!r}, 'a').write(os.environ.get('OPTIMEM_ZYGOTE_EXCLUDE', '') + '\\n')\n"
        "if 'bitsandbytes.optim' not in os.environ.get('OPTIMEM_ZYGOTE_EXCLUDE', '').split(','):\n"
        "    print(json.dumps({'event': 'poisoned', 'module': 'bitsandbytes.optim'}), flush=True)\n"
        "    sys.exit(4)\n"
        "from optimem.harness.zygote import serve\n"
        "sys.exit(serve())\n")
    cfg = RunConfig(optim="adamw_bnb_8bit", device="cpu", steps=2, warmup=1, batch_size=1, seq_len=16)
    started = []
    with Zygote(command=[sys.executable, str(fake)]) as z:
        outcome = run_isolated(cfg, timeout_s=120, zygote=z)
        assert z.excluded == ["bitsandbytes.optim"] and "bitsandbytes.optim" not in z.preloaded
        assert "torch" in z.preloaded and "transformers.trainer" in z.preloaded
        t0 = time.perf_counter()
        hung = run_isolated(cfg, timeout_s=3, zygote=z, fault="hang@step0.forward", on_start=started.append)
        assert time.perf_counter() - t0 < 20
    assert hung.launch == "zygote" and hung.payload["status"] == "error"
    assert hung.payload["reason"].startswith("timed out after 3 s") and hung.returncode == -15
    assert "model_load" in hung.payload["measured"]["phases"]  # a cut-off run keeps what it measured
    assert _gone({started[0].pid}, timeout=5)
    assert outcome.launch == "zygote" and outcome.payload["status"] == "ok", outcome.payload
    assert outcome.payload["measured"]["optimizer_state"]["total"] > 0  # bitsandbytes imported by the run itself
    assert (tmp_path / "starts").read_text().splitlines() == ["", "bitsandbytes.optim"]
    # learned: the next zygote on this machine starts without it at once
    assert cache.get(Zygote()._exclusions_key(worker_env())) == ["bitsandbytes.optim"]


@pytest.mark.gpu
def test_cuda_runs_fork_from_a_zygote_without_cuda(tmp_path):
    """On a CUDA machine: the zygote preloads without initialising CUDA (leaving out what would), and a
    forked CUDA run initialises its own context and is measured."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with Zygote(log_path=tmp_path / "zygote.log") as z:
        outcomes = [run_isolated(RunConfig(optim=o, device="cuda", steps=2, warmup=1), timeout_s=300, zygote=z)
                    for o in ("adamw_torch", "adamw_bnb_8bit")]
        assert z.failure is None, (tmp_path / "zygote.log").read_text()[-3000:]
    for o in outcomes:
        assert o.launch == "zygote" and o.payload["status"] == "ok", o.payload
        assert o.payload["measured"]["peaks"]["max_memory_allocated"] > 0
