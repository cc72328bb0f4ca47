"""Exactness on a GPU for every optimizer that cannot run on CPU: a real Trainer run (``compare_state``) on
tiny-llama, walked optimizer state vs ``estimate()``, within 0.5 %.

Skipped as a whole without CUDA (CI has none); imports nothing that needs CUDA.

Read before changing:
* Only totals are compared. The walker counts CPU tensors as host bytes when training on CUDA, the
  estimate puts a spec's whole state on one side (``state_location``): FlashAdam's ``step`` (a CPU int64
  tensor per parameter) and bitsandbytes' paged buffers (managed memory, seen by torch as CPU tensors made
  with ``torch.frombuffer``) land on the host side of the measurement.
* Storage bytes are compared, not allocator blocks (CUDA rounds each allocation up to 512 B; the walker
  reads ``untyped_storage().nbytes()``).
* bitsandbytes pages a state only for parameters with >= 1e5 elements; tiny-llama's largest has 64 000, so
  the paged path itself is exercised by ``test_paged_ademamix_pages_big_params`` on gpt2. Paged buffers are
  also listed in ``GlobalPageManager.paged_tensors``, a process-wide singleton the walker reaches through
  ``optimizer.page_mng``; it is cleared around every test so that one optimizer's walk cannot count the
  paged buffers an earlier optimizer of this process left there.
"""
from __future__ import annotations

import pytest
import torch

from optimem.estimators import REGISTRY
from optimem.harness.scenario import RunConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = 0.005
MODEL = "tiny-llama"
GPU_ONLY = [s for s in REGISTRY.values() if s.availability == "ok" and not s.runs_on_cpu]

# Names the registry marks "ok" whose Trainer run fails before any state exists, on any device:
# GaLoreAdafactor's constructor defaults relative_step=True, and the Trainer's layer-wise path builds one
# optimizer per parameter with lr= but without relative_step=False (checked on CPU: ValueError
# "Cannot combine manual `lr` and `relative_step=True` options" from galore_torch/adafactor.py).
RAISES_IN_TRAINER = {"galore_adafactor_layerwise": (ValueError, "relative_step")}


def _fp32_args(spec) -> str | None:
    """optim_args that make fp32 parameters acceptable: FlashOptim raises for all-fp32 parameters unless
    master_weight_bits is None (its default is 24)."""
    return "master_weight_bits=None" if spec.defaults.get("master_weight_bits") is not None else None


def _cases():
    out = []
    for spec in GPU_ONLY:
        out.append(pytest.param(spec.name, "bf16", None, id=f"{spec.name}-bf16"))
        out.append(pytest.param(spec.name, "fp32", _fp32_args(spec), id=f"{spec.name}-fp32"))
    return out


# Non-default FlashOptim configurations whose state differs from the defaults' (layout: flash.py).
FLASH_EXTRA = [
    ("flash_adamw", "bf16", "master_weight_bits=32"),
    ("flash_adamw", "fp16", None),
    ("flash_adamw", "bf16", "quantize=False"),
    ("flash_adam", "bf16", "master_weight_bits=None"),
    ("flash_lion", "bf16", "master_weight_bits=32"),
    ("flash_sgd", "bf16", "momentum=0.9"),
    ("flash_sgd", "fp32", "momentum=0.9,master_weight_bits=None"),
    ("flash_sgdw", "bf16", "momentum=0.9,nesterov=true,master_weight_bits=32"),
]


@pytest.fixture(autouse=True)
def _clean_cuda_and_pages():
    _clear_bnb_pages()
    yield
    _clear_bnb_pages()
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def _clear_bnb_pages() -> None:
    try:
        from bitsandbytes.functional import GlobalPageManager
    except Exception:  # bitsandbytes missing or without CUDA support: nothing can be paged
        return
    GlobalPageManager.get_instance().paged_tensors.clear()


def _config(name: str, dtype: str, optim_args: str | None, model: str = MODEL) -> RunConfig:
    spec = REGISTRY[name]
    return RunConfig(optim=name, model=model, dtype=dtype, optim_args=optim_args, device="cuda",
                     optim_target_modules="all-linear" if spec.needs_target_modules else None)


def _check(cfg: RunConfig):
    from optimem.harness.state_check import compare_state

    cmp = compare_state(cfg)
    # rel_error is 0 when both are 0 (flash_sgd on fp32 with master_weight_bits=None keeps no state at all)
    # and infinite when only the measurement is 0.
    assert abs(cmp.rel_error) <= TOL, f"rel_error {cmp.rel_error:+.4%}: {cmp.describe()}"
    return cmp


@pytest.mark.parametrize("name,dtype,optim_args", _cases())
def test_gpu_only_state_exact(name, dtype, optim_args):
    spec = REGISTRY[name]
    if not spec.installed():
        pytest.skip(f"{spec.package} is not installed")
    cfg = _config(name, dtype, optim_args)
    if name in RAISES_IN_TRAINER:
        from optimem.harness.state_check import compare_state

        exc, match = RAISES_IN_TRAINER[name]
        with pytest.raises(exc, match=match):
            compare_state(cfg)
        return
    _check(cfg)


@pytest.mark.parametrize("name,dtype,optim_args", FLASH_EXTRA)
def test_flash_variants_exact(name, dtype, optim_args):
    if name not in REGISTRY or not REGISTRY[name].installed():
        pytest.skip(f"{name} not available")
    cmp = _check(_config(name, dtype, optim_args))
    # FlashAdam's `step` is a 0-dim int64 tensor created on the CPU: exactly 8 host bytes per parameter.
    if "step" in cmp.breakdown:
        assert cmp.measured.host == cmp.breakdown["step"], cmp.measured.to_dict()


@pytest.mark.parametrize("name", [s.name for s in GPU_ONLY if s.name.startswith("flash_")])
def test_flash_fp32_default_raises_like_the_estimate(name):
    """FlashOptim's default master_weight_bits=24 with all-fp32 parameters: the real Trainer run raises
    ValueError in the constructor, and estimate() raises UserError."""
    from optimem.estimators import UserError, estimate
    from optimem.harness.state_check import compare_state

    if not REGISTRY[name].installed():
        pytest.skip("flashoptim not installed")
    with pytest.raises(ValueError, match="fp32"):
        compare_state(_config(name, "fp32", None))
    with pytest.raises(UserError):
        estimate(MODEL, name, dtype="fp32")


@pytest.mark.parametrize("name", [s.name for s in GPU_ONLY if s.name.startswith("paged_ademamix")])
def test_paged_ademamix_pages_big_params(name):
    """gpt2 (wte: 50257 x 768 >= 1e5 elements) so bitsandbytes really pages: paged buffers are CPU-visible
    managed memory, so the walker reports them as host bytes; the total must still match."""
    if not REGISTRY[name].installed():
        pytest.skip("bitsandbytes not installed")
    cmp = _check(_config(name, "bf16", None, model="gpt2"))
    assert cmp.measured.host > 0, f"nothing was paged: {cmp.measured.to_dict()}"
