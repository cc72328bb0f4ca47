"""Sharding and offload settings as the Trainer takes them: a DeepSpeed config (``--deepspeed ds.json``) and FSDP
options (``--fsdp "full_shard offload auto_wrap"``, ``--fsdp-config``), parsed and checked once.

:func:`read_deepspeed` reads the file (or JSON text, or a dict) a user passes to ``TrainingArguments(deepspeed=...)``
into a :class:`DeepSpeedSettings`: the ZeRO stage, where the optimizer state and the parameters are offloaded
(``none``/``cpu``/``nvme``), ``pin_memory``, the bucket sizes (elements) and the optimizer section. ``"auto"`` is
resolved as ``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig`` resolves it: batch, accumulation and
precision from the setup (an explicit value that differs is the Trainer's "mismatch" error), and
``reduce_bucket_size`` = hidden², ``stage3_prefetch_bucket_size`` = int(0.9 hidden²),
``stage3_param_persistence_threshold`` = 10 hidden from the model's config (:meth:`DeepSpeedSettings.resolved`).
Defaults are DeepSpeed's own (``deepspeed/runtime/zero/config.py``, ``offload_config.py``, v0.19;
``tests/test_offload.py`` checks them against the installed ``DeepSpeedZeroConfig``). No byte counts here: see
:mod:`optimem.estimators.offload`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import UserError

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
AUTO_HIDDEN_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                 "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
                 "stage3_max_live_parameters": 1_000_000_000, "sub_group_size": 1_000_000_000}
"""DeepSpeed's defaults (elements) for the zero_optimization keys that size buffers (pin_memory defaults to
true since DeepSpeed 0.19)."""
OFFLOAD_OPTIMIZER_DEFAULTS = {"buffer_count": 4, "pin_memory": True}
OFFLOAD_PARAM_DEFAULTS = {"buffer_count": 5, "buffer_size": 100_000_000, "max_in_cpu": 1_000_000_000,
                          "pin_memory": True}
CPU_OPTIMIZERS = {"adam": 8, "adamw": 8, "lion": 4}
"""DeepSpeed optimizer sections the offloaded step runs as DeepSpeedCPUAdam / DeepSpeedCPULion: fp32 state bytes
per trainable parameter (exp_avg + exp_avg_sq; Lion: exp_avg)."""
_ALIASES = {"prefetch_bucket_size": "stage3_prefetch_bucket_size",
            "param_persistence_threshold": "stage3_param_persistence_threshold",
            "max_live_parameters": "stage3_max_live_parameters"}


@dataclass(frozen=True)
class DeepSpeedSettings:
    """A DeepSpeed config as far as memory goes. ``stage``: ZeRO 0-3. ``offload_optimizer`` / ``offload_param``:
    ``none``, ``cpu`` or ``nvme``; ``*_pin_memory``: page-locked host buffers. ``buckets``: the sizing keys of
    :data:`ZERO_DEFAULTS` (elements; ``None`` where ``auto`` waits for the model's hidden size).
    ``optimizer``: the config's optimizer type, lowercase (None: the Trainer builds its own ``--optim``).
    ``precision``: ``bf16``/``fp16`` when the config enables one (``auto``: the setup's)."""

    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    optimizer_pin_memory: bool = True
    param_pin_memory: bool = True
    optimizer_buffer_count: int = 4
    param_buffer_count: int = 5
    param_buffer_size: int = 100_000_000
    buckets: tuple[tuple[str, int | None], ...] = ()
    optimizer: str | None = None
    precision: str | None = None
    force_cpu_optimizer: bool = True

    def bucket(self, key: str, hidden: int | None = None) -> int:
        """A bucket size in elements, ``auto`` resolved from ``hidden`` as the Trainer does."""
        value = dict(self.buckets).get(key, ZERO_DEFAULTS[key])
        if value is not None:
            return int(value)
        if not hidden:
            raise UserError(f"DeepSpeed zero_optimization.{key} is 'auto' and the model config has no hidden_size: "
                            "give an integer, as the Trainer asks")
        return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden}[key]

    @property
    def sharding(self) -> str:
        return "ddp" if self.stage == 0 else f"zero{self.stage}"

    @property
    def offloads(self) -> bool:
        return self.offload_optimizer != "none" or self.offload_param != "none"


def _load(value: Any, what: str) -> dict:
    """A JSON object from a path, JSON text or a mapping."""
    if isinstance(value, Mapping):
        return json.loads(json.dumps(dict(value)))
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{what} must be a JSON file or a JSON object, got {value!r}")
    text = value.strip()
    if not text.startswith("{"):
        if not os.path.isfile(text):
            raise UserError(f"{what} {value!r}: no such file; give the JSON file you pass to the Trainer")
        try:
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{what} {value!r} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{what} {value!r} is not JSON ({exc}); give the JSON object the Trainer takes") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {value!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _offload(section: Any, key: str) -> dict:
    if section in (None, {}):
        return {"device": "none"}
    if not isinstance(section, Mapping):
        raise UserError(f"DeepSpeed zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}, "
                        f"got {section!r}")
    device = str(section.get("device", "none")).strip().lower()
    if device not in OFFLOAD_DEVICES:
        raise UserError(f"DeepSpeed zero_optimization.{key}.device {section.get('device')!r} does not exist: use "
                        "none, cpu or nvme")
    if device == "nvme" and not section.get("nvme_path"):
        raise UserError(f"DeepSpeed zero_optimization.{key}.device nvme needs nvme_path (the NVMe mount it swaps to)")
    return {**dict(section), "device": device}


def _enabled(data: Mapping, key: str) -> bool | None:
    """``<key>.enabled`` of a DeepSpeed config: True/False, or None for ``auto`` or absent."""
    value = (data.get(key) or {}).get("enabled") if isinstance(data.get(key), Mapping) else None
    if value == "auto" or value is None:
        return None
    return str(value).lower() in ("true", "1")


def read_deepspeed(value: Any, *, batch_size: int | None = None, grad_accum: int | None = None,
                   mixed_precision: str | None = None) -> DeepSpeedSettings:
    """Parse and check a DeepSpeed config (see the module doc). The setup's ``batch_size``, ``grad_accum`` and
    ``mixed_precision`` are matched against explicit values as the Trainer's ``fill_match`` does."""
    data = _load(value, "--deepspeed")
    zero = data.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise UserError(f"DeepSpeed zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    opt, par = _offload(zero.get("offload_optimizer"), "offload_optimizer"), _offload(zero.get("offload_param"),
                                                                                      "offload_param")
    if par["device"] != "none" and stage != 3:
        raise UserError(f"DeepSpeed offload_param needs ZeRO stage 3 (stage {stage} keeps every parameter on the "
                        "GPU and ignores it): set stage 3 or remove offload_param")
    if opt["device"] != "none" and stage == 0:
        raise UserError("DeepSpeed offload_optimizer needs ZeRO stage 1, 2 or 3 (stage 0 has no partitioned "
                        "optimizer to offload)")
    if opt["device"] == "nvme" and stage != 3:
        raise UserError(f"DeepSpeed offload_optimizer to nvme (ZeRO-Infinity) needs stage 3: stage {stage} keeps "
                        "the offloaded state in host RAM; use device cpu or stage 3")
    if stage < 3:
        stray = sorted(k for k in zero if str(k).startswith("stage3_"))
        if stray:
            raise UserError(f"DeepSpeed {', '.join(stray)} only applies to ZeRO stage 3, not stage {stage}: remove "
                            "it or set stage 3")
    buckets = []
    for raw_key in list(zero):
        key = _ALIASES.get(raw_key, raw_key)
        if key not in ZERO_DEFAULTS:
            continue
        v = zero[raw_key]
        if v == "auto" and key in AUTO_HIDDEN_KEYS:
            buckets.append((key, None))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            buckets.append((key, int(v)))
        else:
            raise UserError(f"DeepSpeed zero_optimization.{raw_key} must be a positive number"
                            f"{' or auto' if key in AUTO_HIDDEN_KEYS else ''}, got {v!r}")
    optimizer = data.get("optimizer")
    otype = None
    if optimizer is not None:
        otype = str((optimizer or {}).get("type", "")).lower() if isinstance(optimizer, Mapping) else ""
        if not otype:
            raise UserError("DeepSpeed optimizer section needs a type (e.g. \"AdamW\")")
    force = str(zero.get("zero_force_ds_cpu_optimizer", data.get("zero_force_ds_cpu_optimizer", True))).lower() \
        not in ("false", "0")
    if opt["device"] != "none":
        if otype is None and force:
            raise UserError("DeepSpeed offload_optimizer with the Trainer's own optimizer (no optimizer section): "
                            "DeepSpeed raises ZeRORuntimeException; add \"optimizer\": {\"type\": \"AdamW\"} "
                            "(DeepSpeedCPUAdam) or set zero_force_ds_cpu_optimizer false")
        if otype is not None and otype not in CPU_OPTIMIZERS:
            raise UserError(f"DeepSpeed optimizer {optimizer.get('type')!r} with offload_optimizer: optimem models "
                            f"the CPU optimizers DeepSpeed offloads to ({', '.join(CPU_OPTIMIZERS)})")
    checks = (("train_micro_batch_size_per_gpu", batch_size, "--batch-size"),
              ("gradient_accumulation_steps", grad_accum, "--grad-accum"))
    for key, mine, flag in checks:
        theirs = data.get(key)
        if theirs not in (None, "auto") and mine is not None and theirs != mine:
            raise UserError(f"DeepSpeed {key}={theirs} but {flag} {mine}: the Trainer refuses the mismatch; set it "
                            "to auto or give the same value")
    precision = None
    for name in ("bf16", "fp16"):
        on = _enabled(data, name)
        if on is True:
            precision = name
        if on is not None and mixed_precision is not None and on != (mixed_precision == name):
            raise UserError(f"DeepSpeed {name}.enabled={str(on).lower()} but the setup's mixed precision is "
                            f"{mixed_precision}: the Trainer refuses the mismatch; set it to auto")
        if on is True and mixed_precision is None:
            raise UserError(f"DeepSpeed {name}.enabled=true but --{name} is not given: the Trainer refuses the "
                            f"mismatch; pass --{name} or set it to auto")
    return DeepSpeedSettings(
        stage=int(stage), offload_optimizer=opt["device"], offload_param=par["device"],
        optimizer_pin_memory=bool(opt.get("pin_memory", OFFLOAD_OPTIMIZER_DEFAULTS["pin_memory"])),
        param_pin_memory=bool(par.get("pin_memory", OFFLOAD_PARAM_DEFAULTS["pin_memory"])),
        optimizer_buffer_count=int(opt.get("buffer_count", OFFLOAD_OPTIMIZER_DEFAULTS["buffer_count"])),
        param_buffer_count=int(par.get("buffer_count", OFFLOAD_PARAM_DEFAULTS["buffer_count"])),
        param_buffer_size=int(par.get("buffer_size", OFFLOAD_PARAM_DEFAULTS["buffer_size"])),
        buckets=tuple(sorted(buckets)), optimizer=otype, precision=precision, force_cpu_optimizer=force)


@dataclass(frozen=True)
class FsdpSettings:
    """FSDP options as the Trainer takes them: FSDP2 full shard, ``offload`` (FSDP2's ``CPUOffloadPolicy``:
    sharded parameters, their gradients and the optimizer step on the host), ``pin_memory``."""

    offload: bool = False
    pin_memory: bool = True


def read_fsdp(options: Any, config: Any = None) -> FsdpSettings:
    """``--fsdp "full_shard offload auto_wrap"`` and ``--fsdp-config`` (file, JSON text or dict; keys with or
    without the ``fsdp_`` prefix). optimem models FSDP2 full shard, with or without CPU offload."""
    cfg = {} if config in (None, "") else _load(config, "--fsdp-config")
    cfg = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in cfg.items()}
    if isinstance(options, str):
        items = options.split()
    elif isinstance(options, (list, tuple)):
        items = [str(getattr(i, "value", i)) for i in options]
    elif options is True:
        items = ["full_shard"]
    else:
        raise UserError(f"--fsdp takes the Trainer's option string, e.g. 'full_shard auto_wrap', got {options!r}")
    known = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")
    bad = [i for i in items if i not in known]
    if bad:
        raise UserError(f"--fsdp option {bad[0]!r} does not exist: the Trainer takes {', '.join(known)}")
    hint = "optimem models FSDP2 full_shard (with or without offload)"
    if int(cfg.get("version", 2)) != 2:
        raise UserError(f"FSDP1 (fsdp_config version 1) is not modelled: {hint}")
    strategies = [i for i in items if i not in ("auto_wrap", "offload")]
    reshard = str(cfg.get("reshard_after_forward", True)).lower()
    if any(i != "full_shard" for i in strategies) or reshard in ("false", "0", "shard_grad_op"):
        raise UserError(f"FSDP {' '.join(strategies) or 'reshard_after_forward=False'} is not modelled: {hint}")
    offload = "offload" in items or any(str(cfg.get(k, False)).lower() in ("true", "1")
                                        for k in ("cpu_offload", "offload_params"))
    return FsdpSettings(offload=offload, pin_memory=str(cfg.get("pin_memory", True)).lower() not in ("false", "0"))


def with_hidden(settings: DeepSpeedSettings, hidden: int | None) -> DeepSpeedSettings:
    """``settings`` with every ``auto`` bucket resolved from ``hidden``."""
    return replace(settings, buckets=tuple((k, settings.bucket(k, hidden)) for k, _ in settings.buckets))


__all__ = ["AUTO_HIDDEN_KEYS", "CPU_OPTIMIZERS", "DeepSpeedSettings", "FsdpSettings", "OFFLOAD_DEVICES",
           "OFFLOAD_OPTIMIZER_DEFAULTS", "OFFLOAD_PARAM_DEFAULTS", "ZERO_DEFAULTS", "read_deepspeed", "read_fsdp",
           "with_hidden"]
