"""CUDA caching-allocator statistics per phase, in bytes (``torch.cuda`` memory APIs).

At each phase start the allocator's peak counters are reset; at its end the phase reports
``max_memory_allocated`` (tensor bytes), ``max_memory_reserved`` (what the allocator holds from the
driver), the active-bytes peak from ``memory_stats()`` and how many allocations had to free cached
blocks and retry (``num_alloc_retries``: a sign of fragmentation near the memory limit).
"""
from __future__ import annotations

import torch


class CudaAllocatorTracker:
    """Allocator figures for one CUDA device (bytes; ``alloc_retries`` and ``ooms`` are counts)."""

    def __init__(self, device: int | str | torch.device = 0):
        self.device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        self._retries0 = 0
        self._ooms0 = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.peak_active_bytes = 0

    def _stats(self) -> dict:
        return torch.cuda.memory_stats(self.device)

    def start_phase(self, name: str) -> None:
        stats = self._stats()
        self._retries0 = int(stats.get("num_alloc_retries", 0))
        self._ooms0 = int(stats.get("num_ooms", 0))
        torch.cuda.reset_peak_memory_stats(self.device)

    def end_phase(self) -> dict[str, int]:
        stats = self._stats()
        out = {
            "peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
            "reserved_peak_bytes": int(torch.cuda.max_memory_reserved(self.device)),
            "active_peak_bytes": int(stats.get("active_bytes.all.peak", 0)),
            "end_bytes": int(torch.cuda.memory_allocated(self.device)),
            "reserved_end_bytes": int(torch.cuda.memory_reserved(self.device)),
            "alloc_retries": int(stats.get("num_alloc_retries", 0)) - self._retries0,
            "ooms": int(stats.get("num_ooms", 0)) - self._ooms0,
        }
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, out["peak_bytes"])
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, out["reserved_peak_bytes"])
        self.peak_active_bytes = max(self.peak_active_bytes, out["active_peak_bytes"])
        return out

    def totals(self) -> dict[str, int]:
        """Run-wide figures: peaks over all phases, the allocator's cumulative counters and its whole
        ``memory_stats()`` at the end of the run (numbers only; the ``.peak`` entries are since the last phase's reset)."""
        stats = self._stats()
        return {"max_memory_allocated": self.peak_allocated_bytes, "max_memory_reserved": self.peak_reserved_bytes,
                "active_peak_bytes": self.peak_active_bytes,
                "alloc_retries": int(stats.get("num_alloc_retries", 0)), "ooms": int(stats.get("num_ooms", 0)),
                "memory_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}}


def device_facts(device: int | str | torch.device = 0) -> dict:
    """Name, total memory (bytes) and compute capability of a CUDA device (initialises CUDA)."""
    props = torch.cuda.get_device_properties(device)
    return {"device_name": props.name, "device_total_memory_bytes": int(props.total_memory),
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessor_count": int(props.multi_processor_count)}


__all__ = ["CudaAllocatorTracker", "device_facts"]
