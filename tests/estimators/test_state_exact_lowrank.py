"""Exactness of the GaLore / APOLLO / LOMO / AdaLomo optimizer-state formulas against the real optimizers.

Every run is a real ``transformers.Trainer`` job (optimem.harness.scenario) whose optimizer object graph is walked
(optimem.harness.state_walker) after 1-2 real steps. Each run checks three things:

* ``rel_error`` of the public estimate within 0.5 %;
* the measured bytes equal, to the byte, the total rebuilt from the spec's per-parameter formulas (so the
  formulas are exact, whatever the tolerance);
* the estimate equals that total, or differs only by what the shared ``estimate.py`` does not model yet
  for layer-wise specs (the Trainer's 4-byte ``LayerWiseDummyOptimizer`` tensor; one quantization-map
  pair per *named* parameter, frozen ones included).

Names that need CUDA for one call run here with that one call made a no-op (``torch.cuda.synchronize``
for GaLoreAdamW8bit, ``Tensor.cuda`` for AdaLomo): the real package code then builds its real state on CPU.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from optimem.estimators import estimate
from optimem.estimators.errors import UserError
from optimem.estimators.estimate import targeted_names
from optimem.estimators.inventory import build_inventory
from optimem.estimators.optimizers import ParamCtx, get_spec, parse_optim_args
from optimem.estimators.optimizers.lowrank import LAYERWISE_DUMMY_BYTES
from optimem.harness.scenario import RunConfig, build_model, build_trainer, unwrap_optimizer
from optimem.harness.state_check import StateComparison, compare_state
from optimem.harness.state_walker import measure_optimizer_state

pytestmark = pytest.mark.slow  # real Trainer runs or processes throughout: the inner loop (-m 'not slow') skips this file

TOL = 0.005
APOLLO_MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
MODELS = ("tiny-llama", "tiny-t5")
DTYPES = ("fp32", "bf16")
# tiny shapes: min(m, n) is 32 (llama k/v_proj) or 64: rank 128 (the default) is capped by GaLore's SVD
# and kept whole by APOLLO's random projector; 16 and 8 are below min(m, n) everywhere; 48 is between.
GALORE_ARGS = (None, "rank=16", "rank=8")
APOLLO_ARGS = (None, APOLLO_MINI, "rank=16")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster and steadier on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cuda_free(monkeypatch, name: str) -> None:
    """Make the single CUDA call of a CUDA-only name a no-op, so the real code runs on CPU."""
    if torch.cuda.is_available():
        return
    if name.startswith("galore_adamw_8bit"):
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    if name == "adalomo":
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def _targets_key(tm):
    return tuple(tm) if isinstance(tm, list) else tm


def rebuilt_totals(name, model, dtype, optim_args=None, targets=None, freeze=None) -> tuple[int, int]:
    """(exact, legacy) optimizer-state bytes rebuilt from the spec's formulas.

    exact: one optimizer per named parameter for layer-wise specs (``shared`` once per optimizer) plus the
    Trainer's 4-byte dummy tensor. legacy: the combination rule of the current shared ``estimate.py``
    (``shared`` times the trainable parameters, no dummy)."""
    spec = get_spec(name)
    inv = build_inventory(model).with_dtype(dtype).with_frozen(freeze)
    args = spec.resolve_args(parse_optim_args(optim_args))
    targeted = targeted_names(inv, _targets_key(targets)) if spec.needs_target_modules else frozenset()
    per_param = sum(sum(spec.param_state(ParamCtx(r, args, r.name in targeted)).values())
                    for r in inv.rows if r.trainable or spec.state_for_frozen)
    shared = sum(spec.shared(inv, args).values()) if spec.shared else 0
    if not spec.layerwise:
        return per_param + shared, per_param + shared
    exact = per_param + shared * len(inv.rows) + LAYERWISE_DUMMY_BYTES
    legacy = per_param + shared * sum(1 for r in inv.rows if r.trainable)
    return exact, legacy


def check_exact(cmp: StateComparison, freeze: str | None = None) -> None:
    c = cmp.config
    exact, legacy = rebuilt_totals(c.optim, c.model, c.dtype, c.optim_args, c.optim_target_modules, freeze)
    assert abs(cmp.rel_error) <= TOL, cmp.describe()
    assert cmp.measured.total == exact, f"formulas give {exact} B: {cmp.describe()}"
    assert cmp.predicted["optimizer_state"] in (exact, legacy), cmp.describe()


def run(monkeypatch, optim, model="tiny-llama", dtype="fp32", optim_args=None, targets="all-linear",
        steps=1) -> StateComparison:
    _cuda_free(monkeypatch, optim)
    cfg = RunConfig(optim=optim, model=model, dtype=dtype, optim_args=optim_args, optim_target_modules=targets,
                    steps=steps, batch_size=2, seq_len=16)
    cmp = compare_state(cfg)
    check_exact(cmp)
    return cmp


# --------------------------------------------------------------------------------------------------------
# GaLore / APOLLO, one optimizer for the whole model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optim_args", GALORE_ARGS, ids=lambda a: a or "default")
@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adafactor", "galore_adamw_8bit"])
def test_galore_exact(monkeypatch, optim, optim_args, model, dtype):
    cmp = run(monkeypatch, optim, model, dtype, optim_args)
    assert cmp.measured.by_key.get("projector", 0) > 0, cmp.describe()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optim_args", APOLLO_ARGS, ids=lambda a: a or "default")
def test_apollo_exact(monkeypatch, optim_args, model, dtype):
    cmp = run(monkeypatch, "apollo_adamw", model, dtype, optim_args)
    # one 0-dim scaled_grad (parameter dtype) per projected weight
    n_targeted = len(targeted_names(build_inventory(model), "all-linear"))
    assert cmp.measured.by_key["scaled_grad"] == n_targeted * (4 if dtype == "fp32" else 2)


@pytest.mark.parametrize("optim,optim_args,model,dtype", [
    ("galore_adamw", "rank=48,update_proj_gap=50,scale=0.5", "tiny-llama", "fp32"),  # capped for k/v only
    ("galore_adamw", "proj_type=left,rank=8", "tiny-llama", "fp32"),
    ("galore_adamw", "proj_type=full,rank=8", "tiny-t5", "bf16"),
    ("galore_adamw", "proj_type=reverse_std,rank=8", "tiny-llama", "bf16"),
    ("galore_adafactor", "proj_type=right", "tiny-llama", "bf16"),
    ("apollo_adamw", "proj=svd", "tiny-llama", "fp32"),
    ("apollo_adamw", "proj=svd,rank=8", "tiny-t5", "bf16"),
    ("apollo_adamw", "proj_type=left,rank=8,scale_type=tensor", "tiny-llama", "fp32"),
])
def test_projection_variants_exact(monkeypatch, optim, optim_args, model, dtype):
    run(monkeypatch, optim, model, dtype, optim_args)


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adafactor", "galore_adamw_8bit", "apollo_adamw",
                                   "apollo_adamw_layerwise"])
def test_projection_refresh_keeps_state_size(monkeypatch, optim):
    """update_proj_gap=1: the projector is rebuilt at the second step; the state keeps its size."""
    cmp = run(monkeypatch, optim, "tiny-llama", "fp32", "rank=8,update_proj_gap=1", steps=2)
    assert cmp.config.steps == 2


@pytest.mark.parametrize("optim,model,targets", [
    ("galore_adamw", "tiny-llama", r".*\.(q_proj|v_proj|down_proj)"),
    ("apollo_adamw", "tiny-llama", ["k_proj", "up_proj"]),
    ("galore_adamw_8bit", "tiny-t5", r".*(SelfAttention|EncDecAttention)\.(q|k)"),
    ("galore_adafactor", "tiny-t5", ["wo", "lm_head"]),
], ids=["regex-llama", "list-llama", "regex-t5", "list-t5"])
def test_target_module_forms_exact(monkeypatch, optim, model, targets):
    cmp = run(monkeypatch, optim, model, "fp32", "rank=16", targets=targets)
    inv = build_inventory(model)
    targeted = targeted_names(inv, _targets_key(targets))
    assert 0 < len(targeted) < len(targeted_names(inv, "all-linear"))
    assert cmp.predicted["optimizer_state"] > 0


# --------------------------------------------------------------------------------------------------------
# Layer-wise: one optimizer per parameter behind the Trainer's LayerWiseDummyOptimizer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optim", ["galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
                                   "apollo_adamw_layerwise"])
def test_layerwise_exact(monkeypatch, optim, model, dtype):
    cmp = run(monkeypatch, optim, model, dtype)
    assert cmp.measured.by_key.get("params") == LAYERWISE_DUMMY_BYTES  # the dummy's randn(1, 1)


@pytest.mark.parametrize("optim,optim_args", [
    ("galore_adamw_layerwise", "rank=8"), ("galore_adamw_8bit_layerwise", "rank=16"),
    ("apollo_adamw_layerwise", APOLLO_MINI)])
def test_layerwise_low_rank_exact(monkeypatch, optim, optim_args):
    run(monkeypatch, optim, "tiny-t5", "bf16", optim_args)


def test_layerwise_needs_no_grad_accumulation():
    cfg = RunConfig(optim="galore_adamw_layerwise", model="tiny-llama", optim_target_modules="all-linear",
                    grad_accum=2, steps=1, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="does not support gradient accumulation"):
        build_trainer(cfg).train()


def test_galore_adafactor_layerwise_cannot_run():
    """transformers only passes relative_step=False to galore_adafactor: the layer-wise variant builds
    each GaLoreAdafactor with lr and relative_step=True, which raises in __init__ on any device."""
    cfg = RunConfig(optim="galore_adafactor_layerwise", model="tiny-llama", optim_target_modules="all-linear",
                    steps=1, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="Cannot combine manual `lr` and `relative_step=True`"):
        build_trainer(cfg).train()
    spec = get_spec("galore_adafactor_layerwise")
    assert spec.availability == "unsupported" and "relative_step=True" in spec.reason
    with pytest.raises(UserError, match="cannot run in the Trainer on any device"):
        estimate("tiny-llama", "galore_adafactor_layerwise", optim_target_modules="all-linear")


# --------------------------------------------------------------------------------------------------------
# Names that need one CUDA call: the claim, and the real state with that call a no-op


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_cuda_only_claims():
    cfg = RunConfig(optim="galore_adamw_8bit", model="tiny-llama", optim_target_modules="all-linear", steps=1,
                    batch_size=2, seq_len=16)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        build_trainer(cfg).train()  # GaLoreAdamW8bit.step -> torch.cuda.synchronize()
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        build_trainer(RunConfig(optim="adalomo", model="tiny-llama", steps=1, batch_size=2,
                                seq_len=16)).train()  # AdaLomo.__init__ -> torch.zeros(...).cuda()
    assert not get_spec("galore_adamw_8bit").runs_on_cpu and not get_spec("adalomo").runs_on_cpu


# --------------------------------------------------------------------------------------------------------
# GPT-2: Conv1D blocks, lm_head tied to the embedding


def test_gpt2_no_linear_target_is_an_error():
    """GPT-2's attention/MLP are Conv1D: a pattern naming them finds no nn.Linear; the Trainer raises."""
    for targets in (r".*attn.*", ["c_attn", "c_fc"]):
        cfg = RunConfig(optim="galore_adamw", model="tiny-gpt2", optim_target_modules=targets, steps=1,
                        batch_size=2, seq_len=16)
        with pytest.raises(ValueError, match="No target modules found"):
            build_trainer(cfg).train()
        with pytest.raises(UserError) as err:
            estimate("tiny-gpt2", "galore_adamw", optim_target_modules=targets)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("optim,dtype", [("galore_adamw", "fp32"), ("apollo_adamw", "bf16")])
def test_gpt2_all_linear_projects_nothing(monkeypatch, optim, dtype):
    """'all-linear' finds lm_head (an nn.Linear), but its weight is tied to transformer.wte.weight, which
    named_parameters() yields under the embedding's name only: the Trainer's target group is empty, no
    error is raised, and every parameter gets the plain (unprojected) state."""
    cfg = RunConfig(optim=optim, model="tiny-gpt2", dtype=dtype, optim_target_modules="all-linear", steps=1,
                    batch_size=2, seq_len=16)
    trainer = build_trainer(cfg)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert [len(g["params"]) for g in opt.param_groups][1] == 0
    measured = measure_optimizer_state(opt, exclude=list(trainer.model.parameters()))
    assert "projector" not in measured.by_key
    exact, _ = rebuilt_totals(optim, "tiny-gpt2", dtype, None, "all-linear")
    assert measured.total == exact
    est = estimate("tiny-gpt2", optim, dtype=dtype, optim_target_modules="all-linear")
    assert est.bytes["optimizer_state"] == measured.total and est.targeted_params == 0


def test_gpt2_untied_lm_head_is_projected(monkeypatch, tmp_path):
    """With tie_word_embeddings=false the lm_head is its own nn.Linear and is projected."""
    from optimem.estimators.catalog import resolve

    data = dict(resolve("tiny-gpt2").load(), tie_word_embeddings=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    cmp = run(monkeypatch, "galore_adamw", str(path), "fp32", "rank=16")
    assert cmp.measured.by_key["projector"] > 0


# --------------------------------------------------------------------------------------------------------
# Targets that match nothing / are missing


@pytest.mark.parametrize("targets", ["no_such_module", ["no_such_module"]])
def test_unmatched_targets_error(targets):
    cfg = RunConfig(optim="apollo_adamw", model="tiny-llama", optim_target_modules=targets, steps=1,
                    batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="No target modules found"):
        build_trainer(cfg).train()
    for optim in ("apollo_adamw", "galore_adamw_layerwise"):
        with pytest.raises(UserError) as err:
            estimate("tiny-llama", optim, optim_target_modules=targets)
        assert "\n" not in str(err.value) and "optim_target_modules" in str(err.value)


def test_missing_targets_error():
    cfg = RunConfig(optim="galore_adamw", model="tiny-llama", steps=1, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="optim_target_modules"):
        build_trainer(cfg).train()
    with pytest.raises(UserError, match="needs optim_target_modules"):
        estimate("tiny-llama", "galore_adamw")


@pytest.mark.parametrize("optim,optim_args,trainer_error", [
    ("galore_adamw", "proj_type=reverse_std", "shapes cannot be multiplied"),  # rank 128 >= m of a m < n weight
    ("apollo_adamw", "proj_type=left,rank=8", "must match the size"),  # channel scaling needs the std side
    ("apollo_adamw", "proj_type=full,scale_type=tensor", "not implemented"),  # random projector: no 'full'
])
def test_configurations_that_fail_at_the_first_step(optim, optim_args, trainer_error):
    cfg = RunConfig(optim=optim, model="tiny-llama", optim_args=optim_args, optim_target_modules="all-linear",
                    steps=1, batch_size=2, seq_len=16)
    with pytest.raises((RuntimeError, NotImplementedError), match=trainer_error):
        build_trainer(cfg).train()
    with pytest.raises(UserError) as err:
        estimate("tiny-llama", optim, optim_args=optim_args, optim_target_modules="all-linear")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("optim_args", ["rank=0", "update_proj_gap=0", "proj=qr", "scale_type=row",
                                        "proj_type=diag"])
def test_bad_low_rank_args_are_user_errors(optim_args):
    with pytest.raises(UserError, match=re.escape(optim_args.split("=")[0])):
        estimate("tiny-llama", "apollo_adamw", optim_args=optim_args, optim_target_modules="all-linear")


# --------------------------------------------------------------------------------------------------------
# LOMO / AdaLomo: updates fused into backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ("tiny-llama", "tiny-gpt2", "tiny-t5"))
@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_lomo_exact(monkeypatch, optim, model, dtype):
    cmp = run(monkeypatch, optim, model, dtype, targets=None)
    if optim == "lomo":
        assert cmp.measured.total == 0
    else:  # fp32 factored second moment whatever the parameter dtype: no extra fp32 copies kept
        assert cmp.measured.total == sum(4 * (r.shape[0] + (r.shape[1] if len(r.shape) > 1 else 0))
                                         for r in build_inventory(model).rows)


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_lomo_fused_step_happened_and_frozen_params(monkeypatch, optim):
    """The walk runs after real fused_backward updates; AdaLomo also keeps state for frozen parameters."""
    _cuda_free(monkeypatch, optim)
    freeze = r"embed_tokens"
    cfg = RunConfig(optim=optim, model="tiny-llama", steps=2, batch_size=2, seq_len=16)
    model = build_model(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(not re.search(freeze, name))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_trainer(cfg, model=model)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) == bool(re.search(freeze, n)) for n in before)
    measured = measure_optimizer_state(opt, exclude=list(trainer.model.parameters()))
    est = estimate("tiny-llama", optim, freeze=freeze)
    exact, _ = rebuilt_totals(optim, "tiny-llama", "fp32", freeze=freeze)
    assert measured.total == exact == est.bytes["optimizer_state"]
    if optim == "adalomo":
        assert opt.step_num == 2
        frozen_row = opt.exp_avg_sq_row["model.embed_tokens.weight"]
        assert frozen_row.dtype == torch.float32 and not frozen_row.any()
        assert opt.exp_avg_sq_row["model.layers.0.mlp.up_proj.weight"].any()


def test_layerwise_frozen_params_keep_their_optimizer(monkeypatch):
    """One optimizer per named parameter, frozen ones too: each GaLoreAdamW8bit holds its own qmaps."""
    _cuda_free(monkeypatch, "galore_adamw_8bit_layerwise")
    freeze = r"layers\.0\."
    cfg = RunConfig(optim="galore_adamw_8bit_layerwise", model="tiny-llama", optim_target_modules="all-linear",
                    steps=1, batch_size=2, seq_len=16)
    model = build_model(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(not re.search(freeze, name))
    trainer = build_trainer(cfg, model=model)
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert len(opt.optimizer_dict) == len(list(model.named_parameters()))
    measured = measure_optimizer_state(opt, exclude=list(trainer.model.parameters()))
    exact, legacy = rebuilt_totals(cfg.optim, "tiny-llama", "fp32", None, "all-linear", freeze=freeze)
    assert measured.total == exact
    est = estimate("tiny-llama", cfg.optim, optim_target_modules="all-linear", freeze=freeze)
    assert est.bytes["optimizer_state"] in (exact, legacy)
