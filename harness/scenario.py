"""The scenario: a short real ``transformers.Trainer`` job for one model x optimizer configuration.

The model is built from the catalog or a config.json with seeded random weights; the data is seeded
synthetic token ids (or a local text/JSONL file); the optimizer is chosen exactly as a user would, with
``TrainingArguments(optim=...)`` (FlashOptim names go in through ``optimizer_cls_and_kwargs``).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
import weakref
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from optimem.estimators import get_spec
from optimem.estimators.catalog import resolve
from optimem.estimators.inventory import TORCH_DTYPE_NAMES, instantiate
from optimem.estimators.optimizers import parse_optim_args
from optimem.estimators.peft_model import build_training_model
from optimem.harness.compat import prepare_run
from optimem.harness.contract import RUN_DIR_ENV
from optimem.harness.run_config import FIRST_SYNTHETIC_ID, RunConfig, data_tokens
from optimem.estimators.packing import samples
from optimem.estimators.sample_tokens import closing_token, vocab_size


class SyntheticTokens(torch.utils.data.Dataset):
    """Seeded random token ids; ``labels`` equal the inputs (the model shifts them itself), or, with
    ``num_labels`` (sequence classification), one seeded class per sample, kept in a table like the ids;
    ``closing``: the id every sample ends with (:func:`optimem.estimators.sample_tokens.closing_token`)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int, encoder_decoder: bool,
                 token_ids: list[int] | None = None, num_labels: int | None = None, closing: int | None = None):
        g = torch.Generator().manual_seed(seed)
        if token_ids:
            stream = torch.tensor(token_ids, dtype=torch.long) % vocab_size
            reps = (n * seq_len) // max(len(stream), 1) + 1
            self.ids = stream.repeat(reps)[: n * seq_len].view(n, seq_len)
        else:
            self.ids = torch.randint(FIRST_SYNTHETIC_ID, vocab_size, (n, seq_len), generator=g)
        if closing is not None:
            self.ids[:, -1] = closing
        self.encoder_decoder = encoder_decoder
        self.labels = torch.randint(0, num_labels, (n,), generator=g) if num_labels else None
        self.samples = None

    @classmethod
    def packed(cls, samples: list[list[int]], n: int, vocab_size: int) -> SyntheticTokens:
        """``n`` samples of a padding-free run: the data file's samples (:mod:`optimem.estimators.packing`) in
        turn, ids modulo the vocabulary, one sample per item for ``DataCollatorWithFlattening``."""
        self = cls.__new__(cls)
        self.ids, self.labels, self.encoder_decoder = None, None, False
        self.samples = [torch.tensor(samples[i % len(samples)], dtype=torch.long) % vocab_size for i in range(n)]
        return self

    def __len__(self) -> int:
        return len(self.samples) if self.samples is not None else self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.samples is not None:
            ids = self.samples[i]
            return {"input_ids": ids, "labels": ids.clone()}
        ids = self.ids[i]
        labels = self.labels[i] if self.labels is not None else ids.clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def pad_to_longest(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A micro-batch padded to its longest sample, as ``DataCollatorWithPadding`` + causal-LM labels make it: ids
    padded with 0, ``attention_mask`` 0 and ``labels`` -100 on the padding (the harness has no tokenizer)."""
    ids = [f["input_ids"] for f in features]
    return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=0),
            "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True, padding_value=0),
            "labels": pad_sequence([f["labels"] for f in features], batch_first=True, padding_value=-100)}


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
    prepare_run(cfg.optim, cfg.resolved_device())


def remove_printer_callback(trainer) -> None:
    """Drop the Trainer's stdout printer (``disable_tqdm=True`` adds it): a measured run prints nothing."""
    # lazy: pulls in transformers, which importing this module does not
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def build_model(cfg: RunConfig):
    """The model the run trains (the head of ``cfg.task``): seeded random weights in ``cfg.dtype``, the setup's
    attention implementation, its ``freeze`` regex applied (``requires_grad_(False)``), on the run's device. A
    LoRA / QLoRA setup trains the peft model :func:`optimem.estimators.peft_model.build_training_model` makes of it
    (quantized: saved and loaded back with ``BitsAndBytesConfig`` onto the device)."""
    torch.manual_seed(cfg.seed)
    device = cfg.resolved_device()
    model = instantiate(resolve(cfg.model), device="cpu", dtype=cfg.dtype, task=cfg.task)
    if cfg.attn_implementation != "sdpa":
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.freeze:
        rx = re.compile(cfg.freeze)
        for name, p in model.named_parameters():
            if rx.search(name):
                p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.peft:
        model = build_training_model(cfg, device=device, base=model)
        if cfg.quantize:
            return model  # loaded onto the device by bitsandbytes (the Trainer does not move it either)
    return model.to(device)


def build_trainer(cfg: RunConfig, model=None, output_dir: str | None = None, callbacks=None):
    """A ready ``Trainer`` for ``cfg`` (not yet trained)."""
    # lazy: pulls in transformers, which importing this module does not
    from transformers import Trainer, TrainingArguments, default_data_collator

    spec = get_spec(cfg.optim)
    apply_optimizer_compat(cfg, spec)
    model = model if model is not None else build_model(cfg)
    device = cfg.resolved_device()
    n_samples = cfg.batch_size * cfg.grad_accum * max(cfg.steps, 1)
    classify = cfg.task == "sequence-classification"
    collator = default_data_collator
    config = model.config
    vocab = vocab_size(config)
    if cfg.padding_free:
        # lazy: pulls in transformers, yaml, which importing this module does not
        from transformers import DataCollatorWithFlattening


        data = SyntheticTokens.packed(samples(cfg.data, cfg.seq_len), n_samples, vocab)
        collator = DataCollatorWithFlattening()
    elif cfg.group_by_length and cfg.data:
        data = SyntheticTokens.packed(samples(cfg.data, cfg.seq_len), n_samples, vocab)
        collator = pad_to_longest
    else:
        tokens = data_tokens(cfg.data) if cfg.data else None
        data = SyntheticTokens(n_samples, cfg.seq_len, vocab, cfg.seed,
                               bool(getattr(model.config, "is_encoder_decoder", False)), tokens,
                               num_labels=int(model.config.num_labels) if classify else None,
                               closing=closing_token(config))
    lr = 1e-4
    owned = None
    if output_dir is None:
        # the Trainer makes its output_dir even with save_strategy="no": inside the launcher's run folder (removed
        # with it), else a temporary folder removed with the Trainer
        run_dir = os.environ.get(RUN_DIR_ENV)
        output_dir = os.path.join(run_dir, "trainer") if run_dir and os.path.isdir(run_dir) else \
            (owned := tempfile.mkdtemp(prefix="optimem-trainer-"))
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.steps, learning_rate=lr, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed,
        use_cpu=device == "cpu", gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
    )
    if cfg.group_by_length:  # transformers 5's name for the old group_by_length=True: LengthGroupedSampler
        kwargs["train_sampling_strategy"] = "group_by_length"
    if cfg.use_liger_kernel:  # the Trainer patches the model with liger-kernel (its Triton kernels: CUDA only)
        kwargs.update(use_liger_kernel=True, liger_kernel_config=json.loads(cfg.liger_kernel_config or "{}"))
    # lazy: pulls in accelerate, psutil, yaml, which importing this module does not
    from optimem.harness.distributed.rank import rank_training_arguments

    kwargs.update(rank_training_arguments(cfg, model))
    optimizer_cls_and_kwargs = None
    if spec.trainer_name:
        kwargs["optim"] = spec.name
        kwargs["optim_args"] = cfg.optim_args
        targets = cfg.optim_target_modules
        kwargs["optim_target_modules"] = list(targets) if isinstance(targets, tuple) else targets
    else:
        resolved = spec.resolve_args(parse_optim_args(cfg.optim_args))
        optimizer_cls_and_kwargs = flash_optimizer_cls_and_kwargs(spec.name, resolved, lr)
    args = TrainingArguments(**kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs, callbacks=callbacks)
    if owned is not None:
        weakref.finalize(trainer, shutil.rmtree, owned, True)
    return trainer


def unwrap_optimizer(optimizer):
    """The user's optimizer behind accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


__all__ = ["RunConfig", "apply_optimizer_compat", "build_model", "build_trainer", "remove_printer_callback",
           "unwrap_optimizer", "TORCH_DTYPE_NAMES"]
