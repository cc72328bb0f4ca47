"""The user's own objects into the estimator: a transformers config, a PreTrainedModel (meta or real, frozen parts,
16-bit), a PEFT model and a TrainingArguments give the estimate the equivalent `bench estimate` call gives."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from optimem.estimators import estimate
from optimem.estimators.catalog import resolve
from optimem.estimators.errors import UserError
from optimem.estimators.step_memory import plan_setup
from optimem.estimators.setup import TrainingSetup
from optimem.estimators.user_objects import from_training_arguments
from optimem.harness.cli import main


def _config():
    from transformers import AutoConfig

    return AutoConfig.for_model(**resolve("tiny-llama").load())


def _meta_model(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config()).to(dtype)


def _args(**kw):
    from transformers import TrainingArguments

    base = dict(output_dir="/tmp/optimem-test-args", report_to="none", use_cpu=True)
    return TrainingArguments(**{**base, **kw})


def _cli(capsys, *argv) -> dict:
    assert main(["estimate", "--model", "tiny-llama", "--json", *argv]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    return row


@pytest.mark.slow
@pytest.mark.parametrize("case", ["adamw-bf16-accum-ckpt", "galore-args-targets", "frozen-embeddings"])
def test_model_and_training_arguments_equal_the_cli(capsys, case):
    model = _meta_model(torch.bfloat16 if case != "frozen-embeddings" else torch.float32)
    if case == "adamw-bf16-accum-ckpt":
        args = _args(optim="adamw_torch", per_device_train_batch_size=4, gradient_accumulation_steps=2, bf16=True,
                     gradient_checkpointing=True)
        flags = ["--optim", "adamw_torch", "--dtype", "bf16", "--bf16", "--batch-size", "4", "--grad-accum", "2",
                 "--gradient-checkpointing"]
    elif case == "galore-args-targets":
        args = _args(optim="galore_adamw", optim_args="rank=8,update_proj_gap=50",
                     optim_target_modules=["q_proj", "v_proj"], per_device_train_batch_size=2)
        flags = ["--optim", "galore_adamw", "--dtype", "bf16", "--optim-args", "rank=8,update_proj_gap=50",
                 "--optim-target-modules", "q_proj", "v_proj", "--batch-size", "2"]
    else:
        model.get_input_embeddings().weight.requires_grad_(False)
        args = _args(optim="adafactor", per_device_train_batch_size=3)
        flags = ["--optim", "adafactor", "--freeze", "embed_tokens", "--batch-size", "3"]
    ours = estimate(model, args, seq_len=96)
    cli = _cli(capsys, *flags, "--seq-len", "96", "--device", "cpu")
    assert ours.bytes == cli["bytes"] and ours.phases == cli["phases"] and ours.to_dict()["optim_args"] == cli["optim_args"]
    assert ours.trainable_params == cli["trainable_params"] < ours.num_params or case != "frozen-embeddings"
    assert ours.setup.model.startswith("LlamaForCausalLM#") and ours.setup.device == "cpu"
    # the same setup through TrainingSetup and the planner's entry point
    setup = from_training_arguments(args, model=model, seq_len=96)
    assert estimate(setup).bytes == cli["bytes"]
    assert plan_setup(model, args, seq_len=96) == setup


def test_a_config_object_is_its_catalog_entry():
    cfg = _config()
    assert estimate(cfg, "adamw_torch", seq_len=64).bytes == estimate("tiny-llama", "adamw_torch", seq_len=64).bytes
    # content-addressed: the same config is the same source, another one another
    assert estimate(cfg, "sgd").setup.model == estimate(_config(), "sgd").setup.model
    cfg.num_hidden_layers += 1
    assert estimate(cfg, "sgd").num_params > estimate("tiny-llama", "sgd").num_params


def test_a_real_model_counts_as_built(capsys):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(_config())
    assert estimate(real, "adamw_torch", seq_len=64, device="cpu").bytes == \
        _cli(capsys, "--optim", "adamw_torch", "--seq-len", "64", "--device", "cpu")["bytes"]


def test_a_peft_model_counts_its_adapters():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_meta_model(torch.bfloat16), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    est = estimate(peft_model, _args(optim="adamw_torch", bf16=True), seq_len=64)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (est.trainable_params, est.num_params) == (trainable, total)
    lora_bytes = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    assert est.bytes["gradients"] == lora_bytes  # the adapters' gradients only, in their own dtype
    assert est.bytes["optimizer_state"] == 8 * trainable + 4 * sum(1 for p in peft_model.parameters()
                                                                   if p.requires_grad)


def test_training_arguments_parallelism():
    def ns(**kw):
        base = dict(optim="adamw_torch", optim_args=None, optim_target_modules=None, per_device_train_batch_size=1,
                    gradient_accumulation_steps=1, bf16=True, fp16=False, gradient_checkpointing=False,
                    use_cpu=False, world_size=1, fsdp=False, fsdp_config=None, deepspeed=None)
        return SimpleNamespace(**{**base, **kw})

    def shard(**kw):
        s = from_training_arguments(ns(**kw), model="tiny-llama")
        return s.sharding, s.num_processes

    assert shard() == ("none", 1)
    assert shard(world_size=8) == ("ddp", 8)
    assert shard(world_size=8, fsdp=True, fsdp_config={"version": 2}) == ("fsdp", 8)
    assert shard(world_size=4, fsdp="full_shard auto_wrap") == ("fsdp", 4)
    assert shard(world_size=4, deepspeed={"zero_optimization": {"stage": 2}}) == ("zero2", 4)
    assert shard(world_size=4, deepspeed={"zero_optimization": {"stage": 3}}) == ("zero3", 4)
    assert shard(world_size=2, deepspeed={"train_batch_size": "auto"}) == ("ddp", 2)
    off = from_training_arguments(ns(world_size=8, fsdp=True, fsdp_config={"cpu_offload": True}), model="tiny-llama")
    assert (off.sharding, off.offload_optimizer, off.offload_param) == ("fsdp", "cpu", "cpu")
    z3 = from_training_arguments(ns(world_size=4, deepspeed={"zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "cpu"}}, "optimizer": {"type": "AdamW"}, "bf16": {"enabled": "auto"}}), model="tiny-llama")
    assert (z3.sharding, z3.offload_optimizer, z3.offload_param) == ("zero3", "cpu", "none")
    for bad, needle in [(dict(fsdp=True, fsdp_config={"reshard_after_forward": False}), "not modelled"),
                        (dict(fsdp=True, fsdp_config={"version": 1}), "FSDP1"),
                        (dict(deepspeed={"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}),
                         "DeepSpeed raises ZeRORuntimeException"),
                        (dict(deepspeed="/no/such/ds_config.json"), "no such file")]:
        with pytest.raises(UserError, match=needle) as err:
            shard(**bad)
        assert "\n" not in str(err.value)
    est = estimate(from_training_arguments(ns(world_size=8), model="tiny-llama", seq_len=64))
    assert any("ddp on 8" in n for n in est.notes)


def test_not_a_transformers_model_is_one_line():
    with pytest.raises(UserError, match="has no transformers config"):
        estimate(torch.nn.Linear(4, 4), "sgd")
    with pytest.raises(UserError, match="optimizer name .* or a transformers TrainingArguments"):
        estimate(_config())


def test_training_arguments_liger_and_packing():
    """use_liger_kernel / liger_kernel_config (TrainingArguments) and padding_free (TRL's SFTConfig) are read."""
    args = SimpleNamespace(optim="adamw_torch", optim_args=None, optim_target_modules=None, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, bf16=False, fp16=False, gradient_checkpointing=False,
                           use_cpu=False, world_size=1, fsdp=False, fsdp_config=None, deepspeed=None,
                           use_liger_kernel=True, liger_kernel_config={"rope": False}, padding_free=True)
    s = from_training_arguments(args, model="tiny-llama", seq_len=64)
    assert (s.use_liger_kernel, s.liger_kernel_config, s.padding_free) == (True, '{"rope": false}', True)
