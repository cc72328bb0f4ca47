"""The scenario: a short real ``transformers.Trainer`` job for one model x optimizer configuration.

The model is built from the catalog or a config.json with seeded random weights; the data is seeded
synthetic token ids (or a local text/JSONL file); the optimizer is chosen exactly as a user would, with
``TrainingArguments(optim=...)`` (FlashOptim names go in through ``optimizer_cls_and_kwargs``).
"""
from __future__ import annotations

import importlib
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from estimators import get_spec
from estimators.catalog import DEFAULT_MODEL, resolve
from estimators.inventory import TORCH_DTYPE_NAMES, instantiate, normalize_dtype
from estimators.optimizers import parse_optim_args


@dataclass
class RunConfig:
    """One run. ``dtype`` is the dtype parameters are stored in; ``mixed_precision`` is the Trainer's
    ``bf16``/``fp16`` autocast flag (``None`` for none)."""

    optim: str = "adamw_torch"
    model: str = DEFAULT_MODEL
    dtype: str = "fp32"
    mixed_precision: str | None = None
    batch_size: int = 2
    seq_len: int = 64
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    optim_args: str | None = None
    optim_target_modules: list[str] | str | None = None
    steps: int = 2
    warmup: int = 1
    device: str = "auto"
    seed: int = 0
    data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


class SyntheticTokens(torch.utils.data.Dataset):
    """Seeded random token ids; ``labels`` equal the inputs (the model shifts them itself), or, with
    ``num_labels`` (sequence classification), one seeded class per sample, kept in a table like the ids."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int, encoder_decoder: bool,
                 token_ids: list[int] | None = None, num_labels: int | None = None):
        g = torch.Generator().manual_seed(seed)
        if token_ids:
            stream = torch.tensor(token_ids, dtype=torch.long) % vocab_size
            reps = (n * seq_len) // max(len(stream), 1) + 1
            self.ids = stream.repeat(reps)[: n * seq_len].view(n, seq_len)
        else:
            self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)
        self.encoder_decoder = encoder_decoder
        self.labels = torch.randint(0, num_labels, (n,), generator=g) if num_labels else None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        labels = self.labels[i] if self.labels is not None else ids.clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _read_text_tokens(path: str) -> list[int]:
    """Byte-level token ids of a local text or JSONL file (the 'text' field of each JSONL line)."""
    import json

    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    if path.endswith(".jsonl"):
        raw = "\n".join(str(json.loads(line).get("text", "")) for line in raw.splitlines() if line.strip())
    return list(raw.encode("utf-8"))


def flash_optimizer_cls_and_kwargs(name: str, optim_args: dict[str, Any], lr: float):
    """The ``optimizer_cls_and_kwargs`` the harness passes for a FlashOptim name."""
    spec = get_spec(name)
    module, cls = spec.cls.rsplit(".", 1)
    klass = getattr(importlib.import_module(module), cls)
    return klass, {"lr": lr, **optim_args}


def apply_optimizer_compat(cfg: RunConfig, spec) -> None:
    """Runtime fixes some optimizers need before the Trainer builds them (called by :func:`build_trainer`).

    The place for per-optimizer workarounds that make a real run possible without changing what is
    measured (e.g. stable_adamw: torch-optimi auto-selects its Triton kernels whenever triton is
    importable, which fails on a CPU-only run; bitsandbytes' process-wide override manager, which would
    leak one Trainer's embedding overrides into the next run in the same process). See harness/compat.py.
    """
    from harness.compat import prepare_run

    prepare_run(cfg.optim, cfg.resolved_device())


def remove_printer_callback(trainer) -> None:
    """Drop the Trainer's stdout printer (``disable_tqdm=True`` adds it): a measured run prints nothing."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def task_of(cfg: RunConfig) -> str | None:
    """The head the run trains (``extra["task"]``: see ``estimators.inventory.TASKS``; None: the config's)."""
    return (cfg.extra or {}).get("task")


def build_model(cfg: RunConfig):
    torch.manual_seed(cfg.seed)
    device = cfg.resolved_device()
    model = instantiate(resolve(cfg.model), device="cpu", dtype=normalize_dtype(cfg.dtype), task=task_of(cfg))
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return model.to(device)


def build_trainer(cfg: RunConfig, model=None, output_dir: str | None = None, callbacks=None):
    """A ready ``Trainer`` for ``cfg`` (not yet trained)."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    spec = get_spec(cfg.optim)
    apply_optimizer_compat(cfg, spec)
    model = model if model is not None else build_model(cfg)
    device = cfg.resolved_device()
    n_samples = cfg.batch_size * cfg.grad_accum * max(cfg.steps, 1)
    tokens = _read_text_tokens(cfg.data) if cfg.data else None
    classify = task_of(cfg) == "sequence-classification"
    data = SyntheticTokens(n_samples, cfg.seq_len, model.config.vocab_size, cfg.seed,
                           bool(getattr(model.config, "is_encoder_decoder", False)), tokens,
                           num_labels=int(model.config.num_labels) if classify else None)
    lr = 1e-4
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir or tempfile.mkdtemp(prefix="optimem-"),
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.steps, learning_rate=lr, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed,
        use_cpu=device == "cpu", gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
    )
    optimizer_cls_and_kwargs = None
    if spec.trainer_name:
        kwargs["optim"] = spec.name
        kwargs["optim_args"] = cfg.optim_args
        kwargs["optim_target_modules"] = cfg.optim_target_modules
    else:
        resolved = spec.resolve_args(parse_optim_args(cfg.optim_args))
        optimizer_cls_and_kwargs = flash_optimizer_cls_and_kwargs(spec.name, resolved, lr)
    args = TrainingArguments(**kwargs)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs, callbacks=callbacks)


def unwrap_optimizer(optimizer):
    """The user's optimizer behind accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


__all__ = ["RunConfig", "apply_optimizer_compat", "build_model", "build_trainer", "remove_printer_callback",
           "unwrap_optimizer", "TORCH_DTYPE_NAMES"]
