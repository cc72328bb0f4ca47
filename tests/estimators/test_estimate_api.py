"""The Python API: estimate() figures that can be computed by hand, and its errors."""
import json
import math

import pytest

from optimem.estimators import REGISTRY, UserError, build_inventory, estimate, names
from optimem.estimators.optimizers import parse_optim_args


def test_bytes_keys_and_json():
    est = estimate("tiny-llama", "adamw_torch")
    assert {"weights", "gradients", "optimizer_state", "optimizer_state_host"} <= set(est.bytes)
    d = json.loads(json.dumps(est.to_dict()))
    assert d["optim"] == "adamw_torch" and d["bytes"] == est.bytes


@pytest.mark.slow


def test_adamw_by_hand_on_llama_3_8b():
    inv = build_inventory("meta-llama/Meta-Llama-3-8B")
    n, tensors = inv.num_params, len(inv.rows)
    fp32 = estimate(inv, "adamw_torch")
    assert fp32.bytes["weights"] == 4 * n and fp32.bytes["gradients"] == 4 * n
    assert fp32.bytes["optimizer_state"] == 8 * n + 4 * tensors  # exp_avg + exp_avg_sq, a 0-dim fp32 step each
    bf16 = estimate(inv, "adamw_torch", dtype="bf16")
    assert bf16.bytes["optimizer_state"] == 4 * n + 4 * tensors


def test_bnb_8bit_by_hand():
    inv = build_inventory("meta-llama/Meta-Llama-3-8B")
    est = estimate(inv, "adamw_bnb_8bit", dtype="bf16")
    expected = 0
    for r in inv.rows:
        if r.numel >= 4096 and not r.in_embedding:
            expected += 2 * r.numel + 2 * 4 * math.ceil(r.numel / 256)
        else:  # small tensors and embeddings (the Trainer keeps those in 32-bit)
            expected += 2 * 4 * r.numel
    assert est.bytes["optimizer_state"] == expected + 2 * 256 * 4  # + the two shared quantization maps


def test_host_state():
    est = estimate("tiny-llama", "grokadamw")
    assert est.bytes["optimizer_state_host"] == est.bytes["optimizer_state"] > 0
    # torch's non-fused AdamW keeps its 0-dim fp32 `step` counters on the CPU; fused ones live on the device.
    n_tensors = len(build_inventory("tiny-llama").rows)
    assert estimate("tiny-llama", "adamw_torch").bytes["optimizer_state_host"] == 4 * n_tensors
    assert estimate("tiny-llama", "adamw_torch_fused").bytes["optimizer_state_host"] == 0


def test_lomo_keeps_no_gradients_and_layerwise_one_at_a_time():
    inv = build_inventory("tiny-llama")
    largest = max(r.nbytes for r in inv.rows)
    assert estimate("tiny-llama", "lomo").bytes["gradients"] == largest  # measured by bench run: 250 KiB
    lw = estimate("tiny-llama", "galore_adamw_layerwise", optim_target_modules="all-linear")
    assert lw.bytes["gradients"] == largest


def test_freeze_changes_trainable_and_state():
    full = estimate("tiny-llama", "adamw_torch")
    frozen = estimate("tiny-llama", "adamw_torch", freeze=r"embed_tokens")
    emb = 1000 * 64
    assert full.trainable_params - frozen.trainable_params == emb
    assert full.bytes["optimizer_state"] - frozen.bytes["optimizer_state"] == 8 * emb + 4


def test_every_available_name_estimates():
    for name in names(include_unavailable=False):
        kw = {"optim_target_modules": "all-linear"} if REGISTRY[name].needs_target_modules else {}
        est = estimate("tiny-llama", name, dtype="bf16", **kw)
        assert est.bytes["optimizer_state"] >= 0


@pytest.mark.parametrize("name", ["adamw_torch_xla", "adamw_torch_npu_fused", "adamw_anyprecision",
                                  "adamw_apex_fused", "adamw_hf"])
def test_unrunnable_and_removed_names_explain(name):
    with pytest.raises(UserError) as err:
        estimate("tiny-llama", name)
    assert name in str(err.value) and len(str(err.value)) > 40


@pytest.mark.parametrize("kwargs,needle", [
    ({"optim": "adamw_torhc"}, "did you mean 'adamw_torch'"),
    ({"optim": "galore_adamw"}, "needs optim_target_modules"),
    ({"optim": "galore_adamw", "optim_target_modules": "nomatch"}, "matches optim_target_modules"),
    ({"optim": "galore_adamw", "optim_target_modules": "all-linear", "optim_args": "rank"}, "malformed optim_args"),
    ({"optim": "galore_adamw", "optim_target_modules": "all-linear", "optim_args": "rank=x"}, "is not valid for galore_adamw"),
    ({"optim": "adamw_torch", "optim_args": "rank=4"}, "not read by adamw_torch"),
    ({"optim": "adamw_torch", "dtype": "fp8"}, "unknown dtype"),
])
def test_bad_input_raises_user_error(kwargs, needle):
    with pytest.raises(UserError) as err:
        estimate("tiny-llama", **kwargs)
    assert needle in str(err.value)


def test_optim_args_parsing_matches_the_trainer():
    from transformers.trainer_optimizer import _parse_optim_args

    text = "proj=random, rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
    assert parse_optim_args(text) == _parse_optim_args(text)
