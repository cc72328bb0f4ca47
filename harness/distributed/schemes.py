"""What each sharding scheme hands the Trainer (used by the rank that trains and the parent that records it).

* ``ddp``: nothing but the launch: the Trainer (through accelerate) wraps the model in ``DistributedDataParallel``
  with its defaults.
* ``fsdp``: ``TrainingArguments(fsdp="full_shard auto_wrap", fsdp_config={"version": 2, ...})``: FSDP2 on every
  decoder layer (the model's ``_no_split_modules`` classes).
* ``zero1`` / ``zero2`` / ``zero3``: ``TrainingArguments(deepspeed=CONFIG)`` with a generated DeepSpeed config
  (:func:`deepspeed_config`).
"""
from __future__ import annotations

from typing import Any

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
SCHEMES = ("ddp", "fsdp", *ZERO_STAGES)


def is_distributed(cfg) -> bool:
    """Whether ``cfg`` is a multi-process run (``num_processes > 1``)."""
    return int(getattr(cfg, "num_processes", 1) or 1) > 1


def deepspeed_config(cfg) -> dict[str, Any]:
    """The DeepSpeed config a ZeRO run hands the Trainer (``TrainingArguments(deepspeed=...)``).

    ``auto`` is what the Trainer fills from its own arguments and the model (``reduce_bucket_size`` =
    hidden², ZeRO-3's ``stage3_prefetch_bucket_size`` = 0.9 hidden² and ``stage3_param_persistence_threshold``
    = 10 hidden); everything else is DeepSpeed's default."""
    stage = ZERO_STAGES[cfg.sharding]
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


def fsdp_config(model) -> dict[str, Any]:
    """The ``fsdp_config`` of an FSDP2 run: full shard, wrapping each of the model's decoder-layer classes
    (``model._no_split_modules``, the classes transformers itself keeps whole)."""
    layers = sorted(set(getattr(model, "_no_split_modules", None) or []))
    out: dict[str, Any] = {"version": 2, "reshard_after_forward": True}
    if layers:
        out["transformer_layer_cls_to_wrap"] = layers
    return out


def model_class(cfg):
    """The transformers class ``cfg`` trains (for its ``_no_split_modules``), built on the meta device."""
    # lazy: builds a model (torch, transformers); the flags alone do not need it
    from optimem.estimators.catalog import resolve
    from optimem.estimators.inventory import instantiate

    return type(instantiate(resolve(cfg.model), device="meta"))


def training_arguments(cfg, model, timeout_s: float | None = None) -> dict[str, Any]:
    """The ``TrainingArguments`` keywords ``cfg``'s sharding scheme adds (empty for one process).
    ``model``: the model or its class; ``timeout_s``: the run's timeout, which bounds how long a collective
    waits for a dead peer (``ddp_timeout``)."""
    if not is_distributed(cfg) and cfg.sharding in ("none", "ddp"):
        return {}
    out: dict[str, Any] = {}
    if timeout_s:
        out["ddp_timeout"] = max(int(timeout_s), 1)
    if cfg.sharding == "fsdp":
        out.update(fsdp="full_shard auto_wrap", fsdp_config=fsdp_config(model))
    elif cfg.sharding in ZERO_STAGES:
        out["deepspeed"] = deepspeed_config(cfg)
        out["deepspeed"]["train_batch_size"] = cfg.batch_size * cfg.grad_accum * cfg.num_processes
        # accelerate takes the DeepSpeed path only when not told use_cpu; on a machine without CUDA,
        # DeepSpeed's CPU accelerator is then the device (gloo backend).
        out["use_cpu"] = False
    return out
