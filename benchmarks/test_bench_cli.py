"""Speed of the ``bench`` command line as a user meets it: whole new processes, imports included.

Every figure is measured beside the baseline ``python -c "import torch"``, run interleaved with it (one
baseline run before each timed round, untimed), so the ratio holds on a noisy machine. Goals (issue 14):

- ``bench estimate`` (one model, one optimizer), cache warm: < 0.5 s and < 0.5x ``import torch``;
- ``bench estimate --optim all`` and ``bench plan --gpus all`` of a cached 8B model: < 1.5 s;
- a 12-run CPU sweep of tiny-llama: per-run overhead (the time between two runs' records minus the job time
  the record holds, ``measured.wall_time_s``) < 1.5 s median; the same sweep with ``--no-fork`` (a fresh
  ``python -m optimem.harness.worker`` per run, as before the zygote) is measured in the same session.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = "meta-llama/Meta-Llama-3-8B"
BENCH = [sys.executable, "-m", "optimem.harness.cli"]
SWEEP_OPTIMS = ["adamw_torch", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_bnb_8bit"]
SWEEP_SHAPES = ["2x64", "4x128"]


def _env(**extra) -> dict[str, str]:
    """This environment, as a user's: optimem importable, and Python writing its bytecode caches (a
    ``PYTHONDONTWRITEBYTECODE`` here would make every process recompile optimem's sources, ~0.1 s, which no
    installed package pays; torch's come compiled)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra)
    return env


def _run(cmd: list[str], **env) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=_env(**env))
    return time.perf_counter() - t0


class Baseline:
    """``python -c "import torch"``, run (untimed by pytest-benchmark) before each timed round."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self) -> None:
        self.times.append(_run([sys.executable, "-c", "import torch"]))

    def record(self, benchmark) -> None:
        base = statistics.median(self.times)
        benchmark.extra_info["baseline_import_torch_s"] = base
        benchmark.extra_info["baseline_runs"] = self.times
        benchmark.extra_info["ratio_to_import_torch"] = benchmark.stats.stats.median / base


def _timed(benchmark, argv: list[str], rounds: int = 5, **env) -> None:
    base = Baseline()
    benchmark.pedantic(_run, args=(argv,), kwargs=env, setup=base, rounds=rounds, iterations=1)
    base.record(benchmark)


@pytest.fixture(scope="module")
def warm_cache():
    """The on-disk cache filled by one run of each command (the session's own cache directory), and the
    bytecode of every module they import written."""
    for argv in (["estimate", "--model", LLAMA3, "--optim", "all"], ["plan", "--model", LLAMA3, "--gpus", "all"],
                 ["sweep", "--optim", "sgd", "--shape", "1x8", "--dry-run"]):
        _run([*BENCH, *argv])


def test_import_torch_baseline(benchmark):
    benchmark.pedantic(_run, args=([sys.executable, "-c", "import torch"],), rounds=5, iterations=1)


def test_cli_estimate_warm(benchmark, warm_cache):
    _timed(benchmark, [*BENCH, "estimate", "--model", LLAMA3, "--optim", "adamw_torch"])


def test_cli_estimate_cold(benchmark, warm_cache):
    """The same command with the cache off: every import and the simulation, as before the cache."""
    _timed(benchmark, [*BENCH, "estimate", "--model", LLAMA3, "--optim", "adamw_torch", "--no-cache"], rounds=3)


def test_cli_estimate_all_warm(benchmark, warm_cache):
    _timed(benchmark, [*BENCH, "estimate", "--model", LLAMA3, "--optim", "all"])


def test_cli_plan_all_warm(benchmark, warm_cache):
    _timed(benchmark, [*BENCH, "plan", "--model", LLAMA3, "--gpus", "all"])


def _sweep(out: Path, *extra: str) -> dict:
    """One 12-run sweep; the time each record's line appeared, and what the records say."""
    argv = [*BENCH, "sweep", "--optim", *SWEEP_OPTIMS, "--shape", *SWEEP_SHAPES, "--device", "cpu",
            "--progress", "lines", "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stamps = []
    for line in proc.stderr:
        if line.lstrip().startswith("["):  # "[ 3/12] ok ..." : one finished run
            stamps.append(time.perf_counter() - t0)
    assert proc.wait() == 0
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(stamps) == len(SWEEP_OPTIMS) * len(SWEEP_SHAPES)
    jobs = [r["measured"]["wall_time_s"] for r in records]
    per_run = [t - prev - job for t, prev, job in zip(stamps, [0.0, *stamps[:-1]], jobs)]
    return {"wall_s": wall, "job_s": jobs, "overhead_s": per_run, "median_overhead_s": statistics.median(per_run),
            "mean_overhead_s": (wall - sum(jobs)) / len(jobs), "launch": sorted({r["run"]["launch"] for r in records}),
            "statuses": sorted({r["status"] for r in records})}


@pytest.mark.parametrize("mode", ["fork", "no_fork"])
def test_sweep_12_runs_overhead(benchmark, tmp_path, warm_cache, mode):
    """benchmark stats: the whole sweep's wall time; extra_info: per-run overhead (median is the goal), the
    mean including the sweep's one-off start (imports, the zygote), and how the runs were launched."""
    extra = ["--no-fork"] if mode == "no_fork" else []
    results: list[dict] = []
    base = Baseline()

    def once():
        out = tmp_path / f"sweep-{len(results)}.jsonl"
        results.append(_sweep(out, *extra))

    benchmark.pedantic(once, setup=base, rounds=1, iterations=1)
    base.record(benchmark)
    r = results[-1]
    assert r["statuses"] == ["ok"] and r["launch"] == (["subprocess"] if mode == "no_fork" else ["zygote"])
    benchmark.extra_info.update(r)
