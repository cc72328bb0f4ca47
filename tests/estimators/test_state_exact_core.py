"""Optimizer-state formulas of the core families, checked against the real optimizers.

Families: torch built-ins + transformers Adafactor (``torch_builtin``), bitsandbytes (``bnb``), torchao
low-bit AdamW (``torchao_low_bit``), GrokAdamW / schedule-free / StableAdamW (``misc``).

How: ``optimem.harness.state_check.compare_state`` runs a real ``transformers.Trainer`` step on CPU with
``TrainingArguments(optim=...)``, walks every tensor the optimizer keeps (unique storages) and compares
with ``optimem.estimators.estimate``. Every configuration below is exact (0 bytes apart); the issue's 0.5 % bound is
asserted as well. Before each run ``optimem.harness.compat.prepare_run`` gives the run a fresh process's state
(bitsandbytes' global override manager emptied; torch-optimi kept off its Triton path on CPU).

Layouts a CPU Trainer run cannot reach are checked by running the package's own state-creating code on
CPU tensors and walking what it makes (paged AdEMAMix >= 1e5 elements, StableAdamW's Triton path,
torchao's non-default block sizes, big shapes).
"""
from __future__ import annotations

import json

import pytest
import torch

from optimem.estimators import estimate, get_spec
from optimem.estimators.catalog import CONFIG_DIR
from optimem.estimators.errors import UserError
from optimem.estimators.inventory import ParamRow, build_inventory
from optimem.estimators.optimizers import ParamCtx, parse_optim_args
from optimem.harness.compat import prepare_run, reset_bitsandbytes_manager, set_eager, set_optimi_triton
from optimem.harness.scenario import RunConfig, build_trainer
from optimem.harness.state_check import compare_state
from optimem.harness.state_walker import measure_optimizer_state

pytestmark = pytest.mark.slow  # real Trainer runs or processes throughout: the inner loop (-m 'not slow') skips this file

MODELS = ("tiny-llama", "tiny-gpt2", "tiny-t5")
DTYPES = ("fp32", "bf16")
TORCH_NAMES = ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"]
BNB_NAMES = ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "ademamix", "ademamix_8bit",
             "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_8bit", "lion_32bit", "paged_lion_8bit",
             "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"]
TORCHAO_NAMES = ["adamw_torch_8bit", "adamw_torch_4bit"]
MISC_NAMES = ["grokadamw", "schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd", "stable_adamw"]
# paged_ademamix_* run on CPU as long as no parameter has >= 1e5 elements, which holds for the tiny models
# (test_paged_ademamix_fails_on_cpu_for_large_params covers the rest).
EXACT_NAMES = [n for n in TORCH_NAMES + BNB_NAMES + TORCHAO_NAMES + MISC_NAMES if n != "stable_adamw"]


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu_runs():
    """torchao compiles its per-parameter step for every shape (12-31 s per tiny run); eager runs the same
    code on the same state tensors (created outside the compiled function), so the layout is unchanged.
    One thread: the tiny models gain nothing from more, and other processes share the cores."""
    was_eager = set_eager(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    set_eager(was_eager)
    torch.set_num_threads(threads)
    set_optimi_triton(True)


def _run(optim: str, model: str = "tiny-llama", dtype: str = "fp32", optim_args: str | None = None,
         steps: int = 1):
    prepare_run(optim, "cpu")
    return compare_state(RunConfig(optim=optim, model=model, dtype=dtype, optim_args=optim_args, batch_size=2,
                                   seq_len=16, steps=steps, device="cpu"))


def _assert_exact(c) -> None:
    assert abs(c.rel_error) <= 0.005, c.describe()
    assert c.measured.total == c.predicted["optimizer_state"], c.describe()


def _predict(model: str, optim: str, dtype: str, optim_args: str | None = None, **override) -> int:
    """Predicted state bytes with resolved args overridden (for settings no ``optim_args`` key reaches)."""
    spec = get_spec(optim)
    inv = build_inventory(model).with_dtype(dtype)
    args = {**spec.resolve_args(parse_optim_args(optim_args)), **override}
    total = sum(sum(spec.param_state(ParamCtx(r, args)).values()) for r in inv.rows if r.trainable)
    if spec.shared is not None:
        total += sum(spec.shared(inv, args).values())
    return total


def _tiny_config(tmp_path, base: str, **changes) -> str:
    data = json.loads((CONFIG_DIR / f"{base}.json").read_text())
    data.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def _row(shape, dtype="bf16", *, kind="linear", embedding=False) -> ParamRow:
    return ParamRow(name="w", shape=tuple(shape), dtype=dtype, trainable=True, module_kind=kind, module_name="m",
                    module_class="Linear", in_embedding=embedding)


def _state(optim: str, row: ParamRow, **args) -> dict[str, int]:
    spec = get_spec(optim)
    return spec.param_state(ParamCtx(row, {**spec.resolve_args({}), **args}))


# --------------------------------------------------------------------------------------------------------
# Every CPU-capable name x the three tiny architectures x fp32/bf16, default arguments: exact.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optim", EXACT_NAMES)
def test_default_args_exact(optim, model, dtype):
    _assert_exact(_run(optim, model, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_stable_adamw_cpu_path(model, dtype):
    """On CPU the harness keeps optimi off Triton (as without triton installed). The estimate models the
    Triton path that optimi takes on every CUDA install, which adds an fp32[1] mean_square per tensor and,
    for fp32 tensors, a uint8[1] kahan placeholder: the CPU run is exactly the triton=False formula, and
    exactly those bytes below the estimate."""
    c = _run("stable_adamw", model, dtype)
    assert abs(c.rel_error) <= 0.005, c.describe()
    assert c.measured.total == _predict(model, "stable_adamw", dtype, triton=False), c.describe()
    n_tensors = sum(1 for r in build_inventory(model).rows if r.trainable)
    per_tensor = 4 + (1 if dtype == "fp32" else 0)
    assert c.predicted["optimizer_state"] - c.measured.total == n_tensors * per_tensor, c.describe()
    has_kahan = dtype != "fp32"
    assert ("kahan_comp" in c.measured.by_key) == has_kahan, c.describe()


# --------------------------------------------------------------------------------------------------------
# Non-default optim_args, for every name that reads any.
# --------------------------------------------------------------------------------------------------------
_ADEMAMIX_ARGS = "beta1=0.8,beta2=0.99,beta3=0.999,alpha=4,eps=1e-7,t_alpha=100,t_beta3=100"
ARG_CASES = [
    ("sgd", "momentum=0.9"),
    ("sgd", "momentum=0.9,nesterov=True,weight_decay=0.01"),
    ("sgd", "momentum=0.5,dampening=0.1"),
    ("adagrad", "lr_decay=0.01,weight_decay=0.1,eps=1e-9"),
    ("rmsprop", "momentum=0.9,centered=True"),
    ("rmsprop", "momentum=0.5"),
    # the Trainer reads centered as true only for true/1/yes: "on" leaves it off (no grad_avg)
    ("rmsprop", "centered=on,alpha=0.9,eps=1e-7,weight_decay=0.1"),
    ("ademamix", _ADEMAMIX_ARGS),
    ("ademamix_8bit", _ADEMAMIX_ARGS),
    ("paged_ademamix_32bit", "t_alpha=100,alpha=4"),
    ("paged_ademamix_8bit", "t_beta3=100,beta3=0.999"),
    ("adamw_torch_8bit", "bf16_stochastic_round=True"),
    ("adamw_torch_4bit", "bf16_stochastic_round=yes"),
    ("grokadamw", "alpha_init=0.9,lamb=1.5,gamma=0.2,grokking_signal_decay_rate=0.2,gradient_clipping=0"),
    ("schedule_free_adamw", "weight_lr_power=1.0,r=0.5"),
    ("schedule_free_radam", "weight_lr_power=1.0,r=0.5"),
    ("schedule_free_sgd", "weight_lr_power=1.0,r=0.5"),
]


@pytest.mark.parametrize("model,dtype", [("tiny-llama", "bf16"), ("tiny-gpt2", "fp32")])
@pytest.mark.parametrize("optim,optim_args", ARG_CASES)
def test_optim_args_exact(optim, optim_args, model, dtype):
    _assert_exact(_run(optim, model, dtype, optim_args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optim_args", ["kahan_sum=False", "kahan_sum=True,decouple_lr=True,max_lr=1e-3",
                                        "decouple_lr=False"])
def test_stable_adamw_optim_args(optim_args, dtype):
    """transformers reads kahan_sum / decouple_lr with ``bool(string)``: "False" still turns Kahan summation
    on, and optimi only ever adds kahan_comp for 16-bit parameters."""
    c = _run("stable_adamw", "tiny-llama", dtype, optim_args)
    assert abs(c.rel_error) <= 0.005, c.describe()
    assert c.measured.total == _predict("tiny-llama", "stable_adamw", dtype, optim_args, triton=False), c.describe()
    assert ("kahan_comp" in c.measured.by_key) == (dtype == "bf16"), c.describe()


def test_two_steps_keep_the_same_state():
    """State is created at the first step and does not grow at the second."""
    for optim in ("adamw_bnb_8bit", "adamw_torch_4bit", "adafactor", "schedule_free_sgd"):
        _assert_exact(_run(optim, "tiny-t5", "bf16", steps=2))


# --------------------------------------------------------------------------------------------------------
# optim_args the Trainer forwards but the real run cannot use: the run fails as the spec says, and the
# estimate refuses them with that reason.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"])
@pytest.mark.parametrize("optim_args,exc,match", [
    ("momentum=0.9", TypeError, "not supported between instances of 'float' and 'str'"),
    ("alpha=0.9", TypeError, "not supported between instances of 'float' and 'str'"),
    ("centered=False", NotImplementedError, "Centered RMSprop is not supported"),
])
def test_rmsprop_bnb_optim_args_fail(optim, optim_args, exc, match):
    with pytest.raises(exc, match=match):
        _run(optim, optim_args=optim_args)
    with pytest.raises(UserError, match="rmsprop_bnb|Centered"):
        estimate("tiny-llama", optim, optim_args=optim_args)


@pytest.mark.parametrize("optim", TORCHAO_NAMES)
def test_torchao_block_size_optim_arg_fails(optim):
    with pytest.raises(TypeError, match=r"unsupported operand type\(s\) for %: 'int' and 'str'"):
        _run(optim, optim_args="block_size=128")
    with pytest.raises(UserError, match="block_size"):
        estimate("tiny-llama", optim, optim_args="block_size=128")


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit", "lion_8bit",
                                   "paged_adamw_32bit"])
def test_names_that_read_no_optim_args_refuse_them(optim):
    with pytest.raises(UserError, match="not read by"):
        estimate("tiny-llama", optim, optim_args="momentum=0.9")


def test_stable_adamw_fails_on_cpu_when_optimi_picks_triton(monkeypatch):
    pytest.importorskip("triton", reason="the failure needs triton importable")
    prepare_run("stable_adamw", "cpu")
    monkeypatch.setattr("optimem.harness.scenario.apply_optimizer_compat", lambda cfg, spec: None)  # the raw behaviour
    set_optimi_triton(True)
    try:
        with pytest.raises(RuntimeError, match="active drivers"):
            compare_state(RunConfig(optim="stable_adamw", model="tiny-llama", batch_size=2, seq_len=16, steps=1,
                                    device="cpu"))
    finally:
        set_optimi_triton(False)


# --------------------------------------------------------------------------------------------------------
# Layouts a CPU Trainer run cannot reach, from the packages' own state-creating code.
# --------------------------------------------------------------------------------------------------------
def test_paged_ademamix_fails_on_cpu_for_large_params(tmp_path):
    """bitsandbytes' AdEMAMix allocates the paged (2, *shape) state1 of a parameter with >= 1e5 elements in
    CUDA managed memory even on CPU (its CPU fallback only covers get_state_buffer)."""
    spec = get_spec("paged_ademamix_8bit")
    assert not spec.runs_on_cpu and "100000" in spec.cpu_note
    config = _tiny_config(tmp_path, "tiny-llama", vocab_size=2000)  # embed_tokens / lm_head: 128 000 elements
    for optim in ("paged_ademamix_32bit", "paged_ademamix_8bit"):
        with pytest.raises(RuntimeError, match="cget_managed_ptr"):
            _run(optim, config)


@pytest.mark.parametrize("optim", ["paged_ademamix_32bit", "paged_ademamix_8bit", "paged_adamw_8bit"])
def test_paged_large_params_layout(optim, tmp_path, monkeypatch):
    """Paged state for >= 1e5 elements, with the one CUDA call (managed allocation) and its fill replaced
    by a plain CPU allocation of the same shape and dtype: the Trainer run is then exact."""
    import bitsandbytes.functional as F

    def cpu_paged(*shape, dtype=torch.float32, device=None):
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(F, "get_paged", cpu_paged)
    monkeypatch.setattr(F, "fill", lambda A, value, device=None, prefetch=True: A.fill_(value))
    config = _tiny_config(tmp_path, "tiny-llama", vocab_size=2000)
    _assert_exact(_run(optim, config, "bf16"))


@pytest.mark.parametrize("model,dtype", [("tiny-llama", "fp32"), ("tiny-llama", "bf16"), ("tiny-t5", "bf16")])
def test_stable_adamw_triton_layout(model, dtype, monkeypatch):
    """optimi's own ``_init_group`` (what ``step()`` runs before its kernels) with triton importable, on
    the Trainer's optimizer and real gradients: the state it creates is exactly the default estimate."""
    pytest.importorskip("triton", reason="optimi only builds the Triton layout when triton is importable")
    prepare_run("stable_adamw", "cpu")
    monkeypatch.setattr("optimem.harness.scenario.apply_optimizer_compat", lambda cfg, spec: None)  # the raw behaviour
    set_optimi_triton(True)
    try:
        trainer = build_trainer(RunConfig(optim="stable_adamw", model=model, dtype=dtype, batch_size=2,
                                          seq_len=16, steps=1, device="cpu"))
        opt = trainer.create_optimizer()
        model_ = trainer.model
        batch = {k: v.unsqueeze(0) for k, v in trainer.train_dataset[0].items()}
        model_(**batch).loss.backward()
        for group in opt.param_groups:
            opt._init_group(group, [], [], [], [], [], [], [])
            assert group["triton"] is True
    finally:
        set_optimi_triton(False)
    measured = measure_optimizer_state(opt, exclude=list(model_.parameters()))
    est = estimate(model, "stable_adamw", dtype=dtype)
    assert measured.total == est.bytes["optimizer_state"], (measured.by_key, est.state_breakdown)
    assert "mean_square" in measured.by_key


def test_torchao_non_default_block_size_layout():
    """torchao's own AdamW8bit / AdamW4bit built directly with an int block_size (the Trainer cannot pass
    one): 128 quantizes a (170, 64) weight that 256 leaves plain. One eager step, state walked per param."""
    from torchao.optim import AdamW4bit, AdamW8bit

    shapes = [(170, 64), (64, 64), (32, 64), (64,), (1000, 64), (64, 200)]
    for cls, name in ((AdamW8bit, "adamw_torch_8bit"), (AdamW4bit, "adamw_torch_4bit")):
        for block in (128, 256, 64):
            for dtype, tdtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                params = [torch.nn.Parameter(torch.randn(s, dtype=tdtype)) for s in shapes]
                for p in params:
                    p.grad = torch.randn_like(p)
                opt = cls(params, lr=1e-3, block_size=block)
                opt.step()
                for p, shape in zip(params, shapes):
                    got = measure_optimizer_state(opt.state[p], exclude=params).total
                    want = sum(_state(name, _row(shape, dtype), block_size=block).values())
                    assert got == want, (name, block, dtype, shape, got, want)


def test_adafactor_3d_and_1d_layout():
    """transformers' Adafactor on a 3-D and a 1-D parameter (the tiny models have only 2-D and 1-D)."""
    from transformers.optimization import Adafactor

    for dtype, tdtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        shapes = [(4, 6, 8), (3, 5, 7, 2), (10,)]
        params = [torch.nn.Parameter(torch.randn(s, dtype=tdtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False)
        opt.step()
        for p, shape in zip(params, shapes):
            got = measure_optimizer_state(opt.state[p], exclude=params).total
            assert got == sum(_state("adafactor", _row(shape, dtype)).values()), (shape, dtype)


def test_big_shapes_from_package_init_code():
    """A 4096 x 4096 bf16 weight: state created by bitsandbytes' ``init_state`` and torchao's
    ``_new_buffer`` (allocation only, no update), walked, equals the formula."""
    import bitsandbytes as bnb
    from torchao.optim import AdamW4bit, AdamW8bit

    reset_bitsandbytes_manager()
    row = _row((4096, 4096), "bf16")
    p = torch.nn.Parameter(torch.zeros(4096, 4096, dtype=torch.bfloat16))
    for cls, name in ((bnb.optim.AdamW, "adamw_bnb_8bit"), (bnb.optim.AdEMAMix, "ademamix_8bit"),
                      (bnb.optim.Lion, "lion_8bit"), (bnb.optim.RMSprop, "rmsprop_bnb_8bit")):
        opt = cls([p], lr=1e-3, optim_bits=8)
        opt.init_state(opt.param_groups[0], p, 0, 0)
        want = sum(_state(name, row).values()) + 2 * 1024  # + the optimizer's two shared qmaps
        assert measure_optimizer_state(opt, exclude=[p]).total == want, name
    for cls, name in ((AdamW8bit, "adamw_torch_8bit"), (AdamW4bit, "adamw_torch_4bit")):
        opt = cls([p], lr=1e-3, block_size=256)
        bufs = [opt._new_buffer(p, True), opt._new_buffer(p, False)]
        got = measure_optimizer_state(bufs).total + 4  # + the 0-dim fp32 step
        assert got == sum(_state(name, row).values()), name


# --------------------------------------------------------------------------------------------------------
# Formula figures on shapes the tiny models cannot reach.
# --------------------------------------------------------------------------------------------------------
def test_big_weight_bytes_per_param():
    n = 4096 * 4096
    w = _row((4096, 4096), "bf16")
    assert sum(_state("adamw_bnb_8bit", w).values()) / n == 2.03125
    assert sum(_state("paged_adamw_8bit", w).values()) / n == 2.03125
    assert sum(_state("ademamix_8bit", w).values()) / n == 3.046875
    assert sum(_state("lion_8bit", w).values()) / n == 1.015625
    assert sum(_state("rmsprop_bnb_8bit", w).values()) / n == 1.015625
    assert sum(_state("paged_adamw_32bit", w).values()) / n == 8.0
    assert sum(_state("ademamix", w).values()) / n == 12.0
    # torchao: codes + fp32 scale per 256 + a private qmap per state tensor + 0-dim step
    assert sum(_state("adamw_torch_8bit", w).values()) == 2.03125 * n + 2 * 1024 + 4
    assert sum(_state("adamw_torch_4bit", w).values()) == 1.03125 * n + 2 * 64 + 4
    assert sum(_state("adamw_torch", w).values()) == 4 * n + 4
    assert sum(_state("adafactor", w).values()) == (4096 + 4096) * 4 + 4
    assert sum(_state("stable_adamw", w).values()) == 6 * n + 2 + 4
    assert sum(_state("stable_adamw", _row((4096, 4096), "fp32")).values()) == 8 * n + 4 + 1 + 4
    assert sum(_state("grokadamw", w).values()) == 6 * n
    assert sum(_state("schedule_free_sgd", w).values()) == 2 * n
    # an embedding stays 32-bit in 8-bit bnb (the Trainer's override), whatever its size
    emb = _row((128256, 4096), "bf16", kind="embedding", embedding=True)
    assert sum(_state("adamw_8bit", emb).values()) == 8 * 128256 * 4096
    # the 4096-element threshold and the partial last block
    assert _state("adamw_8bit", _row((4095,)))["state1"] == 4095 * 4
    assert _state("adamw_8bit", _row((4097,))) == {"state1": 4097, "state2": 4097, "absmax1": 17 * 4,
                                                   "absmax2": 17 * 4}
    # torchao: >= 4096 and divisible by the block size, else plain param-dtype state
    assert "exp_avg" in _state("adamw_torch_8bit", _row((4096 + 128,)))
    assert "exp_avg.codes" in _state("adamw_torch_8bit", _row((4096 + 128,)), block_size=128)
    assert "exp_avg" in _state("adamw_torch_4bit", _row((3840,)))


def test_estimate_of_a_big_config_matches_per_row_sum():
    """estimate() over a real catalog config adds the per-optimizer extras once."""
    inv = build_inventory("Llama-2-7b-hf").with_dtype("bf16")
    e = estimate(inv, "adamw_torch_8bit", dtype="bf16")
    per_row = sum(sum(_state("adamw_torch_8bit", r).values()) for r in inv.rows if r.trainable)
    assert e.bytes["optimizer_state"] == per_row + 16
    e8 = estimate(inv, "adamw_bnb_8bit", dtype="bf16")
    per_row = sum(sum(_state("adamw_bnb_8bit", r).values()) for r in inv.rows if r.trainable)
    assert e8.bytes["optimizer_state"] == per_row + 2048
    embed = next(r for r in inv.rows if r.in_embedding)
    assert e8.state_breakdown["state1"] == sum(r.numel for r in inv.rows if not r.in_embedding) + embed.numel * 4


# --------------------------------------------------------------------------------------------------------
# Why prepare_run resets bitsandbytes: its override manager outlives a Trainer.
# --------------------------------------------------------------------------------------------------------
def test_bnb_override_manager_leaks_between_trainers_without_reset(monkeypatch):
    """bitsandbytes records the Trainer's embedding overrides by (group, index) for the whole process: after
    a tiny-gpt2 run (wpe at decay-group index 1), a tiny-llama run without the reset gets its index-1 weight,
    the 4096-element layer-0 q_proj, in 32-bit: +24 448 B."""
    _run("adamw_8bit", "tiny-gpt2")
    monkeypatch.setattr("optimem.harness.scenario.apply_optimizer_compat", lambda cfg, spec: None)  # the raw behaviour
    leaked = compare_state(RunConfig(optim="adamw_8bit", model="tiny-llama", batch_size=2, seq_len=16, steps=1,
                                     device="cpu"))
    assert leaked.measured.total - leaked.predicted["optimizer_state"] == 4096 * 4 * 2 - 2 * (4096 + 16 * 4)
    _assert_exact(_run("adamw_8bit", "tiny-llama"))


# --------------------------------------------------------------------------------------------------------
# Host / device split (what stays in CPU memory when training on CUDA; a CPU run cannot show it).
# --------------------------------------------------------------------------------------------------------
def test_host_resident_state_on_cuda(tmp_path):
    """torch's non-fused ``step``, torchao's ``step``/``lr``/``initial_lr``, optimi's group ``step`` and the
    bnb qmaps that no 8-bit parameter moved are created without a device, i.e. in host memory."""
    inv = build_inventory("tiny-llama")
    tensors = sum(1 for r in inv.rows if r.trainable)
    host = {name: estimate("tiny-llama", name).bytes["optimizer_state_host"] for name in
            ("adamw_torch", "adamw_torch_fused", "adagrad", "rmsprop", "adamw_torch_8bit", "stable_adamw",
             "adamw_bnb_8bit", "lion_8bit", "paged_adamw_32bit", "grokadamw")}
    assert host["adamw_torch"] == host["adagrad"] == host["rmsprop"] == 4 * tensors
    assert host["adamw_torch_fused"] == 0
    assert host["adamw_torch_8bit"] == 4 * tensors + 16
    assert host["stable_adamw"] == 8
    assert host["adamw_bnb_8bit"] == 0 and host["paged_adamw_32bit"] == 0
    assert host["lion_8bit"] == 1024  # one-state: only the signed map moves to the device
    assert host["grokadamw"] == estimate("tiny-llama", "grokadamw").bytes["optimizer_state"]
    # No parameter gets 8-bit state (all < 4096 elements or embeddings): both maps stay on the host.
    small = _tiny_config(tmp_path, "tiny-gpt2", n_embd=16, n_head=2)  # largest non-embedding: 16 x 64
    assert all(r.numel < 4096 or r.in_embedding for r in build_inventory(small).rows)
    assert estimate(small, "adamw_8bit").bytes["optimizer_state_host"] == 2048
