"""The GPU campaign: as much of the priority list as fits a time budget, one record appended per finished run.

    python -m optimem.harness.campaign --budget 480 --out DIR              # on the GPU machine
    python -m optimem.harness.campaign --budget 30 --out DIR --rehearse    # the same list on CPU, tiny models
    python -m optimem.harness.campaign --print-command --budget 480        # what to send to the GPU machine
    python -m optimem.harness.campaign --list [--rehearse]                 # the list, in order, nothing run

The list is :func:`optimem.harness.campaign_list.campaign_jobs`. Each run goes through the launcher as ``bench run``
does (:func:`optimem.harness.launcher.execute`, a worker forked from a zygote, its own timeout) and its record is
appended at once with :func:`optimem.harness.record.append_record` (whole lines only: a campaign cut off keeps every
run that finished) to ``DIR/<machine>-<date>.jsonl``. ``record["run"]["campaign"]`` adds the job, the budget, the
allocator configuration (``PYTORCH_CUDA_ALLOC_CONF``) and the estimate's figures beside the measurement
(:func:`estimate_section`). The measurement itself holds ``max_memory_allocated``/``reserved``, the allocator's
``memory_stats()`` and NVML device memory (``measured.peaks``).

Budget: the first runs are measured; every later run is predicted from them (:class:`CostModel`: the per-run
overhead plus a cost per unit of work, parameters x tokens) and skipped when it would not fit the time left, or when
its predicted device memory exceeds the GPU's. ``DIR/campaign.json`` says what ran, what was skipped and why.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimem.estimators import get_spec
from optimem.estimators.errors import UserError
from optimem.estimators.estimate import estimate
from optimem.harness.campaign_list import Job, campaign_jobs
from optimem.harness.env_facts import REPO_ROOT, package_version
from optimem.harness.launcher import check_config, execute, predict
from optimem.harness.process import worker_env
from optimem.harness.record import append_record
from optimem.harness.zygote import Zygote

DEVICE_LIMITS = {"device_seconds_total": 900, "seconds_per_command": 600, "files_back": 8,
                 "bytes_per_file": 16 * 2**20, "folders_deep": 2, "carried_bytes": 64 * 2**20}
"""The device tool's limits (its README): 15 minutes of device time in all (start-up, idle and every try counted),
10 minutes a command, at most 8 files back from $OUT, 16 MiB each, 2 folders deep, 64 MiB carried there."""
ALLOC_CONF = "expandable_segments:False"
"""The allocator configuration the campaign runs under (PyTorch's default, stated, so each record says it)."""
SAFETY = 1.25
"""A run starts only if SAFETY x its predicted seconds fit the time left."""
MIN_TIMEOUT_S = 60.0
PYTEST_SHARE = 0.3
"""Tier 1 (the CUDA tests) may take at most this share of the budget."""
GPU_EXTRA_DISTS = ("peft", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs", "rich",
                   "markdown-it-py", "mdurl", "platformdirs")
"""Distributions optimem needs that the GPU machine may lack (its README lists torch, transformers, accelerate,
pandas, matplotlib, nvidia-ml-py and pytest): added to ``wheels.sh`` as EXTRA_WHEELS at the versions tested here."""


# ----------------------------------------------------------------------------------------------------- sizing
def job_work(num_params: int, cfg: Any) -> float:
    """A run's work in parameter-tokens: parameters x tokens over all its steps (what its time grows with)."""
    return float(num_params) * cfg.batch_size * cfg.seq_len * cfg.grad_accum * cfg.steps


@dataclass
class CostModel:
    """Seconds per run = ``overhead`` + ``per_work`` x work. ``overhead``: the shortest run measured (fork, model
    build, trackers); ``per_work``: the largest (seconds - overhead) / work measured. Before the first run nothing
    is predicted (that run is measured); after one, half of it is taken as overhead. From the third run on, the
    first is left out: it pays what only a first run pays (imports, lazy kernel loading, the first trace)."""

    samples: list[tuple[float, float]] = field(default_factory=list)

    def observe(self, work: float, seconds: float) -> None:
        self.samples.append((max(work, 1.0), max(seconds, 0.0)))

    def _used(self) -> list[tuple[float, float]]:
        return self.samples[1:] if len(self.samples) >= 3 else self.samples

    def overhead(self) -> float | None:
        if not self.samples:
            return None
        if len(self.samples) == 1:
            return self.samples[0][1] / 2
        return min(s for _, s in self._used())

    def per_work(self) -> float:
        a = self.overhead() or 0.0
        return max(((s - a) / w for w, s in self._used()), default=0.0)

    def predict(self, work: float) -> float | None:
        a = self.overhead()
        return None if a is None else a + self.per_work() * work


# ----------------------------------------------------------------------------------------------------- machine
def gpu_facts() -> dict[str, Any]:
    """Name and total memory (bytes) of GPU 0 through NVML (no CUDA context in this process: runs are forked from
    a zygote that must not have one, and NVML's device figures would count it); {} without NVML or a GPU."""
    try:
        import pynvml  # lazy: pynvml is optional

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        return {"device_name": name.decode() if isinstance(name, bytes) else name,
                "total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)}
    except Exception:  # noqa: BLE001 - no NVML library, no driver, no GPU: the CPU case
        return {}


def machine_slug(facts: dict[str, Any], rehearse: bool) -> str:
    """``gpu-nvidia-h100-80gb-hbm3-2026-12-06`` (one records file per machine and date)."""
    name = "cpu-rehearsal" if rehearse else ("gpu-" + facts["device_name"] if facts else "no-gpu")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}-{_dt.datetime.now(_dt.timezone.utc).date().isoformat()}"


def estimate_section(predicted: dict[str, Any] | None) -> dict[str, Any]:
    """The estimate's figures the campaign judges (bytes): the tensor peak, the CUDA terms' allocated, reserved and
    device totals, and ``reserved_replayed``: the replayed caching allocator's reserved peak when the estimator
    offers one (issue 22; None until then)."""
    p = predicted or {}
    cuda = p.get("cuda") or {}
    replay = cuda.get("replayed") or {}
    return {"tensor_peak": (p.get("bytes") or {}).get("peak"), "peak_phase": p.get("peak_phase"),
            "peak_allocated": cuda.get("peak_allocated"), "peak_reserved": cuda.get("peak_reserved"),
            "peak_device": cuda.get("peak_device"), "cuda_calibrated": cuda.get("calibrated"),
            "reserved_replayed": cuda.get("replayed_peak_reserved", replay.get("peak_reserved")
                                          if isinstance(replay, dict) else None)}


def preflight(jobs: list[Job]) -> dict[str, Any]:
    """What can fail before any run, checked for every job at once: each configuration passes the checks ``bench
    run`` makes (:func:`optimem.harness.launcher.check_config`) and every optimizer class of the list imports from
    its package. Returns ``{"configs": n, "optimizers": {name: "ok" | why}, "problems": [line, ...]}``."""
    problems: list[str] = []
    optimizers: dict[str, str] = {}
    n = 0
    for job in jobs:
        if job.kind != "run" or job.config is None:
            continue
        n += 1
        try:
            check_config(job.config)
        except UserError as exc:
            problems.append(f"{job.name}: {exc}")
        name = job.config.optim
        if name in optimizers:
            continue
        spec = get_spec(name)
        module, _, attr = spec.cls.rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
            optimizers[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a missing wheel, a broken import: said, not raised
            optimizers[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            problems.append(f"{name}: {spec.cls} does not import ({optimizers[name]}); {spec.install_line()}")
    return {"configs": n, "optimizers": optimizers, "problems": problems}


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class Campaign:
    """Runs ``jobs`` in order within ``budget_s`` seconds (``clock``: seconds, monotonic), appending records to
    ``records_path`` and the campaign's account to ``summary_path``."""

    jobs: list[Job]
    budget_s: float
    out_dir: Path
    rehearse: bool = False
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    gpu: dict[str, Any] = field(default_factory=dict)
    isolate: bool = True
    """False: every run in this process (tests: no fork, no timeout), as ``bench run``'s in-process launcher."""
    executor: Callable[..., dict] | None = None
    """Stands in for :func:`optimem.harness.launcher.execute` (tests of the budget logic)."""
    cost: CostModel = field(default_factory=CostModel)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    preflight: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = self.out_dir / f"{machine_slug(self.gpu, self.rehearse)}.jsonl"
        self.summary_path = self.out_dir / "campaign.json"
        self._t0 = self.clock()

    def left(self) -> float:
        return self.budget_s - (self.clock() - self._t0)

    def run(self) -> dict[str, Any]:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
        self.preflight = preflight(self.jobs)
        for line in self.preflight["problems"]:
            self.log(f"campaign: preflight: {line}")
        # started after the preflight, whose imports may set environment variables (a zygote refuses runs whose
        # environment differs from its own); it imports in the background while the CUDA tests run
        zygote = Zygote() if self.isolate and self.executor is None else None
        if zygote is not None:
            threading.Thread(target=zygote.start, args=(worker_env(), os.getcwd()), name="campaign-zygote",
                             daemon=True).start()
        try:
            for job in self.jobs:
                self.outcomes.append(self._one(job, zygote))
                self._write_summary(done=False)
        finally:
            if zygote is not None:
                zygote.close()
            self._write_summary(done=True)
        return self.summary()

    def _one(self, job: Job, zygote) -> dict[str, Any]:
        out = {"job": job.name, "tier": job.tier, "kind": job.kind}
        if job.unresolved:
            return {**out, "outcome": "unresolved", "reason": job.unresolved}
        if self.left() <= 0:
            return {**out, "outcome": "skipped-budget", "reason": "the budget is spent"}
        if job.kind == "pytest":
            return {**out, **self._pytest(job)}
        return {**out, **self._run(job, zygote)}

    def _pytest(self, job: Job) -> dict[str, Any]:
        timeout = max(10.0, min(self.left(), self.budget_s * PYTEST_SHARE))
        log = self.out_dir / "cuda-tests.log"
        t = self.clock()
        with open(log, "wb") as fh:
            try:
                proc = subprocess.run([sys.executable, *job.argv], cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                      timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                code, how = proc.returncode, None
            except subprocess.TimeoutExpired:
                code, how = None, f"cut off after {timeout:.0f} s"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        outcome = "ok" if code == 0 else ("cut-off" if code is None else "failed")
        tally = {w.lower(): sum(f" {w}" in ln for ln in lines if "::" in ln) for w in ("PASSED", "FAILED", "SKIPPED",
                                                                                     "ERROR")}
        self.log(f"campaign: tier 1 CUDA tests: {outcome}: {last}")
        return {"outcome": outcome, "returncode": code, "reason": how or last, "tests": tally,
                "seconds": round(self.clock() - t, 2),
                "log": log.name, "command": shlex.join(["python", *job.argv])}

    def _run(self, job: Job, zygote) -> dict[str, Any]:
        cfg = job.config
        try:
            est = estimate(cfg)
        except UserError as exc:
            return {"outcome": "unresolved", "reason": str(exc)}
        work = job_work(est.num_params, cfg)
        predicted_s = self.cost.predict(work)
        left = self.left()
        if predicted_s is not None and predicted_s * SAFETY > left:
            return {"outcome": "skipped-budget", "predicted_s": round(predicted_s, 2),
                    "reason": f"predicted {predicted_s:.1f} s (x{SAFETY}) does not fit the {left:.1f} s left"}
        need = (est.cuda or {}).get("peak_device") or est.bytes.get("peak")
        total = self.gpu.get("total_bytes")
        if total and need and need > total:
            return {"outcome": "skipped-memory", "reason": f"predicted {need / 2**30:.1f} GiB on the device, more "
                                                           f"than its {total / 2**30:.1f} GiB"}
        timeout = max(MIN_TIMEOUT_S, 3 * predicted_s) if predicted_s is not None else left
        timeout = max(1.0, min(timeout, left))
        t = self.clock()
        run = self.executor or execute
        record = run(cfg, timeout_s=timeout, zygote=zygote) if self.isolate else run(cfg, isolate=False)
        seconds = self.clock() - t
        if zygote is not None and zygote.refusal and record["run"].get("launch") == "subprocess":
            self.log(f"campaign: this run started as a fresh process: {zygote.refusal}")
        if record["status"] not in ("skipped", "oom-predicted"):  # no worker started: nothing of a run's cost
            self.cost.observe(work, seconds)
        record["run"]["campaign"] = {
            "job": job.name, "tier": job.tier, "rehearsal": self.rehearse, "budget_s": self.budget_s,
            "left_before_s": round(left, 2), "predicted_s": None if predicted_s is None else round(predicted_s, 2),
            "work_param_tokens": work, "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "estimate": estimate_section(record.get("predicted") or predict(cfg)), "published": job.published}
        append_record(self.records_path, record)
        self.log(f"campaign: {job.name}: {record['status']} in {seconds:.1f} s"
                 + (f" ({record['reason']})" if record["reason"] else "") + f"; {self.left():.0f} s left")
        return {"outcome": record["status"], "reason": record["reason"], "seconds": round(seconds, 2),
                "predicted_s": None if predicted_s is None else round(predicted_s, 2), "run_id": record["run_id"]}

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
        return {"budget_s": self.budget_s, "spent_s": round(self.clock() - self._t0, 2), "rehearsal": self.rehearse,
                "gpu": self.gpu, "records": self.records_path.name, "counts": counts,
                "overhead_s": self.cost.overhead(), "seconds_per_param_token": self.cost.per_work(),
                "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "preflight": self.preflight,
                "jobs": self.outcomes}

    def _write_summary(self, *, done: bool) -> None:
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.summary(), "finished": done}, indent=1, default=str) + "\n")
        os.replace(tmp, self.summary_path)


# ----------------------------------------------------------------------------------------------------- sending
def extra_wheels() -> list[str]:
    """``dist==version`` for :data:`GPU_EXTRA_DISTS`, at the versions installed here (tested with this tree)."""
    return [f"{d}=={v}" for d in GPU_EXTRA_DISTS if (v := package_version(d))]


def wheels_script() -> str:
    """The shared ``shared/gpu/wheels.sh`` of the nearest folder above the repository that has one (the project's
    ``../shared/gpu/wheels.sh`` from a main checkout)."""
    for folder in REPO_ROOT.parents:
        if (folder / "shared" / "gpu" / "wheels.sh").is_file():
            return str(folder / "shared" / "gpu" / "wheels.sh")
    return "../shared/gpu/wheels.sh"


def device_command(budget_s: float) -> dict[str, Any]:
    """What to do here and what to send: the wheels step, the one device command (install line, environment,
    campaign) and the device tool's arguments (carry, timeout), within :data:`DEVICE_LIMITS`."""
    timeout = int(min(DEVICE_LIMITS["seconds_per_command"], budget_s + 90))
    wheels = REPO_ROOT / ".whl"
    whl_bytes = sum(f.stat().st_size for f in wheels.glob("*.whl")) if wheels.is_dir() else None
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
               "/tmp/site .whl/*.whl")
    command = (f"{install} && mkdir -p /tmp/pkg && ln -sfn \"$PWD\" /tmp/pkg/optimem && "
               "export PYTHONPATH=/tmp/site:/tmp/pkg OPTIMEM_CACHE_DIR=/tmp/optimem-cache "
               f"PYTORCH_CUDA_ALLOC_CONF={ALLOC_CONF} OMP_NUM_THREADS=8 || exit 1; "
               f"python3 -m optimem.harness.campaign --budget {int(budget_s)} --out \"$OUT\"")
    return {"here_first": f"EXTRA_WHEELS=\"{' '.join(extra_wheels())}\" bash {wheels_script()}  "
                          "# from the repository root; .whl/ must stay under the 64 MiB carried with the tree",
            "device_command": command, "carry": [".whl"], "timeout_s": timeout, "limits": DEVICE_LIMITS,
            "wheels_bytes": whl_bytes, "wheels_fit": None if whl_bytes is None else
            whl_bytes < DEVICE_LIMITS["carried_bytes"],
            "notes": ["the GPU machine runs Python 3.12, torch 2.11, transformers 5.17 and has no optimizer "
                      "packages and no index: everything comes from .whl/",
                      "one command, then give the machine back: start-up, idle and every try count against the "
                      "15 minutes",
                      "what comes back: DIR/<machine>-<date>.jsonl (records), campaign.json, cuda-tests.log "
                      "(3 files, 1 folder deep)",
                      "afterwards, on CPU: python -m optimem.harness.campaign_report RECORDS.jsonl "
                      "--markdown results/<machine>-<date>.md"]}


# ----------------------------------------------------------------------------------------------------- CLI
def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 480)") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive, finite number of seconds (e.g. 480)")
    return v


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit 2 (the project's bad-input rule)."""

    def error(self, message: str):  # one line, exit 2 (the project's bad-input rule)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m optimem.harness.campaign",
                description="Run the GPU campaign's priority list within a time budget (or rehearse it on CPU).")
    p.add_argument("--budget", type=_positive, required=True, help="seconds the whole campaign may take")
    p.add_argument("--out", help="folder for the records, campaign.json and the CUDA tests' log")
    p.add_argument("--rehearse", action="store_true", help="the same list on CPU with tiny models")
    p.add_argument("--list", action="store_true", help="print the list in order and stop")
    p.add_argument("--print-command", action="store_true", help="print what to send to the GPU machine and stop")
    args = p.parse_args(argv)
    if args.print_command:
        print(json.dumps(device_command(args.budget), indent=1))
        return 0
    jobs = campaign_jobs(args.rehearse)
    if args.list:
        for j in jobs:
            print(json.dumps(j.to_dict(), default=str))
        return 0
    if not args.out:
        p.error("--out is required to run (a folder; it is created)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a folder; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        p.error(f"--out {out}: cannot write there ({exc.strerror or exc}); give a writable folder")
    gpu = {} if args.rehearse else gpu_facts()
    if not args.rehearse and not gpu:
        print("campaign: no GPU seen through NVML: runs go to CUDA and will be recorded as skipped; "
              "use --rehearse on a CPU machine", file=sys.stderr)
    summary = Campaign(jobs, args.budget, out, rehearse=args.rehearse, gpu=gpu).run()
    print(json.dumps({k: v for k, v in summary.items() if k != "jobs"}, default=str))
    return 0


__all__ = ["ALLOC_CONF", "DEVICE_LIMITS", "Campaign", "CostModel", "OneLineParser", "device_command",
           "estimate_section", "gpu_facts", "job_work", "machine_slug", "main", "preflight", "wheels_script"]

if __name__ == "__main__":
    sys.exit(main())
