"""Run one configuration and return its record: checks, then a worker process per run.

:func:`execute` is the whole path ``bench run`` takes: it checks what can be decided without running
(optimizer known and available, package installed, device able to run it), computes the prediction,
starts ``python -m optimem.harness.worker`` in its own session with a per-run timeout, and assembles the
validated record. A worker that crashes, runs out of memory, hangs or is killed never takes the caller
down: the caller gets a record with status ``oom`` or ``error`` instead. The caller appends the record
(:func:`optimem.harness.record.append_record`); the worker never touches the results file, so a killed worker
cannot leave a partial line. Given a :class:`optimem.harness.zygote.Zygote` (``bench sweep`` passes one), the
worker is forked from that already-imported process instead of started fresh: the same process boundary,
session, timeout and log, without paying the imports per run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from optimem.estimators import get_spec
from optimem.estimators.errors import TraceFailure, UserError
from optimem.estimators.estimate import estimate
from optimem.estimators.peft_model import cpu_run_limit
from optimem.harness.contract import RUN_DIR_ENV, RUN_DIR_PREFIX, WorkerOutcome, read_result, write_job
from optimem.harness.distributed.launch import launch as torchrun_launch, unsupported_reason
from optimem.harness.distributed.report import section
from optimem.harness.distributed.schemes import is_distributed
from optimem.harness.env_facts import collect_env
from optimem.harness.process import kill_group, signal_name, spawn, tail as log_tail, wait, worker_env
from optimem.harness.record import build_record, validate
from optimem.harness.run_config import RunConfig
from optimem.estimators.packing import packed_seq_len, padded_worst, samples, worst_micro_batch

if TYPE_CHECKING:
    from optimem.harness.zygote import Zygote

DEFAULT_TIMEOUT_S = 1200.0


def check_config(cfg: RunConfig) -> None:
    """Raise UserError for a configuration that is wrong whatever the machine (exit 2 in the CLI). The
    setup validated its own fields when it was built; what is left is what the Trainer refuses and what a
    measured run needs (an available optimizer, warmup steps shorter than the run)."""
    spec = get_spec(cfg.optim)
    if spec.availability == "removed":
        raise UserError(spec.reason)
    cfg.check_trainable()  # the setup's checks and the run's (RunConfig.check_trainable)


def predict(cfg: RunConfig) -> dict[str, Any] | None:
    """``estimate(cfg).to_dict()`` (None for an optimizer optimem cannot estimate)."""
    spec = get_spec(cfg.optim)
    if spec.availability != "ok":
        return None
    # The whole setup goes to the estimator (checkpointing, mixed precision, accumulation, the device the
    # run resolves to), so the record's prediction is for the very run it sits beside.
    if cfg.padding_free and cfg.data:
        # the worst micro-batch the file's samples can make, packed (optimem.estimators.packing)

        worst = worst_micro_batch([len(x) for x in samples(cfg.data, cfg.seq_len)], cfg.batch_size)
        cfg = replace(cfg, seq_len=packed_seq_len(worst, cfg.batch_size))
        out = estimate(replace(cfg, device=resolve_device(cfg))).to_dict()
        out["notes"].append(f"padding-free: predicted for the worst micro-batch of {cfg.data}, {worst} tokens "
                            f"({cfg.batch_size} x {cfg.seq_len} packed)")
        return out
    if cfg.group_by_length and cfg.data:
        # pad to longest: the worst micro-batch is batch x the file's longest sample (optimem.estimators.packing)
        rows, seq = padded_worst([len(x) for x in samples(cfg.data, cfg.seq_len)], cfg.batch_size)
        cfg = replace(cfg, batch_size=rows, seq_len=seq)
        out = estimate(replace(cfg, device=resolve_device(cfg))).to_dict()
        out["notes"].append(f"group-by-length: predicted for the worst micro-batch of {cfg.data}, {rows} x {seq} "
                            "padded to its longest sample")
        return out
    return estimate(replace(cfg, device=resolve_device(cfg))).to_dict()


def cuda_available() -> bool:
    """Whether a CUDA device can be used (does not create a CUDA context)."""
    import torch  # lazy: the parent of a sweep imports torch only when asked (bench estimate stays torch-free)

    return torch.cuda.is_available()


def skip_reason(cfg: RunConfig, device: str) -> str | None:
    """Why ``cfg`` cannot run on ``device`` here (None if it can)."""
    spec = get_spec(cfg.optim)
    if spec.availability != "ok":
        return spec.reason
    if not spec.installed():
        return f"{spec.name} needs the package '{spec.import_name}', which is not installed: {spec.install_line()}"
    if device == "cuda" and not cuda_available():
        return "CUDA was requested (--device cuda) but no CUDA device is available"
    if device == "cpu" and not spec.runs_on_cpu:
        note = spec.cpu_note or "it needs CUDA"
        return f"{spec.name} cannot run on CPU: {note}"
    if device == "cpu" and cfg.peft:
        reason = cpu_run_limit(cfg)
        if reason:
            return reason
    return unsupported_reason(cfg)


def resolve_device(cfg: RunConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return cfg.device


class Launcher(Protocol):
    """How a run's worker starts: :meth:`launch` runs ``cfg`` and returns its :class:`WorkerOutcome`."""

    def launch(self, cfg: RunConfig, *, timeout_s: float, fault: str | None, track_tensors: bool | None,
               on_start: Callable[[subprocess.Popen], None] | None) -> WorkerOutcome: ...


class InProcessLauncher:
    """This process (tests, debugging): no isolation, no timeout."""

    def launch(self, cfg, *, timeout_s=None, fault=None, track_tensors=None, on_start=None) -> WorkerOutcome:
        return run_in_process(cfg, fault=fault, track_tensors=track_tensors)


@dataclass
class SubprocessLauncher:
    """A worker process of its own session: forked from ``zygote`` when given and able, else a fresh
    ``python -m optimem.harness.worker`` (see :func:`run_isolated`)."""

    zygote: Zygote | None = None

    def launch(self, cfg, *, timeout_s=DEFAULT_TIMEOUT_S, fault=None, track_tensors=None,
               on_start=None) -> WorkerOutcome:
        return run_isolated(cfg, timeout_s=timeout_s, fault=fault, track_tensors=track_tensors, on_start=on_start,
                            zygote=self.zygote)


class TorchrunLauncher:
    """``cfg.num_processes`` ranks under torchrun (:func:`optimem.harness.distributed.launch.launch`)."""

    def launch(self, cfg, *, timeout_s=DEFAULT_TIMEOUT_S, fault=None, track_tensors=None,
               on_start=None) -> WorkerOutcome:
        return torchrun_launch(cfg, timeout_s=timeout_s, fault=fault, track_tensors=track_tensors, on_start=on_start)


def choose_launcher(cfg: RunConfig, *, isolate: bool = True, zygote: Zygote | None = None) -> Launcher:
    """torchrun for a multi-process run (always isolated), else a worker process (forked from ``zygote`` when
    given), else this process (``isolate=False``)."""
    if int(getattr(cfg, "num_nodes", 1) or 1) > 1:
        raise UserError(f"--nnodes {cfg.num_nodes}: a run over several nodes starts through Slurm (srun + torchrun "
                        "per node): bench run --executor slurm, or a sweep with --executor slurm")
    if is_distributed(cfg):
        return TorchrunLauncher()
    return SubprocessLauncher(zygote) if isolate else InProcessLauncher()


def run_isolated(cfg: RunConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S, fault: str | None = None,
                 track_tensors: bool | None = None, on_start: Callable[[subprocess.Popen], None] | None = None,
                 log_path: str | None = None, command: list[str] | None = None,
                 zygote: Zygote | None = None) -> WorkerOutcome:
    """Run ``cfg`` in a worker process of its own session: forked from ``zygote`` (a
    :class:`optimem.harness.zygote.Zygote`) when given and able, else a fresh ``python -m optimem.harness.worker``.

    The worker's output goes to a log file (its tail is kept for errors). On timeout the worker's whole
    process group is terminated, then killed. Ctrl-C (KeyboardInterrupt) kills the worker and re-raises.
    ``command`` replaces ``[python, -m, optimem.harness.worker]`` (the job and result paths are appended): tests use
    it to stand in a worker that hangs or crashes.
    """
    # ignore_cleanup_errors: a worker whose parent died removes the folder itself (see optimem.harness.worker)
    with tempfile.TemporaryDirectory(prefix=RUN_DIR_PREFIX, ignore_cleanup_errors=True) as tmp:
        tmpdir = Path(tmp)
        job = tmpdir / "job.json"
        result = tmpdir / "result.json"
        log = Path(log_path) if log_path else tmpdir / "worker.log"
        write_job(job, cfg.to_dict(), fault=fault, track_tensors=track_tensors, parent_pid=os.getpid())
        env = worker_env()
        env[RUN_DIR_ENV] = str(tmpdir)
        start = time.perf_counter()
        with open(log, "wb") as logfh:
            proc, launch = None, "subprocess"
            try:
                if zygote is not None and command is None:
                    proc = zygote.spawn([str(job), str(result)], log=log, env=env, cwd=os.getcwd())
                    launch = "zygote" if proc is not None else launch
                if proc is None:
                    argv = list(command or [sys.executable, "-m", "optimem.harness.worker"]) + [str(job), str(result)]
                    proc = spawn(argv, logfh, env)
                if on_start is not None:
                    on_start(proc)
            except BaseException:
                if proc is not None:
                    kill_group(proc)
                raise
            timed_out = wait(proc, timeout_s)
        duration = time.perf_counter() - start
        tail = log_tail(log)
        payload = read_result(result)
        if timed_out:  # a worker stopped by the SIGTERM writes what it measured until then (worker.CutOff)
            kept = payload if payload is not None and payload.get("measured") else None
            payload = {"status": "error", "measured": None, "device_facts": {}, "detail": tail or None, **(kept or {}),
                       "reason": f"timed out after {timeout_s:g} s (the worker was killed" +
                                 ("; what it measured until then is kept)" if kept else ")")}
            return WorkerOutcome(payload, proc.returncode, duration, tail, launch)
        if payload is not None:
            return WorkerOutcome(payload, proc.returncode, duration, tail, launch)
        code = proc.returncode
        if getattr(proc, "lost", False):
            payload = {"status": "error", "reason": "the zygote process the run was forked from died before the "
                                                    "run ended", "measured": None, "device_facts": {},
                       "detail": tail or None}
        elif code is not None and code < 0 and -code == signal.SIGKILL:
            payload = {"status": "oom", "reason": "the worker was killed by SIGKILL before it finished, most likely "
                                                  "by the kernel's out-of-memory killer", "measured": None,
                       "device_facts": {}, "detail": tail or None}
        else:
            how = f"died with {signal_name(code)}" if code is not None and code < 0 else f"exited with code {code}"
            last = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
            payload = {"status": "error", "reason": f"the worker {how} without a result" +
                                                    (f": {last[:200]}" if last else ""),
                       "measured": None, "device_facts": {}, "detail": tail or None}
        return WorkerOutcome(payload, code, duration, tail, launch)


def run_in_process(cfg: RunConfig, *, fault: str | None = None, track_tensors: bool | None = None) -> WorkerOutcome:
    """Run ``cfg`` in this process (tests, debugging): no isolation, no timeout."""
    from optimem.harness.worker import run_measured  # lazy: torch and transformers, only for in-process runs

    start = time.perf_counter()
    payload = run_measured(cfg, fault=fault, track_tensors=track_tensors)
    return WorkerOutcome(json.loads(json.dumps(payload, default=str)), 0, time.perf_counter() - start)


def execute(cfg: RunConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S, isolate: bool = True, fault: str | None = None,
            track_tensors: bool | None = None, on_start: Callable[[subprocess.Popen], None] | None = None,
            zygote: Zygote | None = None, launcher: Launcher | None = None) -> dict:
    """Check, predict, run and record ``cfg``; returns the validated record (not yet appended).

    ``zygote``: fork the worker from this :class:`optimem.harness.zygote.Zygote` (see :func:`run_isolated`).
    ``launcher``: how the run starts (default :func:`choose_launcher`'s; a multi-node run passes
    :class:`optimem.harness.multinode.SrunLauncher`).
    UserError for a configuration that can never run (unknown optimizer, bad values, unknown model).
    """
    spec = get_spec(cfg.optim)
    check_config(cfg)
    estimate_error = None
    try:
        predicted = predict(cfg)
    except TraceFailure as exc:  # the estimate failed, not the input: the real job still runs and is reported
        predicted, estimate_error = None, str(exc)
    device = resolve_device(cfg)
    env = collect_env(device, spec)
    run_meta: dict[str, Any] = {"isolated": isolate, "timeout_s": timeout_s if isolate else None,
                                "resolved_device": device}
    if estimate_error:
        run_meta["estimate_error"] = estimate_error
    reason = skip_reason(cfg, device)
    if reason is not None:
        record = build_record(config=cfg.to_dict(), status="skipped", reason=reason, measured=None,
                              predicted=predicted, env=env, run={**run_meta, "duration_s": 0.0})
        validate(record)
        return record
    outcome = (launcher or choose_launcher(cfg, isolate=isolate, zygote=zygote)).launch(
        cfg, timeout_s=timeout_s, fault=fault, track_tensors=track_tensors, on_start=on_start)
    payload = outcome.payload
    env.update({k: v for k, v in (payload.get("device_facts") or {}).items() if v is not None and k != "device"})
    run_meta.update({"duration_s": round(outcome.duration_s, 3), "returncode": outcome.returncode,
                     "launch": outcome.launch})
    status = payload.get("status", "error")
    measured = payload.get("measured")
    if status == "ok" and not measured:
        status, payload["reason"] = "error", "the worker reported success without measurements"
    record = build_record(config=cfg.to_dict(), status=status, reason=payload.get("reason") or "",
                          measured=measured, predicted=predicted, env=env, run=run_meta,
                          detail=payload.get("detail"),
                          distributed=section(cfg, payload, timeout_s=timeout_s, device=device, predicted=predicted))
    validate(record)
    return record


__all__ = ["DEFAULT_TIMEOUT_S", "InProcessLauncher", "Launcher", "SubprocessLauncher", "TorchrunLauncher", "check_config", "choose_launcher",
           "cuda_available", "execute", "predict", "resolve_device", "run_in_process", "run_isolated", "skip_reason"]
