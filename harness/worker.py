"""The measured run, as executed in the worker process (``python -m optimem.harness.worker CONFIG RESULT``).

:func:`run_measured` builds the model and the real ``Trainer`` for a :class:`RunConfig`, attaches the
trackers, trains, and returns the worker's part of the record: ``status``, ``reason``, ``measured``
(bytes and seconds), ``device_facts`` and ``detail``. Out-of-memory becomes status ``oom`` (with what
was measured up to that point), never a traceback. The launcher runs this in a child process; tests may
call it in-process.

``fault`` (or the ``OPTIMEM_FAULT`` environment variable in the worker process) is a test hook:
``KIND@PHASE`` with KIND one of ``oom``, ``error``, ``hang``, ``crash`` raises a simulated
``torch.OutOfMemoryError`` / ``RuntimeError``, sleeps forever, or kills the process with SIGSEGV when
the phase ``PHASE`` (e.g. ``step0.backward``) starts.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from optimem.estimators import get_spec
from optimem.estimators.bnb_layout import model_storage_tensors
from optimem.estimators.errors import one_line
from optimem.estimators.gpus import device_peak_flops
from optimem.estimators.throughput import flops_per_token
from optimem.harness.contract import (FAULT_ENV, RUN_DIR_PREFIX, node_facts, rank_info, rank_result_path, read_job,
                                      write_result)
from optimem.harness.env_facts import cpu_name
from optimem.harness.process import quiet_libraries
from optimem.harness.trackers.nvml import NvmlSampler
from optimem.harness.trackers.rss import RssTracker
from optimem.harness.trackers.throughput import ThroughputTracker

STEP_COMPILED_PACKAGES = frozenset({"torchao", "flashoptim"})
"""Optimizers whose ``step()`` runs ``torch.compile(fullgraph=True)``, which refuses to trace under a
Python dispatch mode: the tensor accountant is paused around their step."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA's ``OutOfMemoryError`` or the CPU allocator's)."""
    # lazy: torch; the worker watches its parent before its first torch import
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "can't allocate memory" in msg or "out of memory" in msg.lower())


def _inject(fault: str | None, label: str) -> None:
    if not fault or "@" not in fault:
        return
    kind, where = fault.split("@", 1)
    if where != label:
        return
    # lazy: torch; the worker watches its parent before its first torch import
    import torch

    if kind == "oom":
        raise torch.OutOfMemoryError(f"simulated out of memory (test fault) in {label}. Tried to allocate 1.00 TiB")
    if kind == "error":
        raise RuntimeError(f"simulated failure (test fault) in {label}")
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)


def _model_shape(model) -> dict[str, int | None]:
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if getattr(cfg, "is_encoder_decoder", False):
        layers = (getattr(cfg, "num_layers", 0) or 0) + (getattr(cfg, "num_decoder_layers", 0) or 0) or layers
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or getattr(cfg, "n_embd", None)
    try:
        non_embedding = int(model.num_parameters(exclude_embeddings=True))
    except Exception:
        non_embedding = None
    return {"layers": layers, "hidden": hidden, "non_embedding_params": non_embedding}


def tensor_tracked_steps(cfg) -> int:
    """How many optimizer steps the tensor accountant sees: step 0, the first steady step and the rest
    of the warmup (``max(2, warmup)``). It is then stopped, so the steps after warmup (the throughput
    figures) run without its per-op cost."""
    return max(2, cfg.warmup)


def run_measured(cfg, *, fault: str | None = None, track_tensors: bool | None = None) -> dict[str, Any]:
    """Train ``cfg`` with every tracker attached; the worker's part of the record (see the module doc).

    ``track_tensors``: run the exact tensor accountant (default: on for CPU runs, off on CUDA where the
    allocator's own statistics are exact and free). It sees :func:`tensor_tracked_steps` steps.
    """
    quiet_libraries()
    run = MeasuredRun(cfg, fault=fault if fault is not None else os.environ.get(FAULT_ENV),
                      track_tensors=track_tensors)
    return run.execute()


class MeasuredRun:
    """One measured Trainer job: trackers, phase boundaries, and the figures they produce."""

    def __init__(self, cfg, *, fault: str | None, track_tensors: bool | None):
        self.cfg = cfg
        self.fault = fault
        self.spec = get_spec(cfg.optim)
        self.device = cfg.resolved_device()
        self.track_tensors = (self.device == "cpu") if track_tensors is None else bool(track_tensors)
        self.notes: list[str] = []
        self.facts: dict[str, Any] = {"device": self.device}
        self.model = None
        self.params: list = []
        self._weights: list | None = None
        self.buffers: list = []
        self.trainer = None
        self.nvml = None
        self.acct = None
        self.cuda = None
        self.rss = None
        self.recorder = None
        self.timer = None
        self.tracked_steps = tensor_tracked_steps(cfg)
        self.pause_for_step = False
        self.last_state = None
        self.last_state_phase: str | None = None
        self.state_before: int | None = None
        self.state_after_step: list[int] = []
        self.grads_at_step: list[int] = []
        # lazy: torch and accelerate, only for multi-process runs
        from optimem.harness.distributed.rank import RankView, is_distributed

        self.shard = RankView(cfg) if is_distributed(cfg) else None
        self.device_index = self.shard.local_rank if self.shard is not None else 0
        self.model_states_at_step: list[dict[str, int]] = []

    # --------------------------------------------------------------------------------------- setup
    def _init_cuda(self) -> str | None:
        """NVML baseline (before CUDA exists), then the CUDA context; an error message if CUDA fails."""
        # lazy: torch; the worker watches its parent before its first torch import
        import torch

        try:
            self.nvml = NvmlSampler(self.device_index)  # idle baseline, read before CUDA is initialised
        except Exception as exc:
            self.notes.append(f"NVML unavailable ({one_line(exc, 120)}): no driver-level memory figures")
        try:
            # lazy: imports torch; the worker watches its parent first
            from optimem.harness.trackers.cuda import device_facts

            torch.cuda.init()
            torch.cuda.set_device(self.device_index)
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
            self.facts.update(device_facts(self.device_index))
        except Exception as exc:
            if self.nvml is not None:
                self.nvml.stop()
            return one_line(exc)
        if self.nvml is not None:
            self.nvml.record_context(torch.cuda.memory_reserved())
            self.nvml.start()
        return None

    def _build_trackers(self) -> None:
        # lazy: torch; the worker watches its parent before its first torch import
        import torch

        # lazy: imports torch; the worker watches its parent first
        from optimem.harness.trackers.cuda import CudaAllocatorTracker
        from optimem.harness.trackers.phases import PhaseRecorder
        from optimem.harness.trackers.tensor_accounting import TensorAccountant
        cfg = self.cfg
        self.rss = RssTracker()
        self.rss.start()
        trackers: dict[str, Any] = {}
        if self.track_tensors:
            self.acct = trackers["tensors"] = TensorAccountant(self.device, self.classify)
        if self.device == "cuda":
            self.cuda = trackers["cuda"] = CudaAllocatorTracker(self.device_index)
        trackers["rss"] = self.rss
        if self.nvml is not None:
            trackers["nvml"] = self.nvml
        primary = "tensors" if self.acct is not None and self.device == "cpu" else \
            ("cuda" if self.cuda is not None else "rss")
        self.recorder = PhaseRecorder(trackers, primary, on_enter=lambda label: _inject(self.fault, label))
        samples = cfg.batch_size * cfg.grad_accum
        self.timer = ThroughputTracker(samples, samples * cfg.seq_len, cfg.warmup,
                                       torch.cuda.synchronize if self.device == "cuda" else None)
        self.pause_for_step = self.acct is not None and self.spec.import_name in STEP_COMPILED_PACKAGES
        if self.acct is not None and cfg.warmup < self.tracked_steps and cfg.steps > cfg.warmup:
            self.notes.append(f"steps {cfg.warmup}..{self.tracked_steps - 1} are timed with the tensor accountant "
                              f"on (use --warmup {self.tracked_steps} to time only steps without it)")
        if self.pause_for_step:
            self.notes.append(f"{self.spec.import_name} compiles its optimizer step (torch.compile), which cannot "
                              "run under the tensor accountant: it is paused inside optimizer.step(), so that "
                              "step's temporaries are not seen (its new state is adopted at the phase end)")

    # ------------------------------------------------------------------------------ during the run
    def _optimizer(self):
        # lazy: torch and transformers; the worker watches its parent first
        from optimem.harness.scenario import unwrap_optimizer

        opt = getattr(self.trainer, "optimizer", None) if self.trainer is not None else None
        opt = unwrap_optimizer(opt) if opt is not None else None
        return self.shard.optimizer(opt) if self.shard is not None and opt is not None else opt

    def classify(self) -> dict[str, list]:
        """For the accountant at each phase end: parameters, buffers, gradients, optimizer state. The
        optimizer is walked except after a forward (which creates no optimizer state); the walk is kept
        for ``step_end``."""
        # lazy: imports torch; the worker watches its parent first
        from optimem.harness.state_walker import measure_optimizer_state

        if self.model is None:
            return {}
        out: dict[str, list] = {"parameters": self.weights, "buffers": self.buffers,
                                "gradients": [p.grad for p in self.params if p.grad is not None]}
        if self.shard is not None:
            out.update(self.shard.categories())
        opt = self._optimizer()
        current = self.recorder.current
        if opt is not None and not (current is not None and current.kind == "forward"):
            collected: list = []
            self.last_state = measure_optimizer_state(opt, exclude=self._state_exclude(), collect=collected)
            self.last_state_phase = current.label if current is not None else None
            out["optimizer_state"] = collected
        return out

    @property
    def weights(self) -> list:
        """The tensors that store the weights: the parameters, and a bitsandbytes-quantized model's
        quantization state beside them (absmax, codes, 8-bit row scales; looked up once)."""
        if not self.cfg.quantize or self.model is None:
            return self.params
        if self._weights is None:
            self._weights = model_storage_tensors(self.model)
        return self._weights

    def measure_state(self, reuse_phase: str | None = None):
        """The walker's measure of the optimizer now (reusing the classifier's walk of ``reuse_phase``)."""
        # lazy: imports torch; the worker watches its parent first
        from optimem.harness.state_walker import measure_optimizer_state

        opt = self._optimizer()
        if opt is None:
            return None
        if reuse_phase is not None and self.last_state_phase == reuse_phase:
            return self.last_state
        return measure_optimizer_state(opt, exclude=self._state_exclude())

    def _state_exclude(self) -> list:
        """What the state walker must not count: the parameters (and a sharded run's local shards and
        master partitions)."""
        if self.shard is None:
            return self.params
        cats = self.shard.categories()
        return self.params + cats["parameters"]

    def _engine_step(self, when: str) -> None:
        """A DeepSpeed engine's step (called from inside the Trainer's backward) is the optimizer-step phase."""
        step = self.recorder.step
        if when == "pre":
            self.recorder.switch("optimizer_step", step)
            self.on_boundary("pre_optimizer_step", step, engine=True)
        else:
            self.on_boundary("optimizer_step", step, engine=True)

    def on_boundary(self, event: str, step: int, engine: bool = False) -> None:
        """Called by :class:`PhaseCallback` at the Trainer's step boundaries (and by a DeepSpeed engine's
        step, ``engine=True``: then the Trainer's own optimizer-step events, which follow it, are ignored)."""
        if self.shard is not None and self.shard.engine_step and not engine and \
                event in ("pre_optimizer_step", "optimizer_step"):
            return
        if event == "train_begin":
            if self.shard is not None:
                self.params = self.shard.attach(self.trainer, self.model, self._engine_step,
                                                on_resize=self.acct.storage_resized if self.acct else None)
            self.timer.train_begin()
            m = self.measure_state()
            self.state_before = m.total if m is not None else 0
        elif event == "pre_optimizer_step":
            if self.shard is not None:
                self.model_states_at_step.append(self.shard.model_states(None))
                self.grads_at_step.append(self.model_states_at_step[-1]["gradients"])
            else:
                from optimem.harness.state_walker import storage_bytes  # lazy: torch; see measure_state

                self.grads_at_step.append(storage_bytes(p.grad for p in self.params))
            self.timer.pre_optimizer_step()
            if self.pause_for_step:
                self.acct.pause()
        elif event == "optimizer_step":
            self.timer.post_optimizer_step()
            if self.pause_for_step:
                self.acct.resume()
        elif event == "step_end":
            self.timer.step_end()
            self.buffers = list(self.model.buffers())
            m = self.measure_state(reuse_phase=f"step{step}.optimizer_step")
            if m is not None and len(self.state_after_step) < 1024:
                self.state_after_step.append(m.total)
            if self.acct is not None and not self.acct.stopped and step + 1 >= self.tracked_steps:
                self.acct.stop()
                self.recorder.remove_tracker("tensors")

    # ------------------------------------------------------------------------------------- the run
    def execute(self) -> dict[str, Any]:
        # lazy: imports torch; the worker watches its parent first
        from optimem.harness.scenario import build_model, build_trainer, remove_printer_callback
        from optimem.harness.trackers.phases import PhaseCallback, attach_model_hooks

        if self.device == "cuda":
            failure = self._init_cuda()
            if failure is not None:  # no usable GPU after all: a record, not a traceback
                return {"status": "error", "reason": f"CUDA could not be initialised: {failure}", "measured": None,
                        "device_facts": self.facts, "detail": None}
        else:
            self.facts["device_name"] = cpu_name()
        self._build_trackers()
        recorder, acct = self.recorder, self.acct
        status, reason, detail = "ok", "", None
        t_start = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                if acct is not None:
                    stack.enter_context(acct)
                recorder.switch("model_load")
                self.model = build_model(self.cfg)
                self.params, self.buffers = list(self.model.parameters()), list(self.model.buffers())
                recorder.switch("setup")
                attach_model_hooks(self.model, recorder, on_grad=acct.mark_gradient if acct is not None else None)
                self.trainer = build_trainer(self.cfg, model=self.model,
                                             callbacks=[PhaseCallback(recorder, self.on_boundary)])
                remove_printer_callback(self.trainer)
                self.trainer.train()
                recorder.end()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
            where = recorder.current_label or "setup"
            with contextlib.suppress(Exception):
                recorder.end(interrupted=True)
            if is_oom(exc):
                status, reason = "oom", f"out of memory in {where}: {one_line(exc)}"
            else:
                status, reason = "error", f"{type(exc).__name__} in {where}: {one_line(exc)}"
                detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
        wall = time.perf_counter() - t_start
        if acct is not None and not acct.stopped:
            acct.stop()
        self.rss.stop()
        if self.nvml is not None:
            self.nvml.stop()
        return {"status": status, "reason": reason, "measured": self.measured(wall), "device_facts": self.facts,
                "detail": detail, "ended_at": time.time()}

    # ------------------------------------------------------------------------------------- figures
    def _throughput(self) -> dict[str, Any]:
        # lazy: torch; the worker watches its parent before its first torch import
        import torch

        cfg = self.cfg
        flops = peak = None
        mfu_note = None
        if self.model is not None:
            shape = _model_shape(self.model)
            if shape["non_embedding_params"] and shape["layers"] and shape["hidden"]:
                per_token = flops_per_token(shape["non_embedding_params"], shape["layers"], shape["hidden"],
                                            cfg.seq_len)
                flops = per_token * cfg.batch_size * cfg.grad_accum * cfg.seq_len
        if self.device == "cuda":
            name = torch.cuda.get_device_name(0)
            compute = cfg.mixed_precision or (cfg.dtype if cfg.dtype != "fp32" else
                                             ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"))
            peak = device_peak_flops(name, compute)
            if peak is None:
                mfu_note = f"no peak-FLOPs entry for {name} in {compute}"
        else:
            mfu_note = "MFU is reported on GPUs only"
        return self.timer.summary(flops, peak, mfu_note)

    def measured(self, wall_s: float) -> dict[str, Any]:
        """The record's ``measured``: bytes, seconds, per phase and for the run."""
        acct, cuda, rss, nvml = self.acct, self.cuda, self.rss, self.nvml
        state = self.measure_state()
        peaks: dict[str, Any] = {"rss_peak_bytes": int(rss.peak_bytes), "rss_baseline_bytes": int(rss.baseline_bytes),
                                 "rss_method": rss.method}
        if acct is not None:
            peaks["tensor_peak_bytes"] = int(acct.peak_bytes)
            peaks["tensor_category_peaks"] = {k: int(v) for k, v in acct.category_peaks.items()}
        if cuda is not None:
            peaks.update(cuda.totals())
        if nvml is not None:
            peaks["nvml"] = nvml.totals()
        if self.recorder.primary == "tensors":
            peak_bytes = int(acct.peak_bytes)
        elif cuda is not None:
            peak_bytes = int(peaks["max_memory_allocated"])
        else:
            peak_bytes = int(rss.peak_bytes)
        # lazy: imports torch; the worker watches its parent first
        from optimem.harness.state_walker import storage_bytes

        grads = max(self.grads_at_step, default=0)
        if acct is not None and self.shard is None:
            grads = max(grads, int(acct.category_peaks.get("gradients", 0)))
        return {
            "device": self.device,
            "primary_tracker": self.recorder.primary,
            "peak_bytes": peak_bytes,
            "peaks": peaks,
            "phases": self.recorder.phases(),
            "parameters_bytes": (storage_bytes(self.weights) if self.shard is None else
                                 self.shard.parameter_bytes()),
            "buffers_bytes": storage_bytes(self.buffers),
            "gradients_bytes": int(grads),
            "optimizer_state_bytes": int(state.total) if state is not None else None,
            "optimizer_state": state.to_dict() if state is not None else None,
            "optimizer_state_bytes_before_first_step": self.state_before,
            "optimizer_state_bytes_after_step": self.state_after_step,
            "steps_completed": self.recorder.step,
            "throughput": self._throughput(),
            "wall_time_s": wall_s,
            "tracker": {"tensor_accounting": acct is not None, "tensor_ops_seen": acct.ops_seen if acct else 0,
                        "tensor_tracked_steps": min(self.tracked_steps, self.recorder.step) if acct else 0},
            "notes": self.notes,
            **(self._rank_figures(state) if self.shard is not None else {}),
        }

    def _rank_figures(self, state) -> dict[str, Any]:
        """A sharded run's rank, and its model states at the optimizer step (the most seen over the steps,
        each figure on its own; bytes)."""
        states: dict[str, int] = {}
        for m in self.model_states_at_step:
            for k, v in m.items():
                states[k] = max(states.get(k, 0), int(v))
        states["optimizer_state"] = int(state.total) if state is not None else 0
        return {"rank": self.shard.rank, "world_size": self.shard.world_size, "model_states": states}


class CutOff(BaseException):
    """Raised in a single-process worker by SIGTERM (the launcher's timeout, then SIGKILL after a grace period): the
    run stops where it is, as an error whose measurement until then is kept (a BaseException, so no library's
    ``except Exception`` swallows it)."""


def _cut_off_on_sigterm() -> None:
    def stop(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise CutOff("stopped by SIGTERM (the launcher's timeout); what was measured until then is kept")

    signal.signal(signal.SIGTERM, stop)


PARENT_DEATH_SIGNAL = signal.SIGUSR2
"""What the kernel sends the worker when the thread that launched it dies (PR_SET_PDEATHSIG): a signal the
launcher never sends itself (its timeout kill is SIGTERM, then SIGKILL), so the worker knows what it means."""


def _watch_parent(parent: int, run_dir: str | None = None) -> None:
    """Exit if the launching process goes away (so an orphaned run never keeps training), first removing the
    run's temporary folder ``run_dir``: a launcher killed with SIGKILL cannot remove it itself. The kernel
    sends :data:`PARENT_DEATH_SIGNAL` when the launching thread dies; a thread also checks the parent every
    0.5 s (the signal waits while the main thread is inside a long C call)."""
    import shutil  # lazy: imported before the handler exists (a handler that imports can deadlock an import)

    once = threading.RLock()  # the watch thread and the signal handler never remove the folder at the same time

    def orphaned(*_) -> None:
        with once:
            if run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
            os._exit(3)

    with contextlib.suppress(Exception):
        # lazy: only where prctl is reached
        import ctypes

        libc = ctypes.CDLL(None)
        signal.signal(PARENT_DEATH_SIGNAL, orphaned)
        libc.prctl(1, PARENT_DEATH_SIGNAL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        orphaned()

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                orphaned()

    threading.Thread(target=loop, name="optimem-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None, *, parent_pid: int | None = None) -> int:
    """``python -m optimem.harness.worker CONFIG.json RESULT.json``: CONFIG holds ``{"config": {...}, "fault":
    ..., "track_tensors": ..., "parent_pid": ...}``; the worker's result goes to RESULT.json. The worker
    exits when its parent does: the job's ``parent_pid`` (the launcher), or ``parent_pid`` when given (the
    zygote a run was forked from)."""
    argv = sys.argv[1:] if argv is None else argv
    config_path, result_path = argv
    job = read_job(config_path)
    rank, _, world = rank_info()
    if world > 1:  # one rank of a torchrun launch: its parent is torchrun's agent; its result is its own
        _watch_parent(os.getppid())
        result_path = rank_result_path(result_path, rank)
        fault = (job.get("rank_faults") or {}).get(str(rank))
    else:
        parent = parent_pid or job.get("parent_pid")
        if parent:
            run_dir = os.path.dirname(os.path.abspath(config_path))
            _watch_parent(int(parent), run_dir if os.path.basename(run_dir).startswith(RUN_DIR_PREFIX) else None)
        fault = job.get("fault")
        _cut_off_on_sigterm()
    # lazy: torch and transformers; the worker watches its parent first
    from optimem.harness.scenario import RunConfig

    cfg = RunConfig.from_dict(job["config"])
    result = run_measured(cfg, fault=fault, track_tensors=job.get("track_tensors"))
    if world > 1:
        result["node"] = socket.gethostname()  # where this rank ran (several nodes: multi-node runs)
        result["node_facts"] = node_facts()
    write_result(result_path, result)
    sys.stdout.flush()
    sys.stderr.flush()
    if str(result.get("reason", "")).startswith(CutOff.__name__):  # end as the SIGTERM would have ended it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    # Skip interpreter teardown (compile workers, CUDA, NVML threads): the result is on disk.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
