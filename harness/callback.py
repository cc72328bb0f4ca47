"""``MemoryCallback``: optimem inside the user's own ``transformers.Trainer``.

::

    from optimem.harness import MemoryCallback

    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(MemoryCallback(seq_len=2048))
    trainer.train()

When training starts the callback predicts the run from exactly what the Trainer holds -- the model object (its
own trainable set, adapters and dtypes), the ``TrainingArguments`` (optimizer, batch, accumulation, precision,
checkpointing, parallelism) and ``seq_len`` -- prints the estimate, and warns at once when the predicted peak
does not fit the device. It then measures the first ``steps`` optimizer steps by phase with the harness's own
trackers and phase marks (:mod:`optimem.harness.trackers`: the CUDA caching allocator's peaks and NVML on a GPU, the
process RSS high-water mark on CPU, the exact tensor accountant on request), walks the optimizer's state, and
writes the same JSONL record ``bench run`` writes (:mod:`optimem.harness.record`, schema version 2, ``run.source:
"callback"``), so ``bench plot`` and ``bench compare`` read the user's real runs beside the harness's.

After those steps it removes its hooks, stops its trackers and keeps nothing: every later Trainer event returns
at its first line (``benchmarks/test_bench_callback.py`` measures what is left). Only the main process (world
rank 0) measures; a failure of optimem never stops the training (it is printed as one line).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import replace
from typing import Any, Callable

from transformers import TrainerCallback

DEFAULT_STEPS = 3
RECORD_FILE = "optimem.jsonl"
"""The record goes to ``<output_dir>/optimem.jsonl`` unless ``out`` says where."""


class MemoryCallback(TrainerCallback):
    """Predict, then measure, the memory of the Trainer run it is added to (see the module doc).

    ``seq_len``: tokens per sample the run trains on (the prediction needs it before the first batch; if the
    batches turn out another shape, the record is for the shape that ran, and says so). ``steps``: optimizer
    steps to measure (at least 2: step 0 runs before a lazily created optimizer state exists, step 1 is the
    steady state). ``out``: the JSONL file the record is appended to (default ``<output_dir>/optimem.jsonl``;
    ``save=False`` writes nothing). ``track_tensors``: the exact tensor accountant (a dispatch mode, slow) for
    the measured steps, as ``bench run`` uses on CPU; off by default, so a CPU run is measured by its RSS.
    ``gpu``: the device name whose calibrated CUDA constants the estimate uses (default: the one trained on).
    ``log``: where the lines go (default ``print``). After training, :attr:`record` holds the record and
    :attr:`estimate` the prediction."""

    def __init__(self, seq_len: int, *, steps: int = DEFAULT_STEPS, out: str | os.PathLike | None = None,
                 save: bool = True, track_tensors: bool = False, gpu: str | None = None,
                 log: Callable[[str], Any] = print):
        from optimem.estimators.errors import UserError

        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise UserError(f"MemoryCallback: seq_len must be a positive integer (tokens per sample), got {seq_len!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise UserError(f"MemoryCallback: steps must be an integer of at least 2 (step 0 and one steady step), "
                            f"got {steps!r}")
        self.seq_len, self.steps, self.out, self.save = seq_len, steps, out, save
        self.track_tensors, self.gpu, self.log = bool(track_tensors), gpu, log
        self.setup = None
        self.estimate = None
        self.record: dict | None = None
        self.saved_to: str | None = None
        self._active = False
        self._done = False
        self._run = None
        self._phases = None
        self._handles: list = []
        self._stack = contextlib.ExitStack()
        self._shapes: list[tuple[int, int]] = []
        self._t0 = 0.0
        self._max_steps: int | None = None
        self._output_dir: str | None = None

    # --------------------------------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._done or self._active:
            return
        self._done = True  # measure one training, once
        if not state.is_world_process_zero or model is None:
            return
        try:
            self._start(args, state, control, model, optimizer)
        except Exception as exc:  # noqa: BLE001 - optimem never stops the user's training
            self._say(f"not measuring this run: {_one_line(exc)}")
            self._teardown()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._active:
            self._phases.on_pre_optimizer_step(args, state, control)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._active:
            self._phases.on_optimizer_step(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._active:
            return
        self._phases.on_step_end(args, state, control)
        if self._phases.recorder.step >= self.steps:
            self._finish(complete=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._active:
            self._finish(complete=False)

    # --------------------------------------------------------------------------------------- predict
    def _start(self, args, state, control, model, optimizer) -> None:
        from optimem.estimators.estimate import estimate
        from optimem.estimators.user_objects import from_training_arguments
        from optimem.harness.run_config import RunConfig
        from optimem.harness.trackers.phases import PhaseCallback, attach_model_hooks
        from optimem.harness.worker import MeasuredRun

        device = getattr(getattr(args, "device", None), "type", None) or "cpu"
        if device not in ("cuda", "cpu"):
            raise RuntimeError(f"training on {device}: optimem measures CUDA and CPU runs")
        self.setup = from_training_arguments(args, model=model, seq_len=self.seq_len, device=device)
        self._max_steps = getattr(state, "max_steps", None)
        self._output_dir = getattr(args, "output_dir", None)
        try:
            self.estimate = estimate(self.setup, gpu=self.gpu or self._device_name(device))
        except Exception as exc:  # noqa: BLE001 - measure anyway
            self._say(f"cannot estimate this run ({_one_line(exc)}); measuring it anyway")
        else:
            self._report_prediction(device)

        cfg = RunConfig.from_dict(self.setup.to_dict(), steps=self.steps, warmup=1, seed=int(getattr(args, "seed", 0)))
        run = MeasuredRun(cfg, fault=None, track_tensors=self.track_tensors)
        run.model, run.params, run.buffers = model, list(model.parameters()), list(model.buffers())
        run.trainer = _OptimizerHolder(optimizer)
        run.facts.update(self._device_facts(device))
        if device == "cuda":
            with contextlib.suppress(Exception):
                from optimem.harness.trackers.nvml import NvmlSampler

                run.nvml = NvmlSampler(getattr(args.device, "index", None) or 0)
                run.nvml.start()
        run._build_trackers()
        if run.acct is not None:
            self._stack.enter_context(run.acct)
        self._run = run
        self._handles = attach_model_hooks(model, run.recorder,
                                           on_grad=run.acct.mark_gradient if run.acct is not None else None)
        self._handles.append(model.register_forward_pre_hook(self._see_batch, with_kwargs=True))
        self._phases = PhaseCallback(run.recorder, run.on_boundary)
        self._active = True
        self._t0 = time.perf_counter()
        self._phases.on_train_begin(args, state, control)

    def _report_prediction(self, device: str) -> None:
        from optimem.harness.units import human_bytes, human_count

        est, s = self.estimate, self.setup
        b = est.bytes
        shape = f"batch {s.batch_size} x seq {s.seq_len}" + (f" x accum {s.grad_accum}" if s.grad_accum > 1 else "")
        precision = s.dtype + (f" + {s.mixed_precision} autocast" if s.mixed_precision else "")
        self._say(f"predicted for {s.model}: {human_count(est.num_params)} parameters "
                  f"({human_count(est.trainable_params)} trainable), {s.optim}, {shape}, {precision}"
                  + (", gradient checkpointing" if s.gradient_checkpointing else "") + f", on {device}")
        on_device = (est.cuda or {}).get("peak_device")
        self._say(f"  weights {human_bytes(b['weights'])}, gradients {human_bytes(b['gradients'])}, optimizer state "
                  f"{human_bytes(b['optimizer_state'])}, activations {human_bytes(b['activations'])}; peak "
                  f"{human_bytes(b['peak'])} in {est.peak_phase}"
                  + (f"; on the device with CUDA's own terms {human_bytes(on_device)}" if on_device else ""))
        need, what = self._per_device_need(device)
        have = self._device_total(device)
        if need is not None and have and need > have:
            msg = (f"this run will not fit: predicted {what} {human_bytes(need)} > {human_bytes(have)} on this "
                   f"{device} device; lower per_device_train_batch_size (raise gradient_accumulation_steps to keep "
                   "the batch), turn on gradient checkpointing, or pick a leaner optimizer ('bench plan')")
            self._say("WARNING: " + msg)
            warnings.warn(f"optimem: {msg}", ResourceWarning, stacklevel=2)

    def _per_device_need(self, device: str) -> tuple[int | None, str]:
        est, s = self.estimate, self.setup
        if s.sharding != "none" and s.num_processes > 1:
            from optimem.estimators.step_memory import step_memory

            return step_memory(s, s.batch_size).peak, f"per-GPU peak under {s.sharding} on {s.num_processes}"
        if device == "cuda" and est.cuda:
            return int(est.cuda["peak_device"]), "device peak"
        return int(est.bytes["peak"]), "peak"

    @staticmethod
    def _device_total(device: str) -> int | None:
        try:
            if device == "cuda":
                import torch

                return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
            import psutil

            return int(psutil.virtual_memory().total)
        except Exception:  # noqa: BLE001
            return None

    @staticmethod
    def _device_name(device: str) -> str | None:
        if device != "cuda":
            return None
        with contextlib.suppress(Exception):
            import torch

            return torch.cuda.get_device_name(torch.cuda.current_device())
        return None

    @staticmethod
    def _device_facts(device: str) -> dict:
        if device == "cuda":
            with contextlib.suppress(Exception):
                import torch

                from optimem.harness.trackers.cuda import device_facts

                return device_facts(torch.cuda.current_device())
            return {}
        from optimem.harness.env_facts import cpu_name

        return {"device_name": cpu_name()}

    # --------------------------------------------------------------------------------------- measure
    def _see_batch(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if isinstance(kwargs, dict) else None
        if ids is None and args:
            ids = args[0]
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) == 2 and len(self._shapes) < 4096:
            self._shapes.append((int(shape[0]), int(shape[1])))

    def _finish(self, *, complete: bool) -> None:
        run, self._active = self._run, False
        try:
            self._record(run, complete)
        except Exception as exc:  # noqa: BLE001 - optimem never stops the user's training
            self._say(f"could not record the measurement: {_one_line(exc)}")
        finally:
            self._teardown()

    def _record(self, run, complete: bool) -> None:
        from optimem.estimators.estimate import estimate
        from optimem.harness.env_facts import collect_env
        from optimem.harness.record import append_record, build_record, validate
        from optimem.harness.units import human_bytes

        wall = time.perf_counter() - self._t0
        run.recorder.end()  # the next step's forward, opened at the last step's end, saw no forward: dropped
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack.close()
        run.rss.stop()
        if run.nvml is not None:
            run.nvml.stop()
        measured = run.measured(wall)
        cfg, notes = run.cfg, []
        if self._shapes:
            batch, seq = max(b for b, _ in self._shapes), max(s for _, s in self._shapes)
            if (batch, seq) != (cfg.batch_size, cfg.seq_len):
                notes.append(f"the batches that ran were {batch} x {seq} tokens (largest seen), not batch "
                             f"{cfg.batch_size} x seq_len {cfg.seq_len}: the record is for what ran")
                cfg = replace(cfg, batch_size=batch, seq_len=seq)
            if len({s for _, s in self._shapes}) > 1:
                notes.append(f"sequence lengths varied over the measured steps "
                             f"({min(s for _, s in self._shapes)}..{seq}): predicted for the longest")
        predicted = None
        with contextlib.suppress(Exception):
            est = self.estimate if cfg == run.cfg and self.estimate is not None else \
                estimate(cfg.setup(), gpu=self.gpu or self._device_name(run.device))
            predicted = est.to_dict()
        steps_done = run.recorder.step
        phases = measured.get("phases") or {}
        status, reason = "ok", ""
        if not all(f"step0.{k}" in phases for k in ("forward", "backward", "optimizer_step")):
            status, reason = "error", f"training ended after {steps_done} step(s), before step 0 was measured whole"
        elif not complete:
            notes.append(f"training ended after {steps_done} of the {self.steps} steps to measure")
        measured["notes"] = list(measured.get("notes") or []) + notes
        record = build_record(
            config=replace(cfg, steps=max(steps_done, 1), warmup=min(1, max(steps_done - 1, 0))).to_dict()
            if steps_done >= 1 else cfg.to_dict(),
            status=status, reason=reason, measured=measured, predicted=predicted,
            env={**collect_env(run.device, run.spec), **{k: v for k, v in run.facts.items() if v is not None}},
            run={"source": "callback", "isolated": False, "resolved_device": run.device, "duration_s": round(wall, 3),
                 "measured_steps": steps_done, "max_steps": self._max_steps})
        validate(record)
        self.record = record
        if self.save:
            path = self.out or os.path.join(self._output_dir or ".", RECORD_FILE)
            self.saved_to = str(append_record(path, record, validate_first=False))
        peak = measured.get("peak_bytes")
        pred = predicted["bytes"]["peak"] if predicted else None
        line = f"measured over the first {steps_done} step(s): "
        if measured.get("primary_tracker") == "rss":
            # the process also holds Python, torch and the model: compare what training added to both
            base = measured["peaks"]["rss_baseline_bytes"]
            line += (f"process RSS peak {human_bytes(peak)}, {human_bytes(max(peak - base, 0))} above the "
                     f"{human_bytes(base)} it held when training began")
            if pred is not None:
                line += (f"; predicted tensor peak {human_bytes(pred)}, "
                         f"{human_bytes(max(pred - predicted['bytes']['weights'], 0))} above the weights")
        else:
            what = "live tensors" if measured.get("primary_tracker") == "tensors" else "CUDA allocated"
            line += f"peak {human_bytes(peak)} ({what})"
            if pred is not None:
                line += f", predicted {human_bytes(pred)}" + (f" ({(pred - peak) / peak:+.1%})" if peak else "")
        if self.saved_to:
            line += f"; record appended to {self.saved_to} ('bench plot {self.saved_to}')"
        self._say(line)
        for note in notes:
            self._say(f"  note: {note}")

    def _teardown(self) -> None:
        """Drop every hook, tracker and reference: nothing of the callback stays in the training loop."""
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles = []
        with contextlib.suppress(Exception):
            self._stack.close()
        run = self._run
        if run is not None:
            with contextlib.suppress(Exception):
                run.rss.stop()
            if run.nvml is not None:
                with contextlib.suppress(Exception):
                    run.nvml.stop()
        self._active, self._run, self._phases, self._shapes = False, None, None, []

    def _say(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.log(f"optimem: {text}")


class _OptimizerHolder:
    """What :class:`optimem.harness.worker.MeasuredRun` reads of a trainer: its optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


__all__ = ["DEFAULT_STEPS", "MemoryCallback", "RECORD_FILE"]
