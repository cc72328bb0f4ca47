"""Device memory as the driver sees it (NVML, nvidia-ml-py), sampled in a thread, in bytes.

NVML reports the memory used on the whole device: the CUDA context, the caching allocator's reserved
blocks, cuBLAS/cuDNN workspaces and any other process's memory. The worker reads an idle baseline
before CUDA is initialised and again once the context exists, so the context shows as its own figure
(``cuda_context_bytes``); the sampler then records the highest ``used`` seen every ``interval_s`` (a
spike shorter than the interval can be missed). ``nvmlDeviceGetMemoryInfo`` is called with
``version=nvmlMemory_v2`` where the driver supports it (its ``used`` excludes the driver's reserved
memory, which v2 reports separately).
"""
from __future__ import annotations

import os
import threading
import time


def nvml_available() -> bool:
    try:
        import pynvml  # lazy: pynvml is optional

        pynvml.nvmlInit()
        return True
    except Exception:
        return False


def visible_device_handle(index: int = 0):
    """The NVML handle of CUDA device ``index`` as this process sees it (honours CUDA_VISIBLE_DEVICES)."""
    import pynvml  # lazy: pynvml is optional

    pynvml.nvmlInit()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and index < len(visible):
        ident = visible[index]
        if ident.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(ident))
        return pynvml.nvmlDeviceGetHandleByUUID(ident)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def memory_info(handle) -> dict[str, int]:
    """``{"used", "total", "reserved"}`` bytes (v2 memory info where the driver has it)."""
    import pynvml  # lazy: pynvml is optional

    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        reserved = int(getattr(info, "reserved", 0))
    except Exception:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        reserved = 0
    return {"used": int(info.used), "total": int(info.total), "reserved": reserved}


def driver_facts(index: int = 0) -> dict:
    """Device name, driver version and total memory without initialising CUDA (empty if NVML is absent)."""
    try:
        import pynvml  # lazy: pynvml is optional

        handle = visible_device_handle(index)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"device_name": name.decode() if isinstance(name, bytes) else str(name),
                "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                "device_total_memory_bytes": memory_info(handle)["total"]}
    except Exception:
        return {}


class NvmlSampler:
    """Samples device ``used`` bytes every ``interval_s`` in a daemon thread; per-phase and run peaks."""

    def __init__(self, index: int = 0, interval_s: float = 0.01):
        self.handle = visible_device_handle(index)
        self.interval_s = interval_s
        self.baseline_bytes = memory_info(self.handle)["used"]
        self.context_bytes: int | None = None
        self.peak_used_bytes = self.baseline_bytes
        self.samples = 0
        self._phase_peak = self.baseline_bytes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record_context(self, allocator_reserved_bytes: int = 0) -> int:
        """Call once the CUDA context exists: ``used`` now minus the idle baseline (and minus what the
        caching allocator already reserved) is the context's cost."""
        used = memory_info(self.handle)["used"]
        self.context_bytes = max(used - self.baseline_bytes - allocator_reserved_bytes, 0)
        return self.context_bytes

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="optimem-nvml", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                used = memory_info(self.handle)["used"]
            except Exception:
                break
            with self._lock:
                self.samples += 1
                if used > self._phase_peak:
                    self._phase_peak = used
                if used > self.peak_used_bytes:
                    self.peak_used_bytes = used
            self._stop.wait(max(self.interval_s - (time.perf_counter() - t0), 0.0))

    def start_phase(self, name: str) -> None:
        used = memory_info(self.handle)["used"]
        with self._lock:
            self._phase_peak = used

    def end_phase(self) -> dict[str, int]:
        used = memory_info(self.handle)["used"]
        with self._lock:
            peak = max(self._phase_peak, used)
            self.peak_used_bytes = max(self.peak_used_bytes, peak)
        return {"peak_used_bytes": int(peak), "end_used_bytes": int(used)}

    def totals(self) -> dict[str, int | None]:
        return {"baseline_bytes": self.baseline_bytes, "cuda_context_bytes": self.context_bytes,
                "peak_used_bytes": self.peak_used_bytes,
                "peak_above_baseline_bytes": self.peak_used_bytes - self.baseline_bytes,
                "samples": self.samples, "interval_s": self.interval_s}


__all__ = ["NvmlSampler", "driver_facts", "memory_info", "nvml_available", "visible_device_handle"]
