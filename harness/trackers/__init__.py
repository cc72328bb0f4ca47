"""Memory and time trackers for one Trainer run. Every memory figure is in bytes.

- :mod:`.tensor_accounting`: exact live tensor bytes per category (CPU runs; any device on request).
- :mod:`.rss`: process resident memory, per-phase peaks.
- :mod:`.cuda`: CUDA caching-allocator peaks per phase.
- :mod:`.nvml`: device memory as the driver sees it, sampled in a thread, with the idle baseline.
- :mod:`.throughput`: step timing with warmup excluded, MFU on known GPUs.
- :mod:`.phases`: the phase boundaries (TrainerCallback + model hooks) that drive the others.
"""
