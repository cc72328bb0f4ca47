"""The model-load phase on the CPU: :func:`load_phase`.

A CPU run builds its model in its own memory (``harness/scenario.py``'s ``build_model``: the config's class on the
CPU, randomly initialised, cast to the run's dtype), so whatever the construction and the initialisation hold at
once counts towards the run's peak -- for a small model with large init-time tensors it *is* the peak (GPT-1's
causal-mask buffers are built from ``torch.tril(torch.ones(n_positions, n_positions))``, once in ``__init__`` and
again in ``_init_weights``). The same construction runs here on trace tensors, every storage booked as the
harness's tensor accountant books it. A CUDA run builds on the CPU and moves the model: its device sees none of
this, and no load phase is estimated there.
"""
from __future__ import annotations

import warnings

from ..catalog import ModelSource
from ..inventory import instantiate
from .meta_kernels import cpp_meta_kernels
from .setting import TraceSetting
from .tensor import Recorder, TraceMode, set_recorder


def load_phase(source: ModelSource, setting: TraceSetting) -> tuple[int, int]:
    """``(peak, end)`` bytes of building ``source``'s model on the CPU as a ``bench run`` of ``setting`` does; ``(0,
    0)`` when not estimated (a CUDA or PEFT setting, or a construction the tracer cannot follow)."""
    if setting.device != "cpu" or setting.peft:
        return 0, 0
    rec = Recorder()
    old = set_recorder(rec)
    rec.active = True
    try:
        with warnings.catch_warnings(), cpp_meta_kernels(), TraceMode():
            warnings.simplefilter("ignore")
            model = instantiate(source, device="cpu", dtype=setting.dtype, task=setting.task)
    except Exception:  # noqa: BLE001 - no load phase rather than no estimate
        return 0, 0
    finally:
        rec.active = False
        set_recorder(old)
    live: dict[int, int] = {}
    cur = peak = 0
    for e in rec.events:
        if e[0] == "a":
            live[e[1]] = e[2]
            cur += e[2]
            peak = max(peak, cur)
        elif e[0] == "f":
            cur -= live.pop(e[1], 0)
    del model
    return peak, cur


__all__ = ["load_phase"]
