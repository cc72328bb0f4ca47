"""Process-level fixes that let the harness run a real Trainer job the way a fresh process would.

Call :func:`prepare_run` right before building each ``Trainer`` (``optimem.harness.scenario.build_trainer``):

* bitsandbytes keeps a process-wide ``GlobalOptimManager`` singleton. For 8-bit bnb optimizers the
  Trainer registers every ``nn.Embedding`` weight there with ``optim_bits=32``; bnb then records the
  override by *position* (``index2config[(group, index)]``) and by ``id(param)``, and never forgets it.
  A second Trainer in the same process inherits the first one's overrides: whichever parameter sits at
  an old embedding's position gets 32-bit state (measured: +24 448 B on tiny-llama after a tiny-gpt2 run,
  whose ``wpe`` sat at the index of llama's first 4096-element ``q_proj``).
  A fresh process has an empty manager, so the harness resets it before every run (and the page
  manager's list of paged buffers, which also outlives each optimizer).
* torch-optimi 0.3.3 decides whether to use its Triton kernels by testing an *empty* parameter list
  (``optimi.utils._default_to_triton([])`` is ``HAS_TRITON``), so whenever ``triton`` is importable the
  first step of StableAdamW on a CPU tensor fails with ``RuntimeError: 0 active drivers``. Setting the
  module switch ``optimi.utils.HAS_TRITON = False`` for a CPU run gives what optimi does when triton is
  not installed (every CPU-only torch install): its PyTorch for-loop path. The Trainer gives no way to
  pass ``triton=False`` (it forwards only ``max_lr``, ``kahan_sum`` and ``decouple_lr``).
* ``eager=True`` turns off ``torch.compile`` (``TORCHDYNAMO_DISABLE=1``). torchao's AdamW8bit /
  AdamW4bit compile ``single_param_adam`` once per parameter shape/dtype/state kind (``dynamic=False``,
  cache limit lifted), which costs 12-31 s per tiny CPU run; eagerly the same function runs through the
  state subclasses' own ``copy_``/``lerp`` kernels. The states are created in ``step()`` outside the
  compiled function, so the layout is identical (checked: the same measured bytes, compiled or eager).
  Only tests use it; a measured bench run should keep the default.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_OPTIMI_HAS_TRITON: bool | None = None


def reset_bitsandbytes_manager() -> bool:
    """Empty bitsandbytes' process-wide singletons, as in a fresh process: the ``GlobalOptimManager``
    (per-parameter config overrides) and the ``GlobalPageManager``'s list of paged buffers (every paged
    optimizer appends its buffers there and the walker reaches it through ``optimizer.page_mng``).
    Returns whether bitsandbytes is loaded."""
    mod = sys.modules.get("bitsandbytes.optim.optimizer")
    if mod is None:
        return False
    mod.GlobalOptimManager.get_instance().initialize()
    functional = sys.modules.get("bitsandbytes.functional")
    if functional is not None and hasattr(functional, "GlobalPageManager"):
        functional.GlobalPageManager.get_instance().paged_tensors.clear()
    return True


def set_optimi_triton(allowed: bool) -> bool | None:
    """Let torch-optimi auto-select its Triton kernels only if ``allowed`` (and triton is importable).

    Returns the value now in ``optimi.utils.HAS_TRITON`` (None when optimi is not installed)."""
    global _OPTIMI_HAS_TRITON
    if importlib.util.find_spec("optimi") is None:
        return None
    import optimi.utils  # lazy: optimi is optional

    if _OPTIMI_HAS_TRITON is None:
        _OPTIMI_HAS_TRITON = bool(optimi.utils.HAS_TRITON)
    optimi.utils.HAS_TRITON = _OPTIMI_HAS_TRITON and allowed
    return optimi.utils.HAS_TRITON


def set_eager(eager: bool) -> bool:
    """Make every later ``torch.compile`` call a no-op (``eager=True``) or a real compile again.

    Uses ``TORCHDYNAMO_DISABLE=1``, which torch reads at each ``torch.compile`` call (torchao calls it at
    every step). ``torch._dynamo.config.disable`` would not do: with ``fullgraph=True``, as torchao
    compiles, it raises "found no compiled frames". Returns the previous setting (True when eager)."""
    previous = os.environ.get("TORCHDYNAMO_DISABLE", "") == "1"
    if eager:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    else:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
    return previous


def prepare_run(optim: str, device: str, *, eager: bool | None = None) -> None:
    """Everything a run of ``optim`` on ``device`` ("cpu", "cuda") needs before its Trainer is built."""
    reset_bitsandbytes_manager()
    if optim == "stable_adamw" or "optimi" in sys.modules:
        set_optimi_triton(device != "cpu")
    if eager is not None:
        set_eager(eager)


__all__ = ["prepare_run", "reset_bitsandbytes_manager", "set_eager", "set_optimi_triton"]
