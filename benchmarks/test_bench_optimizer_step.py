"""Optimizer cost per optimizer on a fixed parameter set (CPU, or CUDA when present).

Two groups:
- ``optimizer_step``: ``optimizer.step()`` alone, with fixed random gradients, after a first step has created
  the state. Optimizers whose update runs inside backward (LOMO, AdaLomo, every ``*_layerwise``) have no
  separate step and appear only in the second group.
- ``train_step``: one whole Trainer training step (forward, backward, update) via ``Trainer.training_step``
  followed by ``optimizer.step()`` — the same path a real run takes, for every CPU-capable optimizer.
The model is a fixed Llama-style config of about 20M parameters (``bench-llama`` below), fp32.
"""
import json

import pytest
import torch

from optimem.estimators import REGISTRY
from optimem.harness.scenario import RunConfig, build_trainer, unwrap_optimizer

BENCH_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
               "intermediate_size": 1376, "num_attention_heads": 8, "num_key_value_heads": 4,
               "num_hidden_layers": 4, "vocab_size": 8192, "max_position_embeddings": 512,
               "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIMS = [s for s in REGISTRY.values() if s.availability == "ok" and (s.runs_on_cpu or DEVICE == "cuda")
          and s.installed()]
SEPARATE_STEP = [s for s in OPTIMS if s.keeps_gradients and not s.layerwise]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "config.json"
    path.write_text(json.dumps(BENCH_LLAMA))
    return str(path)


def _trainer(config_path, spec):
    cfg = RunConfig(optim=spec.name, model=config_path, batch_size=2, seq_len=128, steps=1, device=DEVICE,
                    optim_target_modules="all-linear" if spec.needs_target_modules else None,
                    dtype="bf16" if not spec.runs_on_cpu else "fp32")
    trainer = build_trainer(cfg)
    trainer.create_optimizer()
    if not spec.keeps_gradients:
        trainer.create_scheduler(num_training_steps=100)  # LOMO/AdaLomo read their lr from the scheduler
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop; training_step reads it
    return trainer


def _prepared(trainer):
    """Model and optimizer prepared by accelerate, as Trainer's loop does (LOMO's backward needs it)."""
    model, opt = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped, trainer.optimizer = model, opt
    return model, opt


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("spec", SEPARATE_STEP, ids=lambda s: s.name)
def test_optimizer_step(benchmark, config_path, spec):
    benchmark.group = "optimizer_step"
    trainer = _trainer(config_path, spec)
    model, opt = trainer.model, unwrap_optimizer(trainer.optimizer)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=p.device, dtype=p.dtype)
    if hasattr(opt, "train"):
        opt.train()  # schedule-free optimizers must be in train mode to step

    def step():
        opt.step()
        _sync()

    step()  # creates the state (and compiles, for torchao)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(params=sum(p.numel() for p in model.parameters()), device=DEVICE)


@pytest.mark.parametrize("spec", OPTIMS, ids=lambda s: s.name)
def test_train_step(benchmark, config_path, spec):
    benchmark.group = "train_step"
    trainer = _trainer(config_path, spec)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    model, opt = _prepared(trainer)
    model.train()
    if hasattr(unwrap_optimizer(opt), "train"):
        unwrap_optimizer(opt).train()

    def step():
        trainer.training_step(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    step()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(params=sum(p.numel() for p in model.parameters()), device=DEVICE)
