"""Step timing and throughput with warmup excluded; model FLOPs utilisation (MFU) from the FLOPs and peak given.

A step runs from the end of the previous step (so the batch fetch is inside it) to ``on_step_end``;
the optimizer step from ``on_pre_optimizer_step`` to ``on_optimizer_step``. On CUDA the clock is read
after ``torch.cuda.synchronize()`` so a step's time covers its kernels, not just their launches. The
first ``warmup`` steps are dropped from every figure. Times are seconds.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default)."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(values: list[float]) -> dict[str, float] | None:
    """``{"p50", "p90", "mean", "min", "max"}`` seconds, or None for no values."""
    if not values:
        return None
    return {"p50": _percentile(values, 50), "p90": _percentile(values, 90), "mean": sum(values) / len(values),
            "min": min(values), "max": max(values)}


@dataclass
class ThroughputTracker:
    """Collects step and optimizer-step durations; ``sync`` is called before every clock read."""

    samples_per_step: int
    tokens_per_step: int
    warmup: int
    sync: Callable[[], None] | None = None
    step_times: list[float] = field(default_factory=list)
    optimizer_times: list[float] = field(default_factory=list)
    _last: float | None = None
    _opt_start: float | None = None

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def train_begin(self) -> None:
        self._last = self._now()

    def pre_optimizer_step(self) -> None:
        self._opt_start = self._now()

    def post_optimizer_step(self) -> None:
        if self._opt_start is not None:
            self.optimizer_times.append(self._now() - self._opt_start)
            self._opt_start = None

    def step_end(self) -> None:
        now = self._now()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    def summary(self, flops_per_step: float | None = None, peak: float | None = None,
                mfu_note: str | None = None) -> dict:
        """Figures over the steps after warmup (seconds, samples/s, tokens/s, MFU as a fraction)."""
        steps = self.step_times[self.warmup:]
        opt = self.optimizer_times[self.warmup:]
        total = sum(steps)
        out: dict = {"warmup_steps": self.warmup, "measured_steps": len(steps),
                     "samples_per_step": self.samples_per_step, "tokens_per_step": self.tokens_per_step,
                     "samples_per_s": None, "tokens_per_s": None, "step_time_s": summarize(steps),
                     "optimizer_step_time_s": summarize(opt), "all_step_times_s": list(self.step_times),
                     "flops_per_step": flops_per_step, "peak_flops": peak, "mfu": None, "mfu_note": mfu_note}
        if steps and total > 0:
            out["samples_per_s"] = self.samples_per_step * len(steps) / total
            out["tokens_per_s"] = self.tokens_per_step * len(steps) / total
            if flops_per_step and peak:
                out["mfu"] = flops_per_step * len(steps) / total / peak
        return out


__all__ = ["ThroughputTracker", "summarize"]
