"""LoRA / QLoRA setups: the setup fields, and the estimate's parameters and weights against peft and bitsandbytes.

* ``--lora`` / ``--quantize`` and their companions are setup fields: parsed and validated once, records and
  sweep axes round-trip them, bad values are one line and exit 2 on the command line.
* Trainable parameters equal peft's own ``get_nb_trainable_parameters()`` of a peft model the test builds
  with peft's API (four architectures x r 8/64 x all-linear/attention-only x with/without DoRA, on meta).
* Quantized weights: the estimate's weight bytes equal the storage of the real quantized model, loaded on the
  CPU through ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` (packed data, absmax,
  codes, nested statistics, LLM.int8 row scales, every unquantized parameter).
* ``estimate()`` of Llama-3.1-8B QLoRA: adapters, 4-bit storage and the output head as the formulas of
  bitsandbytes' layout give them.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from optimem.estimators import UserError, estimate
from optimem.estimators.adapters import LoraSpec
from optimem.estimators.setup import SetupError, TrainingSetup

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from optimem.estimators.peft_model import adapter_inventory  # noqa: E402
from optimem.harness.state_check import weight_storage_bytes  # noqa: E402
from optimem.harness.validate_peft import ATTENTION, MODELS as ARCHS  # noqa: E402  (attention-only targets: regexes)


# ------------------------------------------------------------------------------------------------ setup fields
def test_lora_spec_parses_peft_names_and_round_trips():
    spec = LoraSpec.parse("r=16,alpha=32,dropout=0.05,target=all-linear")
    assert (spec.r, spec.alpha, spec.dropout, spec.target, spec.dora, spec.bias) == (16, 32, 0.05, "all-linear",
                                                                                     False, "none")
    assert str(spec) == "r=16,alpha=32,dropout=0.05,target=all-linear"
    same = LoraSpec.parse({"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all_linear"})
    assert same == spec
    listed = LoraSpec.parse("r=8,target=[q_proj,v_proj],modules_to_save=lm_head,use_dora=true,bias=lora_only")
    assert listed.target == ("q_proj", "v_proj") and listed.modules_to_save == ("lm_head",) and listed.dora
    assert LoraSpec.parse(str(listed)) == listed
    assert LoraSpec.parse("none") is None
    kw = listed.lora_config_kwargs("CAUSAL_LM")
    assert kw["target_modules"] == ["q_proj", "v_proj"] and kw["use_dora"] and kw["task_type"] == "CAUSAL_LM"
    from peft import LoraConfig

    assert LoraSpec.parse(LoraConfig(**kw)) == replace(listed, alpha=8)  # peft's default alpha, made explicit


@pytest.mark.parametrize("text,needle", [
    ("r=0", "positive integer"), ("r=8,alpha=-1", "positive number"), ("r=8,dropout=1.5", "[0, 1)"),
    ("r=8,target=q_proj,v_proj", "target=[q_proj,v_proj]"), ("r=8,rank=4", "given twice"),
    ("r=8,foo=1", "unknown key 'foo'"), ("r=8,bias=some", "none, all, lora_only"), ("r=8,target=[q", "brackets"),
    ("r=8,target=(", "not a valid regex"), ("r=x", "positive integer"), ("r=8,dora=maybe", "true or false"),
])
def test_lora_spec_errors_say_what_is_right(text, needle):
    with pytest.raises(UserError, match=None) as info:
        LoraSpec.parse(text)
    assert needle in str(info.value)


@pytest.mark.parametrize("fields,field,needle", [
    (dict(quantize="nf4"), "quantize", "add --lora"),
    (dict(lora="r=8", double_quant=True), "double_quant", "nf4 or fp4"),
    (dict(lora="r=8", quantize="int8", double_quant=True), "double_quant", "nf4 or fp4"),
    (dict(lora="r=8", quant_compute_dtype="bf16"), "quant_compute_dtype", "nf4 or fp4"),
    (dict(lora="r=8", prepare_kbit=True), "prepare_kbit", "needs quantize"),
    (dict(lora="r=8", quant_skip_modules=["lm_head"]), "quant_skip_modules", "needs quantize"),
    (dict(lora="r=8", freeze="attn"), "lora", "freeze"),
    (dict(lora="r=8", quantize="int4"), "quantize", "nf4, fp4, int8"),
    (dict(lora="r=8", quantize="nf4", sharding="fsdp", num_processes=2), "sharding", "FSDP-QLoRA"),
])
def test_setup_refuses_meaningless_combinations(fields, field, needle):
    with pytest.raises(SetupError) as info:
        TrainingSetup(**fields).check_trainable()
    assert info.value.field == field and needle in str(info.value)


def test_quantized_setup_defaults_and_records_round_trip():
    from optimem.harness.run_config import RunConfig

    s = TrainingSetup(lora="r=16,alpha=32,target=all-linear", quantize="NF4", double_quant=True,
                      quant_compute_dtype="bfloat16")
    assert s.quantize == "nf4" and s.prepare_kbit is True and s.quant_compute_dtype == "bf16"
    assert TrainingSetup(lora="r=8", quantize="int8", prepare_kbit="off").prepare_kbit is False
    plain = TrainingSetup()
    assert plain.prepare_kbit is None and not plain.peft and "lora" not in plain.non_default()
    cfg = RunConfig(**{k: v for k, v in s.to_dict().items()}, steps=3)
    d = cfg.to_dict()
    assert d["lora"] == "r=16,alpha=32,target=all-linear" and d["quantize"] == "nf4"
    assert RunConfig.from_dict(d) == cfg
    # records written before these fields read back as full fine-tunes
    old = {k: v for k, v in RunConfig().to_dict().items() if k not in ("lora", "quantize", "double_quant",
                                                                       "quant_compute_dtype", "quant_skip_modules",
                                                                       "prepare_kbit")}
    assert not RunConfig.from_dict(old).peft


def test_grid_axes_keep_lora_values_whole_and_keys_stay_for_full_fine_tunes():
    from optimem.harness.grid import config_key, grid_from_mapping
    from optimem.harness.run_config import RunConfig

    grid = grid_from_mapping({"optim": "adamw_torch", "lora": ["none", "r=8,target=all-linear",
                                                               "r=64,target=[q_proj,v_proj],dora=true"]})
    loras = [c.lora for c in grid.configs()]
    assert loras == [None, LoraSpec(r=8, target="all-linear"), LoraSpec(r=64, target=("q_proj", "v_proj"), dora=True)]
    full = RunConfig(optim="adamw_torch")
    older = {k: v for k, v in full.to_dict().items() if k not in ("lora", "quantize", "double_quant",
                                                                 "quant_compute_dtype", "quant_skip_modules",
                                                                 "prepare_kbit")}
    assert config_key(full.to_dict()) == config_key(older)


def test_cli_bad_lora_is_one_line_exit_2(capsys):
    from optimem.harness.cli import main

    assert main(["estimate", "--optim", "adamw_torch", "--lora", "r=8,target=q_proj,v_proj"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench estimate: error: --lora:") and "[q_proj,v_proj]" in err[0]
    assert main(["estimate", "--optim", "adamw_torch", "--quantize", "nf4"]) == 2
    assert "add --lora" in capsys.readouterr().err
    assert main(["estimate", "--optim", "adamw_torch", "--lora", "r=8,target=nothing_matches"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whole qualified name" in err[0]


# -------------------------------------------------------------------------------------- trainable parameters
def _peft_counts(model: str, r: int, target, dora: bool) -> tuple[int, int]:
    """peft's own count, from a peft model built here with peft's API on the meta device."""
    from peft import LoraConfig, get_peft_model

    from optimem.estimators.catalog import resolve
    from optimem.estimators.inventory import instantiate

    base = instantiate(resolve(model), device="meta")
    task = "SEQ_2_SEQ_LM" if base.config.is_encoder_decoder else "CAUSAL_LM"
    peft_model = get_peft_model(base, LoraConfig(r=r, target_modules=target, use_dora=dora, task_type=task))
    return peft_model.get_nb_trainable_parameters()


@pytest.mark.slow
@pytest.mark.parametrize("model", ARCHS)
def test_trainable_parameters_equal_peft_count(model):
    """Every adapter setting's inventory counts what peft counts; one estimate per architecture then holds
    the adapters' gradients and AdamW moments, and a traced peak (its figures: tests/estimators/test_lora_peak.py)."""
    for r, which, dora in itertools.product((8, 64), ("all-linear", "attention"), (False, True)):
        target = "all-linear" if which == "all-linear" else ATTENTION[model]
        trainable, total = _peft_counts(model, r, target, dora)
        inv = adapter_inventory(TrainingSetup(model=model, optim="adamw_torch",
                                              lora=LoraSpec(r=r, target=target, dora=dora)))
        assert (inv.trainable_params, inv.num_params) == (trainable, total), (model, r, which, dora)
        assert inv.trainable_bytes == 4 * trainable
    est = estimate(model, "adamw_torch", lora=LoraSpec(r=8, target="all-linear"), seq_len=64)
    trainable = _peft_counts(model, 8, "all-linear", False)[0]
    assert est.trainable_params == trainable
    assert est.bytes["gradients"] == est.bytes["weights_trainable"] == 4 * trainable
    assert est.state_breakdown["exp_avg"] == est.state_breakdown["exp_avg_sq"] == 4 * trainable
    assert est.bytes["peak"] > est.bytes["weights"] + est.bytes["optimizer_state"] + est.bytes["gradients"]


@pytest.mark.slow


def test_modules_to_save_and_bias_train_what_peft_trains():
    for spec in ("r=8,target=all-linear,modules_to_save=[lm_head]", "r=8,target=all-linear,bias=all",
                 "r=8,target=[q_proj,v_proj],bias=lora_only"):
        from peft import get_peft_model

        from optimem.estimators.catalog import resolve
        from optimem.estimators.inventory import instantiate
        from optimem.estimators.peft_model import lora_config

        setup = TrainingSetup(model="tiny-qwen2", lora=spec)
        base = instantiate(resolve("tiny-qwen2"), device="meta")
        want = get_peft_model(base, lora_config(setup, base)).get_nb_trainable_parameters()
        est = estimate(setup)
        assert (est.trainable_params, est.num_params) == want, spec


# -------------------------------------------------------------------------------- quantized weight storage
QUANT_CASES = [("tiny-llama", "nf4", True, "bf16", True), ("tiny-gpt2", "fp4", False, "fp32", True),
               ("tiny-t5", "int8", False, "bf16", True), ("tiny-qwen2", "nf4", False, "fp16", False),
               ("tiny-t5", "fp4", True, "fp16", False)]


@pytest.mark.slow
@pytest.mark.parametrize("model,quant,double,dtype,prepare", QUANT_CASES)
def test_quantized_weights_equal_the_loaded_models_storage(model, quant, double, dtype, prepare):
    """The estimate's weight bytes (built on meta) equal the storage of the model transformers and
    bitsandbytes really load on the CPU; trainable counts equal peft's on that real model."""
    import torch

    from optimem.estimators.catalog import resolve
    from optimem.estimators.inventory import instantiate
    from optimem.estimators.peft_model import build_training_model

    setup = TrainingSetup(model=model, dtype=dtype, lora="r=8,target=all-linear,dora=true", quantize=quant,
                          double_quant=double, prepare_kbit=prepare)
    torch.manual_seed(0)
    real = build_training_model(setup, device="cpu", base=instantiate(resolve(model), device="cpu", dtype=dtype))
    est = estimate(setup)
    assert est.bytes["weights"] == weight_storage_bytes(real)
    assert est.trainable_params == real.get_nb_trainable_parameters()[0]
    quantized = [n for n, p in real.named_parameters() if type(p).__name__ in ("Params4bit", "Int8Params")]
    assert quantized and "lm_head" not in " ".join(quantized)


def test_skip_modules_stay_unquantized():
    plain = estimate("tiny-llama", "adamw_torch", lora="r=8,target=all-linear", quantize="int8")
    skip = estimate("tiny-llama", "adamw_torch", lora="r=8,target=all-linear", quantize="int8",
                    quant_skip_modules=["lm_head", "down_proj"])
    # two fp32 down_proj weights (64 x 170) instead of int8 + one fp32 scale per row
    assert skip.bytes["weights"] - plain.bytes["weights"] == 2 * (64 * 170 * 4 - (64 * 170 + 64 * 4))


# ----------------------------------------------------------------------------------- an 8B QLoRA, by formula
def test_llama_3_1_8b_qlora_by_bitsandbytes_layout():
    """The inventory of an 8B QLoRA setup (the model is built on meta; its peak is traced by bench plan, see
    tests/estimators/test_lora_peak.py)."""
    inv = adapter_inventory(TrainingSetup(model="meta-llama/Llama-3.1-8B", optim="adamw_bnb_8bit", dtype="bf16",
                                          mixed_precision="bf16", lora="r=32,target=all-linear", quantize="nf4",
                                          double_quant=True))
    h, inter, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    r = 32
    assert inv.trainable_params == layers * sum(r * (o + i) for o, i in shapes) == 83_886_080
    four_bit = 0
    for o, i in shapes:
        n = o * i
        blocks = math.ceil(n / 64)
        # packed data, uint8 absmax per block, fp32 absmax per 256 blocks, fp32 offset, 256 + 16 entry codes
        four_bit += n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * 256 + 4 * 16
    # prepare_model_for_kbit_training upcasts everything not 4-bit to fp32: embeddings, head, norms
    fp32 = 4 * (2 * vocab * h + (2 * layers + 1) * h)
    assert inv.weight_bytes - inv.trainable_bytes == layers * four_bit + fp32
    assert inv.trainable_bytes == 4 * inv.trainable_params


def test_a_users_qlora_model_object_is_a_qlora_setup():
    """``estimate(peft_model, ...)`` with the user's own (here: real, quantized on the CPU) peft model: the setup
    says LoRA and nf4, the weights are that object's storage, and the peak is traced like any QLoRA setup's."""
    import torch

    from optimem.estimators.catalog import resolve
    from optimem.estimators.inventory import instantiate
    from optimem.estimators.peft_model import build_training_model

    setup = TrainingSetup(model="tiny-llama", lora="r=8,alpha=16,target=all-linear", quantize="nf4",
                          double_quant=True, quant_compute_dtype="bf16")
    torch.manual_seed(0)
    obj = build_training_model(setup, device="cpu", base=instantiate(resolve("tiny-llama"), device="cpu"))
    est = estimate(obj, "adamw_torch", seq_len=64)
    s = est.setup
    # peft writes all-linear out as the module names it matched
    assert (s.lora.r, s.lora.alpha, len(s.lora.target)) == (8, 16, 14)
    assert (s.quantize, s.double_quant, s.quant_compute_dtype) == ("nf4", True, "bf16")
    assert est.bytes["weights"] == weight_storage_bytes(obj)
    assert est.trainable_params == obj.get_nb_trainable_parameters()[0]
    assert est.bytes["peak"] > est.bytes["weights"] + est.bytes["optimizer_state"]
