"""What a sweep shows while it runs (stderr): a rich progress bar with ETA on a terminal, or one line per finished
run (:func:`run_line`) and per max-batch search (:func:`max_batch_line`)."""
from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from optimem.harness.grid import config_label
from optimem.harness.results import pct_error, predicted_peak
from optimem.harness.units import human_bytes


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = max(int(round(s)), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def run_line(record: dict, *, reused: bool = False) -> str:
    """A one-line result of a run: status, label, peak vs prediction, throughput, duration."""
    c, m = record["config"], record.get("measured") or {}
    status = record["status"]
    text = f"{status:<7} {config_label(c)}"
    if m.get("peak_bytes") is not None and status in ("ok", "oom"):
        text += f"  peak {human_bytes(m['peak_bytes'])}"
        pred, complete = predicted_peak(record)
        if pred is not None and status == "ok" and complete:
            err = pct_error(pred, m["peak_bytes"])
            text += f" (predicted {human_bytes(pred)}, {err:+.1f}%)"
        tp = (m.get("throughput") or {}).get("tokens_per_s")
        if tp and status == "ok":
            text += f"  {tp:,.0f} tok/s"
    if status != "ok":
        text += f"  - {record.get('reason', '')[:160]}"
    dur = (record.get("run") or {}).get("duration_s")
    if reused:
        text += "  (recorded earlier)"
    elif dur:
        text += f"  {dur:.1f} s"
    return text


class Reporter:
    """Progress on stderr: a rich progress bar with ETA on a terminal, or one line per finished run."""

    def __init__(self, total: int, mode: str = "auto", title: str = "sweep", stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.total = total
        self.done = 0
        self.title = title
        self.t0 = time.perf_counter()
        self._progress = None
        self._task = None
        self._lock = threading.Lock()
        self._running: dict[int, str] = {}

    def __enter__(self):
        if self.mode == "bar":
            console = Console(file=self.stream)
            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[now]}"),
                                      console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, now="")
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def eta(self) -> float | None:
        if not self.done:
            return None
        return (time.perf_counter() - self.t0) / self.done * max(self.total - self.done, 0)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def started(self, label: str) -> None:
        with self._lock:
            self._running[threading.get_ident()] = label
            self._refresh()

    def finished_thread(self) -> None:
        with self._lock:
            self._running.pop(threading.get_ident(), None)
            self._refresh()

    def _refresh(self) -> None:
        if self._progress is not None:
            now = "; ".join(self._running.values())
            self._progress.update(self._task, now=(now[:70] + "...") if len(now) > 73 else now)

    def line(self, text: str, advance: int = 0) -> None:
        self.done += advance
        if self.mode == "none":
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
            if advance:
                self._progress.advance(self._task, advance)
            return
        width = len(str(self.total))
        eta = self.eta()
        prefix = f"[{self.done:>{width}}/{self.total}]" if advance else " " * (2 * width + 3)
        suffix = f"  ETA {_fmt_duration(eta)}" if advance and eta is not None and self.done < self.total else ""
        print(f"{prefix} {text}{suffix}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.mode == "none":
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)



def max_batch_line(summary: dict) -> str:
    limit = summary.get("memory_limit_bytes")
    where = f"under {human_bytes(limit)}" if limit else f"on {summary.get('device')}"
    if summary.get("max_batch_size") is None:
        return f"max-batch {summary['label']}: {summary.get('reason')}"
    mb = summary["max_batch_size"]
    text = f"max-batch {summary['label']}: {'>=' if summary.get('capped') else ''}{mb} {where}"
    if summary.get("peak_bytes_at_max"):
        text += f" (peak {human_bytes(summary['peak_bytes_at_max'])})"
    if summary.get("first_failing_batch"):
        text += f"; {summary['first_failing_batch']} does not fit"
    text += f"; {summary.get('runs', 0)} runs"
    if not summary.get("complete", True):
        text += f"; {summary.get('reason')}"
    return text
