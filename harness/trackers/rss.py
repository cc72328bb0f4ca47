"""Process resident memory (RSS): per-phase peaks in bytes.

On Linux the kernel keeps the exact high-water mark (``VmHWM`` in ``/proc/self/status``) and lets a
process reset it (writing ``5`` to ``/proc/self/clear_refs``), so each phase's peak is exact and costs
two small file operations at the boundaries. Elsewhere a psutil sampler thread polls RSS every
``interval_s`` seconds (a peak shorter than the interval can be missed).
"""
from __future__ import annotations

import threading

import psutil

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _read_status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class RssTracker:
    """RSS of this process, bytes. ``method`` is ``"hwm"`` (kernel high-water mark) or ``"sampled"``."""

    def __init__(self, interval_s: float = 0.01):
        self._proc = psutil.Process()
        self.baseline_bytes = self._proc.memory_info().rss
        self.peak_bytes = self.baseline_bytes
        self.method = "hwm" if (_read_status_kb("VmHWM:") is not None and _reset_hwm()) else "sampled"
        self._interval = interval_s
        self._phase_peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.method == "sampled" and self._thread is None:
            self._thread = threading.Thread(target=self._sample, name="optimem-rss", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._proc.memory_info().rss
            with self._lock:
                self._phase_peak = max(self._phase_peak, rss)

    def current_bytes(self) -> int:
        return self._proc.memory_info().rss

    def start_phase(self, name: str) -> None:
        if self.method == "hwm":
            _reset_hwm()
        with self._lock:
            self._phase_peak = self.current_bytes()

    def end_phase(self) -> dict[str, int]:
        """``{"peak_bytes", "end_bytes"}`` of the phase just ended."""
        end = self.current_bytes()
        if self.method == "hwm":
            peak = _read_status_kb("VmHWM:") or end
        else:
            with self._lock:
                peak = self._phase_peak
        peak = max(peak, end)
        self.peak_bytes = max(self.peak_bytes, peak)
        return {"peak_bytes": int(peak), "end_bytes": int(end)}


__all__ = ["RssTracker"]
