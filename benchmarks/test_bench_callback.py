"""What ``MemoryCallback`` costs a training step once its measured steps are over (target: nothing measurable).

Two measures on the same ~20M-parameter Llama-style model as the tracker benchmarks:

* ``test_events_after_measuring``: the Trainer's callback dispatch of one optimizer step's events
  (``on_step_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``, ``on_step_end``) through a finished
  callback -- the only code of it a later step still runs -- against ``test_events_without_callback``;
* ``test_trainer_steps_after_measuring``: real ``Trainer`` steps after the callback's 2 measured steps, against
  the same Trainer job without the callback, interleaved run by run (``extra_info`` holds both medians and the
  difference in percent).
"""
import statistics
import time

import pytest
import torch
from transformers import TrainerCallback

from .test_bench_optimizer_step import BENCH_LLAMA

BATCH, SEQ, STEPS, MEASURED = 4, 128, 10, 2
EVENTS = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**BENCH_LLAMA))


class _StepClock(TrainerCallback):
    """Wall time of each optimizer step, from one step's end to the next."""

    def __init__(self):
        self.times, self._last = [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def _run(tmp_path, with_callback: bool) -> list[float]:
    from transformers import Trainer, TrainingArguments, default_data_collator

    from optimem.harness.callback import MemoryCallback
    from optimem.harness.scenario import SyntheticTokens

    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch")
    data = SyntheticTokens(BATCH * STEPS, SEQ, BENCH_LLAMA["vocab_size"], 0, False)
    clock = _StepClock()
    callbacks = [clock] + ([MemoryCallback(seq_len=SEQ, steps=MEASURED, save=False, log=lambda s: None)]
                           if with_callback else [])
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
            callbacks=callbacks).train()
    return clock.times[MEASURED + 1:]  # the steps after the callback's measured ones (and one more)


def _handler(with_callback: bool):
    """A CallbackHandler as the Trainer builds it, holding a MemoryCallback that has finished measuring."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    from optimem.harness.callback import MemoryCallback

    cb = MemoryCallback(seq_len=SEQ, save=False, log=lambda s: None)
    cb._done = True  # as after its measured steps
    handler = CallbackHandler([DefaultFlowCallback] + ([cb] if with_callback else []), None, None, None, None)
    args = TrainingArguments(output_dir="/tmp/optimem-bench", use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()

    def step():
        for event in EVENTS:
            handler.call_event(event, args, state, control)

    return step


def test_events_without_callback(benchmark):
    benchmark.group = "callback_events_per_step"
    benchmark(_handler(False))


def test_events_after_measuring(benchmark):
    benchmark.group = "callback_events_per_step"
    benchmark(_handler(True))


@pytest.mark.parametrize("rounds", [3])
def test_trainer_steps_after_measuring(benchmark, tmp_path, rounds):
    benchmark.group = "callback_trainer_steps"
    plain, measured = [], []

    def both():
        for _ in range(rounds):  # interleaved, so machine noise hits both alike
            plain.extend(_run(tmp_path / "a", False))
            measured.extend(_run(tmp_path / "b", True))

    benchmark.pedantic(both, rounds=1, iterations=1)
    p, m = statistics.median(plain), statistics.median(measured)
    benchmark.extra_info.update({"step_s_without": p, "step_s_with_callback_done": m,
                                 "difference_pct": (m - p) / p * 100, "steps_each": len(plain)})
