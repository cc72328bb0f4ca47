"""``bench sweep``'s engine: run a grid of configurations, one worker process per run, into one JSONL file.

Every configuration goes through :func:`optimem.harness.launcher.execute` (checks, prediction, a worker process
with a timeout, forked from a zygote that imported torch, transformers and the optimizer packages once:
:mod:`optimem.harness.zygote`; a fresh ``python -m optimem.harness.worker`` when it cannot be); the record comes
back to the sweep's main thread, which appends it whole (:func:`optimem.harness.record.append_record`), so a
sweep that is killed at any moment leaves only whole lines, and ``--resume`` picks up from the configurations
already recorded (matched by :func:`optimem.harness.grid.config_key`). A run that fails, runs out of memory or
times out is recorded as such and the sweep goes on.

``--jobs N`` runs N workers at once (threads that each wait on one worker process). Memory figures are
per process and unaffected; throughput figures are, as the runs share the CPU: keep ``--jobs 1`` for
timings you mean to compare.

Memory limit. With ``--memory-limit`` every run's measured peak (``measured.peak_bytes``, bytes) is checked
against the limit after the run; a run over it is recorded with status ``oom`` (its measurements kept). The
limit is part of the configuration, so runs under different limits never share a key. ``--find-max-batch``
searches the largest batch that fits (:mod:`optimem.harness.max_batch`); progress: :mod:`optimem.harness.sweep_progress`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimem.estimators import get_spec
from optimem.estimators.errors import UserError, one_line
from optimem.harness import max_batch
from optimem.harness.env_facts import collect_env
from optimem.harness.grid import config_key, config_label, record_key
from optimem.harness.executors import LocalExecutor
from optimem.harness.fit import check, refusal_record
from optimem.harness.launcher import predict, resolve_device, skip_reason
from optimem.harness.max_batch import DEFAULT_MAX_BATCH_CAP, OVER_LIMIT, group_key, max_batch_path, read_max_batch
from optimem.harness.paths import rescue_record
from optimem.harness.process import worker_env
from optimem.harness.record import append_record, build_record, read_records, validate
from optimem.harness.sweep_progress import Reporter, max_batch_line, run_line
from optimem.harness.units import human_bytes
from optimem.harness.zygote import Zygote



@dataclass
class SweepOptions:
    """How a sweep runs (the grid says what it runs)."""

    out: Path
    resume: bool = False
    retry_failed: bool = False
    timeout_s: float = 1200.0
    jobs: int = 1
    threads: int | None = None
    track_tensors: bool | None = None
    memory_limit: int | None = None
    find_max_batch: bool = False
    max_batch_cap: int = DEFAULT_MAX_BATCH_CAP
    repeat: int = 1
    """Runs per configuration (records of one configuration share its key; ``bench compare`` tests
    throughput across them when both sides have several)."""
    faults: dict[str, str] = field(default_factory=dict)
    """Test hook: ``{optimizer name: KIND@PHASE}`` handed to the worker (see ``optimem.harness.worker``)."""
    progress: str = "auto"
    """``bar`` (rich progress bar), ``lines`` (a line per finished run on stderr), ``none``, or ``auto``
    (bar on a terminal, else lines)."""
    force: bool = False
    """Run configurations the estimate says cannot fit the device's free memory (else each is recorded
    ``oom-predicted`` without running: :mod:`optimem.harness.fit`)."""
    fork: bool = True
    """Fork each run from a :class:`optimem.harness.zygote.Zygote` (imports paid once per sweep); False: a fresh
    ``python -m optimem.harness.worker`` per run, as ``bench run`` does."""


@dataclass
class RunResult:
    """One configuration of the grid: its record, and whether it was recorded by an earlier sweep."""

    config: Any
    record: dict | None
    reused: bool = False


@dataclass
class SweepOutcome:
    results: list[RunResult] = field(default_factory=list)
    max_batch: list[dict] = field(default_factory=list)
    interrupted: bool = False
    out: Path | None = None
    max_batch_out: Path | None = None
    wall_s: float = 0.0

    statuses: dict[str, int] = field(default_factory=dict)
    """Status -> how many records this sweep appended (max-batch probes included)."""

    def counts(self) -> dict[str, int]:
        """Status -> records, for every configuration of the grid (or every probe of the searches)."""
        out = dict(self.statuses)
        for r in self.results:
            if r.reused and r.record is not None:
                out[r.record["status"]] = out.get(r.record["status"], 0) + 1
        return out


class _Stopped(Exception):
    """The sweep is stopping (interrupted): a task gives up quietly."""



def read_existing(path: Path) -> dict[str, dict]:
    """``{config key: last record}`` of a results file (empty if there is none)."""
    if not path.is_file():
        return {}
    out: dict[str, dict] = {}
    for rec in read_records(path):
        if rec.get("kind") or "config" not in rec:
            continue
        try:
            out[record_key(rec)] = rec
        except Exception:  # noqa: BLE001 - a record some other tool wrote badly: not a resume point
            continue
    return out


def existing_counts(path: Path, *, skip_errors: bool = False) -> dict[str, int]:
    """``{config key: how many records}`` of a results file (``skip_errors``: not counting ``error`` ones)."""
    out: dict[str, int] = {}
    if not path.is_file():
        return out
    for rec in read_records(path):
        if rec.get("kind") or "config" not in rec or (skip_errors and rec.get("status") == "error"):
            continue
        try:
            key = record_key(rec)
        except Exception:  # noqa: BLE001
            continue
        out[key] = out.get(key, 0) + 1
    return out



class Sweep:
    """Runs configurations (plain sweep) or max-batch searches; see the module doc."""

    def __init__(self, opts: SweepOptions, reporter: Reporter | None = None, executor=None):
        self.opts = opts
        self.executor = executor if executor is not None else LocalExecutor()
        """Where runs execute (:mod:`optimem.harness.executors`)."""
        self.out = Path(opts.out)
        self.reporter = reporter
        self.stop = threading.Event()
        self._procs: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.sweep_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
        self.existing = read_existing(self.out)
        self.done = existing_counts(self.out, skip_errors=opts.retry_failed) if opts.resume else {}
        self.outcome = SweepOutcome(out=self.out)
        self.rescued: Path | None = None
        self.write_error: str | None = None
        self.write_failures = 0
        self.zygote = None
        self._fallback_noted = False
        self._refusals: dict[str, Any] = {}
        """config key -> :class:`optimem.harness.fit.Refusal` found by :meth:`prejudge`."""

    # --------------------------------------------------------------------------------- one run
    def _on_start(self, proc) -> None:
        with self._lock:
            self._procs[threading.get_ident()] = proc
        if self.stop.is_set():
            self._kill(proc)

    @staticmethod
    def _kill(proc) -> None:
        for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                target()
                return
            except (ProcessLookupError, PermissionError, OSError):
                continue

    def kill_all(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            self._kill(proc)
        self.executor.cancel_all()

    def fault_for(self, cfg) -> str | None:
        """The test hook's fault for ``cfg``: keyed ``OPTIM:BxS`` (one configuration) or ``OPTIM``."""
        return self.opts.faults.get(f"{cfg.optim}:{cfg.batch_size}x{cfg.seq_len}") or self.opts.faults.get(cfg.optim)

    def _error_record(self, cfg, reason: str, detail: str | None = None) -> dict:
        try:
            spec = get_spec(cfg.optim)
        except UserError:
            spec = None
        device = resolve_device(cfg) if cfg.device in ("auto", "cpu", "cuda") else "cpu"
        return build_record(config=cfg.to_dict(), status="error", reason=reason, measured=None, predicted=None,
                            env=collect_env(device, spec), run={"resolved_device": device, "duration_s": 0.0},
                            detail=detail)

    def run_one(self, cfg, *, label: str | None = None, repeat: int = 0) -> dict:
        """Execute one configuration in a worker process; the annotated record (raises _Stopped)."""
        if self.stop.is_set():
            raise _Stopped
        if self.reporter:
            self.reporter.started(label or config_label(cfg.to_dict()))
        try:
            record = None if self.opts.force else self.refused(cfg)
            if record is None:
                record = self.executor.run(cfg, timeout_s=self.opts.timeout_s, track_tensors=self.opts.track_tensors,
                                           fault=self.fault_for(cfg), on_start=self._on_start, zygote=self.zygote)
            zygote = self.zygote
            if (zygote is not None and zygote.refusal and record["run"].get("launch") == "subprocess"
                    and not self._fallback_noted and self.reporter):
                self._fallback_noted = True
                self.reporter.note(f"bench sweep: runs start as fresh processes: {zygote.refusal}")
        except UserError as exc:
            record = self._error_record(cfg, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in one run must not end the sweep
            record = self._error_record(cfg, one_line(exc, 10**6, kind=True),
                                        traceback.format_exc()[-4000:])
        finally:
            with self._lock:
                self._procs.pop(threading.get_ident(), None)
            if self.reporter:
                self.reporter.finished_thread()
        if self.stop.is_set():
            raise _Stopped  # the worker may have been killed by the interrupt: not a real outcome
        self.apply_memory_limit(record)
        run = record.setdefault("run", {})
        run["config_key"] = config_key(record["config"], run.get("resolved_device") or resolve_device(cfg))
        run["sweep"] = {"id": self.sweep_id, "jobs": self.opts.jobs, "threads": self.opts.threads, "repeat": repeat}
        validate(record)
        return record

    def prejudge(self, configs: list) -> int:
        """Judge ``configs`` on their model states alone (no trace; this thread, before any zygote starts): the
        refused are kept for :meth:`refused` and are neither predicted nor forked for. Returns how many."""
        if self.opts.force:
            return 0
        for cfg in configs:
            device = resolve_device(cfg)
            try:
                room = self.executor.available(device)
                refusal = None if skip_reason(cfg, device) is not None else check(cfg, device, available=room)
            except Exception:  # noqa: BLE001 - the run itself will report it
                continue
            if refusal is not None:
                self._refusals[config_key(cfg.to_dict(), device)] = refusal
        return len(self._refusals)

    def refused(self, cfg) -> dict | None:
        """The ``oom-predicted`` record of ``cfg`` when the estimate says it cannot fit the memory its device
        has (:func:`optimem.harness.fit.check`; what the executor says a run gets), else None (run it)."""
        device = resolve_device(cfg)
        return refusal_record(cfg, device, refusal=self._refusals.get(config_key(cfg.to_dict(), device)),
                              available=self.executor.available(device))

    def apply_memory_limit(self, record: dict) -> None:
        """Turn an ``ok`` record whose measured peak is over ``--memory-limit`` into ``oom``."""
        limit = self.opts.memory_limit
        if limit is None:
            return
        m = record.get("measured") or {}
        record.setdefault("run", {})["memory_limit"] = {"limit_bytes": limit, "checked": "measured.peak_bytes",
                                                        "tracker": m.get("primary_tracker")}
        if record["status"] == "ok" and m.get("peak_bytes") is not None and m["peak_bytes"] > limit:
            what = {"tensors": "live-tensor peak", "cuda": "CUDA allocated peak",
                    "rss": "process RSS peak"}.get(m.get("primary_tracker"), "peak")
            record["status"] = "oom"
            record["reason"] = (f"{OVER_LIMIT}: measured {what} {human_bytes(m['peak_bytes'])} > "
                                f"--memory-limit {human_bytes(limit)}")

    # --------------------------------------------------------------------------------- driving
    @contextlib.contextmanager
    def forking(self, runs: int):
        """A zygote for the ``runs`` to come, started in the background while the sweep prepares (with the
        environment its workers get) and stopped afterwards. None for a single run: nothing to share."""
        if not self.opts.fork or runs < 2 or not self.executor.forks:
            yield
            return
        self.zygote = Zygote()
        threading.Thread(target=self.zygote.start, args=(worker_env(), os.getcwd()), name="optimem-zygote-start",
                         daemon=True).start()
        try:
            yield
        finally:
            zygote, self.zygote = self.zygote, None
            zygote.close()

    def prewarm(self, configs: list) -> None:
        """Predict every configuration in this thread first: whatever a prediction still has to build (an
        inventory, a simulated phase model: transformers' lazy imports) is not safe to build from several
        threads at once. With the on-disk cache warm this costs milliseconds per configuration."""
        for cfg in configs:
            try:
                predict(cfg)
            except Exception:  # noqa: BLE001 - the run itself will report it
                pass

    def _drive(self, tasks: list[Callable[[Callable[[tuple], None]], Any]]) -> None:
        """Run ``tasks`` on ``jobs`` threads; records they emit are appended here, in the main thread."""
        q: queue.Queue = queue.Queue()
        pool = ThreadPoolExecutor(max_workers=max(1, self.opts.jobs), thread_name_prefix="optimem-sweep")
        futures = [pool.submit(self._guard(task), q.put) for task in tasks]
        try:
            while True:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    if all(f.done() for f in futures) and q.empty():
                        break
                    continue
                self._commit(item)
        except BaseException:
            self.stop.set()
            self.kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
            while not q.empty():  # finished before the interrupt: keep them
                self._commit(q.get_nowait())
            raise
        pool.shutdown(wait=True)
        for f in futures:
            f.result()

    @staticmethod
    def _guard(task):
        def run(emit):
            try:
                return task(emit)
            except _Stopped:
                return None

        return run

    def _commit(self, item: tuple) -> None:
        kind = item[0]
        if kind == "record":
            _, record, advance, result = item
            self._append(self.out, record)
            self.existing[record_key(record)] = record
            self.outcome.statuses[record["status"]] = self.outcome.statuses.get(record["status"], 0) + 1
            if result is not None:
                result.record = record
            if self.reporter:
                self.reporter.line(run_line(record), advance=advance)
        elif kind == "reused":
            _, record, result = item
            if self.reporter:
                self.reporter.line(run_line(record, reused=True), advance=1)
        elif kind == "max_batch":
            _, summary = item
            self._append(max_batch_path(self.out), summary, validate_first=False)
            self.outcome.max_batch.append(summary)
            if self.reporter:
                self.reporter.line(max_batch_line(summary), advance=1)
        elif kind == "max_batch_reused":
            _, summary = item
            self.outcome.max_batch.append(summary)
            if self.reporter:
                self.reporter.line(max_batch_line(summary) + "  (recorded earlier)", advance=1)
        elif kind == "note":
            if self.reporter:
                self.reporter.note(item[1])

    def _append(self, path: Path, record: dict, **kw) -> None:
        """Append a finished record; when its file cannot be written (a full disk, a file removed under the
        sweep), write it to a fallback file instead (:func:`optimem.harness.paths.rescue_record`) and go on: a
        measurement is never lost. ``rescued`` / ``write_error`` / ``write_failures`` say what happened."""
        try:
            append_record(path, record, **kw)
        except OSError as exc:
            self.write_failures += 1
            self.write_error = f"{exc.strerror or exc}"
            self.rescued = rescue_record(record, path, exc, name=f"sweep-{self.sweep_id}") or self.rescued
            if self.reporter:
                self.reporter.note(f"bench sweep: could not append to {path} ({self.write_error}): record kept in "
                                   f"{self.rescued or 'nothing (printed in the summary only)'}")

    # --------------------------------------------------------------------------------- sweeps
    def should_skip(self, key: str) -> dict | None:
        """The earlier record that makes ``--resume`` skip ``key`` (None: run it)."""
        if not self.opts.resume:
            return None
        rec = self.existing.get(key)
        if rec is None:
            return None
        if self.opts.retry_failed and rec.get("status") == "error":
            return None
        return rec

    def run_configs(self, configs: list) -> SweepOutcome:
        reused, runs = [], []
        for cfg in configs:
            key = config_key(cfg.to_dict(), resolve_device(cfg))
            done = self.done.get(key, 0)
            remaining = max(self.opts.repeat - done, 0)
            earlier = self.existing.get(key) if done else None
            result = RunResult(cfg, earlier, reused=remaining == 0)
            self.outcome.results.append(result)
            if remaining == 0:
                reused.append(lambda emit, r=earlier, res=result: emit(("reused", r, res)))
            for i in range(done, done + remaining):
                runs.append(lambda emit, c=cfg, res=result, i=i: emit(("record", self.run_one(c, repeat=i), 1, res)))
        tasks = reused + runs  # earlier records first (instant), then the runs in grid order
        if self.reporter:
            self.reporter.set_total(len(tasks))
        pending = [r.config for r in self.outcome.results if not r.reused]
        refused = self.prejudge(pending)
        self.submit_ahead(configs)
        with self.forking(len(runs) - refused):
            self.prewarm([c for c in pending if config_key(c.to_dict(), resolve_device(c)) not in self._refusals])
            self._drive(tasks)
        return self.outcome

    def submit_ahead(self, configs: list) -> None:
        """Executors that submit a sweep's runs together (``--slurm-array``: :meth:`SlurmExecutor.prepare
        <optimem.harness.slurm.SlurmExecutor.prepare>`) get every run still to come, less the refused ones."""
        prepare = getattr(self.executor, "prepare", None)
        if prepare is None:
            return
        runs = []
        for cfg in configs:
            left = max(self.opts.repeat - self.done.get(config_key(cfg.to_dict(), resolve_device(cfg)), 0), 0)
            if left and (self.opts.force or self.refused(cfg) is None):
                runs += [(cfg, self.fault_for(cfg))] * left
        prepare(runs, timeout_s=self.opts.timeout_s, track_tensors=self.opts.track_tensors)

    # --------------------------------------------------------------------------------- max batch
    def search(self, base, start: int, emit) -> dict:
        """Find the largest batch size of ``base`` that fits (:func:`optimem.harness.max_batch.search`)."""
        return max_batch.search(self, base, start, emit)

    def run_max_batch(self, bases: list, starts: list[int]) -> SweepOutcome:
        self.outcome.max_batch_out = max_batch_path(self.out)
        earlier = read_max_batch(self.outcome.max_batch_out) if self.opts.resume else {}
        tasks = []
        for base, start in zip(bases, starts):
            g = group_key(base, resolve_device(base))
            if g in earlier:
                tasks.append(lambda emit, s=earlier[g]: emit(("max_batch_reused", s)))
            else:
                tasks.append(lambda emit, b=base, s=start: emit(("max_batch", self.search(b, s, emit))))
        searches = sum(1 for b in bases if group_key(b, resolve_device(b)) not in earlier)
        with self.forking(2 * searches):  # a search probes at least twice (a batch that fits, one that does not)
            self.prewarm(bases)
            self._drive(tasks)
        return self.outcome


__all__ = ["RunResult", "Sweep", "SweepOptions", "SweepOutcome", "existing_counts", "read_existing"]
