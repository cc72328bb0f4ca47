"""``bench sweep --executor slurm``: one Slurm job per configuration, through submitit.

:class:`SlurmRun` is what a job runs on its node: the fit check there (:mod:`optimem.harness.fit`, against
that node's memory), then :func:`optimem.harness.launcher.execute` (a worker process with its timeout, as a
local run), and it returns the whole record, with ``env.slurm`` naming the job, array task, node and attempt.
It is ``submitit.helpers.Checkpointable``: a preempted or timed-out job is requeued by submitit and runs the
configuration again from the start (a run holds no state worth keeping), so a partial record never exists —
the record only leaves the job as its return value.

:class:`SlurmExecutor` (the :class:`optimem.harness.executors.Executor` of the sweep) submits a job per
configuration, follows its state (``sacct``, as submitit reads it; forced every ``poll_s`` seconds), reports
queued/running/done/failed, and turns a job that ended without a record (``scancel``, node failure, the
kernel's or Slurm's OOM killer, a time limit after its requeues) into one ``error`` (``oom`` for
``OUT_OF_MEMORY``) record whose reason names the job, its state and its node. :meth:`SlurmExecutor.cancel_all`
(Ctrl-C) cancels every job it submitted that has not finished.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from optimem.estimators.errors import UserError
from optimem.harness.grid import config_label, record_key
from optimem.harness.record import build_record, validate
from optimem.harness.launcher import execute, resolve_device
from optimem.harness.fit import refusal_record
from optimem.estimators import get_spec
from optimem.harness.env_facts import collect_env
from optimem.harness.multinode import SrunLauncher, agents_per_node

QUEUED = ("PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "UNKNOWN",
          "PREEMPTED")
RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT")
DONE = ("COMPLETED", "FINISHED")
KILL_WAIT_S = 600.0
"""How long a job told to stop (SIGTERM) waits for Slurm's SIGKILL before it returns its record anyway."""


@dataclass
class SlurmSettings:
    """What every job asks Slurm for. ``time_min``: the job's time limit (minutes; default: the run's
    timeout plus 5 minutes); ``extra``: any other ``#SBATCH`` option (``--slurm-extra KEY=VALUE``:
    ``mem=8G``, ``constraint=a100``, ``cpus_per_task=4``...); ``folder``: submitit's job files and logs."""

    folder: Path
    partition: str | None = None
    gpus_per_node: int | None = None
    time_min: int | None = None
    account: str | None = None
    qos: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    array: bool = False
    """``--slurm-array``: a sweep's runs go as one job array (one per set of job parameters) instead of one job
    each; ``array_parallelism``: how many of its tasks run at once (``--jobs``; None: all)."""
    array_parallelism: int | None = None

    def parameters(self, timeout_s: float) -> dict[str, Any]:
        """submitit's ``SlurmExecutor.update_parameters`` keywords."""
        params: dict[str, Any] = {"time": self.time_min or math.ceil(timeout_s / 60) + 5}
        for name in ("partition", "gpus_per_node", "account", "qos"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.extra:
            params["additional_parameters"] = dict(self.extra)
        return params


def parse_extra(items: list[str] | None) -> dict[str, str]:
    """``["mem=8G", "constraint=a100"]`` -> ``{"mem": "8G", "constraint": "a100"}`` (UserError otherwise)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key or not value.strip():
            raise UserError(f"--slurm-extra takes KEY=VALUE (an sbatch option without its dashes, e.g. mem=8G), "
                            f"got {item!r}")
        out[key] = value.strip()
    return out


def slurm_facts() -> dict[str, Any]:
    """The job this process runs in, from Slurm's environment (submitit's local executor stands in for tests)."""
    env = os.environ
    job = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")
    facts = {"job_id": job, "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
             "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
             "node": env.get("SLURMD_NODENAME") or socket.gethostname(),
             "partition": env.get("SLURM_JOB_PARTITION"), "cluster": env.get("SLURM_CLUSTER_NAME"),
             "restart_count": int(env.get("SLURM_RESTART_COUNT", 0) or 0),
             "executor": "slurm" if env.get("SLURM_JOB_ID") else "submitit-local"}
    return facts


class SlurmRun(submitit.helpers.Checkpointable):
    """One configuration, run inside a job; returns its record. ``runner`` replaces
    :func:`optimem.harness.launcher.execute` (tests)."""

    def __init__(self, cfg, *, timeout_s: float, track_tensors: bool | None = None, fault: str | None = None,
                 force: bool = False, runner: Callable[..., dict] | None = None, srun_folder: Path | None = None):
        self.cfg, self.timeout_s, self.track_tensors, self.fault = cfg, timeout_s, track_tensors, fault
        self.force, self.runner = force, runner
        self.srun_folder = srun_folder
        """Set: the ranks start with ``srun`` + a torchrun agent per node (:class:`SrunLauncher`), their files in
        this folder (shared by the nodes)."""
        self.attempt = 1

    def __call__(self) -> dict:
        facts = {**slurm_facts(), "attempt": self.attempt}
        # scancel and preemption send SIGTERM to every process of the job (submitit's own process ignores it):
        # the worker dies of it, and its error record would read as the run's outcome. Noted here; such a job
        # then waits for Slurm's SIGKILL (or its requeue) and returns nothing (KILL_WAIT_S at most).
        terminated = threading.Event()
        if os.environ.get("SLURM_JOB_ID") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: terminated.set())
        record = None
        if not self.force and self.runner is None:
            record = refusal_record(self.cfg, resolve_device(self.cfg))
        if record is None:
            run = self.runner or execute
            extra = {"launcher": SrunLauncher(self.srun_folder)} if self.srun_folder is not None else {}
            record = run(self.cfg, timeout_s=self.timeout_s, track_tensors=self.track_tensors, fault=self.fault,
                         **extra)
        if record.get("status") != "ok" and terminated.wait(timeout=1.0):
            time.sleep(KILL_WAIT_S)  # a finished measurement is returned whatever comes; a killed one is not
        record["env"]["slurm"] = facts
        return record

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Preempted or timed out: run again from the start once requeued (nothing was recorded)."""
        self.attempt += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def node_memory(partition: str | None) -> tuple[int | None, str]:
    """The smallest ``RealMemory`` of the partition's nodes (bytes, from ``sinfo``), or None."""
    cmd = ["sinfo", "-h", "-o", "%m"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
        mbs = [int(x.rstrip("+")) for x in out.split() if x.rstrip("+").isdigit()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None, ""
    if not mbs:
        return None, ""
    return min(mbs) * 2**20, f"sinfo RealMemory of {'partition ' + partition if partition else 'the nodes'}"


def check_partition(partition: str | None) -> None:
    """UserError naming the partitions there are when ``partition`` is not one of them (nothing when ``sinfo``
    cannot say)."""
    if partition is None:
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=20,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return
    names = sorted(set(out.split()))
    if names and partition not in names:
        raise UserError(f"--slurm-partition: no partition {partition!r} on this cluster (sinfo lists: "
                        f"{', '.join(names)})")


def finished_records(folder: Path) -> list[tuple[Path, dict]]:
    """``(result file, record)`` for every record a job under ``folder`` (submitit's) returned, oldest first."""
    out = []
    for pkl in sorted(Path(folder).glob("*/*_result.pkl"), key=lambda p: p.stat().st_mtime):
        try:
            outcome, value = submitit.core.utils.pickle_load(pkl)
        except Exception:  # noqa: BLE001 - a result file cut short or of another tool: not a record
            continue
        if outcome == "success" and isinstance(value, dict) and "config" in value and "status" in value:
            out.append((pkl, value))
    return out


def recover_records(sweep, folder: Path) -> int:
    """``--resume`` after a sweep that died while its jobs ran on: append every record a job returned that the
    results file does not hold yet (the sweep's own annotations added, ``run.slurm.recovered_from`` naming the
    job's result file), so a finished measurement is never run again nor lost. Returns how many."""
    n = 0
    for pkl, record in finished_records(folder):
        key = record_key(record)
        if key in sweep.existing:
            continue
        sweep.apply_memory_limit(record)
        run = record.setdefault("run", {})
        run["config_key"] = key
        run["sweep"] = {"id": sweep.sweep_id, "jobs": sweep.opts.jobs, "threads": sweep.opts.threads, "repeat": 0}
        run["slurm"] = {"job_id": str((record.get("env") or {}).get("slurm", {}).get("job_id")),
                        "recovered_from": str(pkl)}
        try:
            validate(record)
        except Exception:  # noqa: BLE001 - not a record this version writes: leave it
            continue
        sweep._append(sweep.out, record)
        sweep.existing[key] = record
        sweep.done[key] = sweep.done.get(key, 0) + 1
        n += 1
    return n


def _run_key(cfg) -> str:
    """Which prepared job a run takes: its whole configuration."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def _bucket(state: str) -> str:
    word = (state or "UNKNOWN").split()[0].upper()
    if word in DONE:
        return "done"
    if word in RUNNING:
        return "running"
    if word in QUEUED:
        return "queued"
    return "failed"


class SlurmExecutor:
    """Submits each run as a job of ``engine`` (a submitit executor: ``submitit.SlurmExecutor`` built from
    ``settings`` by default; tests give ``submitit.LocalExecutor``) and waits for its record."""

    name = "slurm"
    forks = False

    def __init__(self, settings: SlurmSettings, *, timeout_s: float, force: bool = False, engine=None,
                 on_state: Callable[[str], None] | None = None, poll_s: float = 2.0,
                 runner: Callable[..., dict] | None = None, srun: bool = False):
        self.settings, self.timeout_s, self.force, self.runner = settings, timeout_s, force, runner
        self.srun = srun
        """Multi-process runs start their ranks with srun (a torchrun agent per node) even on one node (``bench
        run --executor slurm``); a run over several nodes always does."""
        self.on_state, self.poll_s = on_state, poll_s
        if engine is None:
            settings.folder.mkdir(parents=True, exist_ok=True)
            engine = submitit.SlurmExecutor(folder=str(settings.folder / "%j"), max_num_timeout=3)
            try:
                engine.update_parameters(**settings.parameters(timeout_s))
            except ValueError as exc:
                raise UserError(f"--slurm-extra: submitit refused the Slurm options: {str(exc).splitlines()[0]}") \
                    from None
        self.engine = engine
        self._lock = threading.Lock()
        self._note_lock = threading.Lock()
        self._jobs: dict[str, Any] = {}
        self._states: dict[str, str] = {}
        self._stopping = threading.Event()
        self._node_memory: tuple[int | None, str] | None = None
        self._prepared: dict[str, list] = {}
        """run key -> jobs already submitted in an array (:meth:`prepare`), taken by :meth:`run` in order."""

    def available(self, device: str) -> tuple[int | None, str]:
        """What a job's node offers for the check before submission: a CPU run against the partition's
        smallest node memory; a GPU's memory is only known on the node (the job checks it there)."""
        if device == "cpu" and isinstance(self.engine, submitit.SlurmExecutor):
            if self._node_memory is None:
                self._node_memory = node_memory(self.settings.partition)
            return self._node_memory
        return None, ""

    def uses_srun(self, cfg) -> bool:
        """Whether ``cfg``'s job starts its ranks with srun (a torchrun agent per node)."""
        return int(getattr(cfg, "num_nodes", 1) or 1) > 1 or (self.srun and int(cfg.num_processes) > 1)

    def per_job(self, cfg) -> dict[str, Any]:
        """What one configuration's job asks for beyond the sweep's settings: ``num_nodes`` nodes with one task
        each, a core per process on each node (its ranks), and on CUDA a GPU per process on each node unless
        ``--slurm-gpus-per-node`` says otherwise. A job that starts its ranks with srun runs its Python once, in
        the batch step on the first node (submitit's ``use_srun=False``), which then calls srun itself. A value
        given by ``--slurm-extra`` wins.

        The node count goes to sbatch through ``additional_parameters``: submitit counts a job's tasks as
        ``nodes x ntasks_per_node`` and waits for a result from each, while such a job has one (the batch
        step's)."""
        nodes = max(1, int(getattr(cfg, "num_nodes", 1) or 1))
        n = max(1, int(cfg.num_processes)) // nodes
        srun = self.uses_srun(cfg)
        agents = min(agents_per_node(), nodes) if srun else 1  # >1: several nodes simulated on one host (tests)
        extra = dict(self.settings.extra)
        if srun:
            extra.setdefault("nodes", nodes // agents)
        out: dict[str, Any] = {"nodes": 1, "ntasks_per_node": 1, "use_srun": not srun,
                               "additional_parameters": extra}
        if "cpus_per_task" not in self.settings.extra:
            out["cpus_per_task"] = n * agents
        if cfg.device == "cuda" and self.settings.gpus_per_node is None and "gpus_per_node" not in self.settings.extra:
            out["gpus_per_node"] = n * agents
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {"queued": 0, "running": 0, "done": 0, "failed": 0}
            for state in self._states.values():
                out[_bucket(state)] += 1
            return out

    def _set_state(self, job, state: str, label: str, node: str | None = None) -> None:
        with self._lock:
            if self._states.get(job.job_id) == state:
                return
            self._states[job.job_id] = state
        if self.on_state:
            c = self.counts()
            where = f" on {node}" if node else ""
            with self._note_lock:
                self.on_state(f"slurm job {job.job_id} ({label}): {state}{where}; jobs: {c['queued']} queued, "
                              f"{c['running']} running, {c['done']} done, {c['failed']} failed")

    def _task(self, cfg, timeout_s, track_tensors, fault) -> SlurmRun:
        return SlurmRun(cfg, timeout_s=timeout_s or self.timeout_s, track_tensors=track_tensors, fault=fault,
                        force=self.force, runner=self.runner,
                        srun_folder=self.settings.folder if self.uses_srun(cfg) else None)

    def prepare(self, runs: list[tuple[Any, str | None]], *, timeout_s=None, track_tensors=None) -> None:
        """``--slurm-array``: submit every run still to come (``(cfg, fault)``, once per repeat) now, as one
        job array per set of job parameters (:meth:`per_job`; usually one array for the sweep), at most
        ``array_parallelism`` tasks running at once; :meth:`run` then waits on the job submitted here instead of
        submitting one. Nothing without ``--slurm-array``."""
        if not self.settings.array or not runs:
            return
        groups: dict[str, list] = {}
        for cfg, fault in runs:
            groups.setdefault(json.dumps(self.per_job(cfg), sort_keys=True), []).append((cfg, fault))
        for params, items in groups.items():
            with self._lock:
                if self._stopping.is_set():
                    return
                if isinstance(self.engine, submitit.SlurmExecutor):
                    self.engine.update_parameters(job_name=f"optimem sweep ({len(items)} runs)",
                                                  array_parallelism=self.settings.array_parallelism or len(items),
                                                  **json.loads(params))
                tasks = [self._task(cfg, timeout_s, track_tensors, fault) for cfg, fault in items]
                with self.engine.batch():
                    jobs = [self.engine.submit(task) for task in tasks]
                for (cfg, _), job in zip(items, jobs):
                    self._jobs[job.job_id] = job
                    self._prepared.setdefault(_run_key(cfg), []).append(job)

    def run(self, cfg, *, timeout_s=None, track_tensors=None, fault=None, on_start=None, zygote=None) -> dict:
        label = config_label(cfg.to_dict())
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the sweep is stopping: not submitted")
            queued = self._prepared.get(_run_key(cfg))
            job = queued.pop(0) if queued else None
            if job is None:
                if isinstance(self.engine, submitit.SlurmExecutor):
                    self.engine.update_parameters(job_name=f"optimem {label}", **self.per_job(cfg))
                job = self.engine.submit(self._task(cfg, timeout_s, track_tensors, fault))
                self._jobs[job.job_id] = job
        self._set_state(job, "PENDING", label)
        last_force = 0.0
        while True:
            if self._stopping.is_set():
                raise RuntimeError(f"slurm job {job.job_id} cancelled: the sweep was interrupted")
            now = time.monotonic()
            force = now - last_force >= self.poll_s
            last_force = now if force else last_force
            if job.done(force_check=force):
                break
            state = job.state
            if state and _bucket(state) != "failed" and not state.startswith("UNKNOWN"):
                self._set_state(job, state.split()[0], label)
            time.sleep(0.25)
        try:
            record = job.result()
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
            record = self.failed_record(cfg, job, exc)
            self._set_state(job, record["env"]["slurm"]["state"], label, record["env"]["slurm"]["node"])
            return record
        node = (record.get("env") or {}).get("slurm", {}).get("node")
        if record.get("status") == "error":
            # scancel / preemption signal every process of the job: the worker dies, the job returns its error
            # record before Slurm's SIGKILL; say that it was the job's end, not the run's
            state = self._final_state(job)
            if state and _bucket(state) == "failed":
                record["reason"] = (f"Slurm job {job.job_id} ended {state}" + (f" on {node}" if node else "") +
                                    f" while the run was going: {record.get('reason', '')}")
                record["env"].setdefault("slurm", {})["state"] = state
        self._set_state(job, "COMPLETED" if record.get("status") != "error" else "FAILED", label, node)
        record.setdefault("run", {})["slurm"] = {"job_id": str(job.job_id), "log": str(job.paths.stdout)}
        return record

    @staticmethod
    def _final_state(job, wait_s: float = 5.0) -> str | None:
        """The job's state once it has left PENDING/RUNNING (sacct can lag a moment), or None."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info = dict(job.get_info(mode="force") or {})
            except Exception:  # noqa: BLE001 - sacct unreachable: the state stays unknown
                return None
            state = info.get("State") or info.get("jobState")
            if "jobState" in info or (state and _bucket(state) in ("done", "failed")) or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def failed_record(self, cfg, job, exc: BaseException) -> dict:
        """The one record of a job that ended without returning one (cancelled, killed, node failure)."""
        info: dict[str, str] = {}
        for _ in range(10):  # sacct can lag behind the end of the job by a moment
            try:
                info = dict(job.get_info(mode="force") or {})
            except Exception:  # noqa: BLE001 - no sacct (the local stand-in): its own state
                info = {}
            info.setdefault("State", info.get("jobState") or job.state)  # the local stand-in: its own state
            if _bucket(info["State"]) == "failed" or "jobState" in info:
                break
            time.sleep(0.5)
        state = info.get("State") or job.state or "UNKNOWN"
        node = info.get("NodeList") or None
        status = "oom" if state.upper().startswith("OUT_OF_ME") else "error"
        reason = (f"Slurm job {job.job_id} ended {state}" + (f" on {node}" if node else "") +
                  " before it returned a record (a job that does not finish leaves no measurement)")
        device = resolve_device(cfg) if cfg.device in ("cpu", "cuda") else "cpu"
        try:
            spec = get_spec(cfg.optim)
        except UserError:
            spec = None
        env = collect_env(device, spec)
        env["slurm"] = {"job_id": str(job.job_id), "node": node, "state": state, "executor": "slurm",
                        "facts_from": "the submitting host (the job returned nothing)"}
        return build_record(config=cfg.to_dict(), status=status, reason=reason, measured=None, predicted=None,
                            env=env, run={"resolved_device": device, "duration_s": 0.0,
                                          "slurm": {"job_id": str(job.job_id), "log": str(job.paths.stdout)}},
                            detail=str(exc)[-4000:])

    def cancel_all(self) -> None:
        """Cancel every job this executor submitted that has not finished (``scancel``)."""
        self._stopping.set()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if not job.paths.result_pickle.exists():
                try:
                    job.cancel(check=False)
                except Exception:  # noqa: BLE001 - best effort: a job that already ended
                    pass


__all__ = ["SlurmExecutor", "SlurmRun", "SlurmSettings", "check_partition", "finished_records", "node_memory",
           "parse_extra", "recover_records", "slurm_facts"]
