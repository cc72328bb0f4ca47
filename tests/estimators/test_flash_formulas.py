"""FlashOptim (flashoptim 0.1.4) state formulas, checked against the real optimizer's state on CPU.

FlashOptim's own state-creation code (``FlashOptimizer._ensure_state_initialized``,
``_MaybeQuantizedTensor.set_data``, ``quantize()``, ``FlashAdam._ensure_state_initialized``) is plain
PyTorch; only the Triton kernel launches need a GPU. The ``fake_cuda`` fixture makes flashoptim believe CUDA
is there (``torch.cuda.is_available``, ``Tensor.is_cuda``) and turns every ``_triton_*_kernel[grid](...)``
launch into a no-op, so the real constructors, ``step()`` and allocations run on CPU tensors and the state
they leave behind is walked with ``measure_optimizer_state``. Values are garbage; sizes and dtypes are real.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import replace

import pytest
import torch

flashoptim = pytest.importorskip("flashoptim")
import flashoptim.optimizers as fo  # noqa: E402

from optimem.estimators import UserError, estimate, get_spec  # noqa: E402
from optimem.estimators.inventory import ParamRow, build_inventory  # noqa: E402
from optimem.estimators.optimizers import ParamCtx, parse_optim_args  # noqa: E402
from optimem.estimators.optimizers.flash import SPECS  # noqa: E402
from optimem.harness.scenario import RunConfig, build_trainer, flash_optimizer_cls_and_kwargs  # noqa: E402
from optimem.harness.state_walker import measure_optimizer_state  # noqa: E402

FLASH = [s.name for s in SPECS]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sizes chosen so the last 32-element quantization group is padded (35, 33, 1, 96 + 1 ...).
SHAPES = [(7, 5), (33,), (1,), (64, 64), (3, 32), (97,)]
KERNELS = ["_triton_quantize_kernel", "_triton_dequantize_kernel", "_triton_adam_kernel",
           "_triton_momentum_kernel", "_reconstruct_fp32_kernel", "_compute_ecc_bits_kernel"]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def fake_cuda():
    """Only around flashoptim calls: transformers/optimem code must not see the fake CUDA."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        for name in KERNELS:
            assert hasattr(fo, name), f"flashoptim no longer has {name}: re-read its source"
            mp.setattr(fo, name, _NoLaunch())
        yield


def _row(shape, dtype) -> ParamRow:
    return ParamRow(name="w", shape=tuple(shape), dtype=dtype, trainable=True, module_kind="linear",
                    module_name="m", module_class="Linear")


def _predicted(name: str, optim_args: str | None, rows) -> tuple[int, dict[str, int]]:
    spec = get_spec(name)
    args = spec.resolve_args(parse_optim_args(optim_args))
    by_key: dict[str, int] = {}
    for row in rows:
        for k, v in spec.param_state(ParamCtx(row, args)).items():
            by_key[k] = by_key.get(k, 0) + v
    return sum(by_key.values()), by_key


def _real_optimizer(name: str, optim_args: str | None, params):
    """The optimizer exactly as the harness builds it (``flash_optimizer_cls_and_kwargs``), over the
    Trainer's two param groups (decay / no decay, each with its own weight_decay)."""
    spec = get_spec(name)
    cls, kwargs = flash_optimizer_cls_and_kwargs(name, spec.resolve_args(parse_optim_args(optim_args)), 1e-3)
    half = len(params) // 2
    return cls([{"params": params[:half], "weight_decay": 0.1}, {"params": params[half:], "weight_decay": 0.0}],
               **kwargs)


CASES = [
    # (name, optim_args, param dtype)
    ("flash_adamw", None, "bf16"),
    ("flash_adamw", None, "fp16"),
    ("flash_adamw", "master_weight_bits=32", "bf16"),
    ("flash_adamw", "master_weight_bits=None", "bf16"),
    ("flash_adamw", "master_weight_bits=None", "fp32"),
    ("flash_adamw", "quantize=False", "bf16"),
    ("flash_adamw", "quantize=False,master_weight_bits=None", "fp32"),
    ("flash_adam", None, "bf16"),
    ("flash_adam", "master_weight_bits=32,eps=1e-6", "fp16"),
    ("flash_lion", None, "bf16"),
    ("flash_lion", "master_weight_bits=None", "fp32"),
    ("flash_lion", "master_weight_bits=32,decouple_lr=true", "bf16"),
    ("flash_sgd", None, "bf16"),
    ("flash_sgd", "master_weight_bits=None", "fp32"),
    ("flash_sgd", "momentum=0.9", "bf16"),
    ("flash_sgd", "momentum=0.9,nesterov=true,master_weight_bits=32", "bf16"),
    ("flash_sgd", "momentum=0.9,master_weight_bits=None", "fp32"),
    ("flash_sgdw", None, "bf16"),
    ("flash_sgdw", "momentum=0.9,dampening=0.1,decouple_lr=true", "fp16"),
    ("flash_sgdw", "momentum=0.9,quantize=False,master_weight_bits=None", "bf16"),
]


@pytest.mark.parametrize("name,optim_args,dtype", CASES)
def test_layout_matches_real_state(name, optim_args, dtype):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=TORCH_DTYPES[dtype])) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    with fake_cuda():
        opt = _real_optimizer(name, optim_args, params)
        opt.step()
        opt.step()
    measured = measure_optimizer_state(opt, exclude=params)
    total, by_key = _predicted(name, optim_args, [_row(s, dtype) for s in SHAPES])
    assert measured.by_key == by_key, (name, optim_args, dtype)
    assert measured.total == total


def test_tensor_dtypes_and_padding():
    """The exact tensors one bf16 (7, 5) parameter gets (optimizers.py, _ensure_state_initialized)."""
    p = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    with fake_cuda():
        opt = flashoptim.FlashAdamW([p], lr=1e-3)
        opt.step()
        opt32 = flashoptim.FlashAdamW([p], lr=1e-3, master_weight_bits=32)
        opt32.step()
    st = opt.state[p]
    assert set(st) == {"exp_avg", "exp_avg_sq", "error_bits", "step"}
    for key, code_dtype in (("exp_avg", torch.int8), ("exp_avg_sq", torch.uint8)):
        q = st[key]
        assert q.is_quantized() and q._data is None
        assert q.quantized.dtype == code_dtype and q.quantized.shape == p.shape
        assert q.scales.dtype == torch.float16 and q.scales.shape == (math.ceil(35 / 32),)  # last group padded
    assert st["error_bits"].dtype == torch.int8 and st["error_bits"].shape == p.shape
    assert st["step"].dtype == torch.int64 and st["step"].dim() == 0 and st["step"].device.type == "cpu"
    assert opt32.state[p]["error_bits"].dtype == torch.int16


def test_sgd_keeps_no_momentum_buffer_by_default():
    assert inspect.signature(flashoptim.FlashSGD.__init__).parameters["momentum"].default == 0.0
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    with fake_cuda():
        opt = flashoptim.FlashSGD([p], lr=1e-3)
        opt.step()
    assert set(opt.state[p]) == {"error_bits"}
    assert _predicted("flash_sgd", None, [_row((40,), "bf16")])[1] == {"error_bits": 40}


def test_fp32_params_with_master_weight_bits_raise():
    """FlashOptimizer.__init__: ValueError when all params are fp32 and master_weight_bits is not None."""
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    with fake_cuda():
        for bits in (24, 32):
            with pytest.raises(ValueError, match="all parameters are fp32"):
                flashoptim.FlashAdamW(params, lr=1e-3, master_weight_bits=bits)
        flashoptim.FlashAdamW(params, lr=1e-3, master_weight_bits=None)  # accepted
    for name in FLASH:
        with pytest.raises(UserError, match="master_weight_bits=None"):
            estimate("tiny-llama", name, dtype="fp32")
        estimate("tiny-llama", name, dtype="fp32", optim_args="master_weight_bits=None")


def test_mixed_fp32_and_bf16_params():
    """Not all fp32: no error; the fp32 parameter simply gets no error_bits (3 - 4 < 0 extra bytes)."""
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))]
    for p in params:
        p.grad = torch.randn_like(p)
    with fake_cuda():
        opt = flashoptim.FlashAdamW(params, lr=1e-3)
        opt.step()
    assert "error_bits" not in opt.state[params[0]] and "error_bits" in opt.state[params[1]]
    assert measure_optimizer_state(opt, exclude=params).total == \
        _predicted("flash_adamw", None, [_row((8, 8), "fp32"), _row((8, 8), "bf16")])[0]
    # The estimate's whole-model check sees the same thing: one bf16 trainable row is enough.
    inv = build_inventory("tiny-llama")
    rows = list(inv.rows)
    rows[0] = replace(rows[0], dtype="bf16")
    get_spec("flash_adamw").shared(replace(inv, rows=tuple(rows), _cache={}), {"master_weight_bits": 24})
    # ...and frozen bf16 rows do not count (the Trainer passes only requires_grad params).
    rows[0] = replace(rows[0], trainable=False)
    with pytest.raises(UserError):
        get_spec("flash_adamw").shared(replace(inv, rows=tuple(rows), _cache={}), {"master_weight_bits": 24})


@pytest.mark.parametrize("name", FLASH)
def test_tiny_llama_trainer_groups(name):
    """Whole model, the Trainer's own param groups and kwargs: walked state == estimate(), per key."""
    trainer = build_trainer(RunConfig(optim=name, model="tiny-llama", dtype="bf16", device="cpu"))
    params = list(trainer.model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    with fake_cuda():
        opt = trainer.create_optimizer()
        opt.step()
    assert type(opt).__name__ == get_spec(name).cls.rsplit(".", 1)[1]
    measured = measure_optimizer_state(opt, exclude=params)
    est = estimate("tiny-llama", name, dtype="bf16")
    assert measured.by_key == est.state_breakdown
    assert measured.total == est.bytes["optimizer_state"]


def test_nesterov_needs_momentum():
    with fake_cuda():
        with pytest.raises(ValueError, match="Nesterov"):
            flashoptim.FlashSGD([torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))], nesterov=True)
    with pytest.raises(UserError, match="nesterov"):
        estimate("tiny-llama", "flash_sgd", dtype="bf16", optim_args="nesterov=true")
    estimate("tiny-llama", "flash_sgd", dtype="bf16", optim_args="nesterov=true,momentum=0.9")


@pytest.mark.parametrize("name", FLASH)
def test_args_are_real_constructor_kwargs(name):
    spec = get_spec(name)
    sig = inspect.signature(getattr(flashoptim, spec.cls.rsplit(".", 1)[1]).__init__).parameters
    for key in list(spec.arg_types) + list(spec.defaults):
        assert key in sig, f"{name}: {key} is not a constructor argument"
    for key, value in spec.defaults.items():
        assert sig[key].default == value, f"{name}: default {key}={value!r} differs from the constructor's"
    assert "weight_decay" not in spec.arg_types  # the Trainer's param groups override it


def test_master_weight_bits_values():
    spec = get_spec("flash_adamw")
    assert spec.resolve_args({"master_weight_bits": "None"})["master_weight_bits"] is None
    assert spec.resolve_args({"master_weight_bits": "32"})["master_weight_bits"] == 32
    for bad in ("0", "16", "8bit"):
        with pytest.raises(UserError):
            spec.resolve_args({"master_weight_bits": bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_defaults_need_cuda():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="CUDA"):
        flashoptim.FlashAdamW([p], lr=1e-3)


@pytest.mark.parametrize("name,dtype,extra", [("flash_adamw", "bf16", ""), ("flash_sgd", "fp32", ",momentum=0.9"),
                                              ("flash_lion", "bf16", "")])
def test_real_trainer_run_on_cpu(name, dtype, extra):
    """Without CUDA FlashOptim runs its unfused PyTorch path when quantize, master weights and fusion are off:
    a real Trainer run through the harness (scenario's optimizer_cls_and_kwargs) matches exactly."""
    from optimem.harness.state_check import compare_state

    cmp = compare_state(RunConfig(optim=name, model="tiny-llama", dtype=dtype, device="cpu",
                                  optim_args="quantize=False,master_weight_bits=None,fused=False" + extra))
    assert cmp.measured.total > 0
    assert cmp.rel_error == 0.0, cmp.describe()
    assert cmp.measured.by_key == cmp.breakdown
