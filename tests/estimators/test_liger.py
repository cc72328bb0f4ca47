"""Liger kernels (issue 23): the model traced as the Trainer patches it, the Triton kernels as rules from
liger-kernel's source. The done-when inequality -- lower by at least the fp32 logits it no longer holds -- on
Llama-3-8B's vocabulary and width at 8192 tokens (two of its 32 layers, to stay fast; the full model's figure is
in the README)."""
from __future__ import annotations

import json

import pytest

from optimem.estimators import estimate
from optimem.estimators.errors import UserError
from optimem.estimators.setup import TrainingSetup

pytest.importorskip("liger_kernel")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama3_two_layers(tmp_path_factory):
    cfg = json.loads((ROOT / "estimators" / "configs" / "Meta-Llama-3-8B.json").read_text())
    cfg["num_hidden_layers"] = 2
    path = tmp_path_factory.mktemp("liger") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_liger_drops_at_least_the_fp32_logits(llama3_two_layers):
    kw = dict(mixed_precision="bf16", seq_len=8192, batch_size=1)
    plain = estimate(llama3_two_layers, "adamw_torch", **kw)
    liger = estimate(llama3_two_layers, "adamw_torch", use_liger_kernel=True, **kw)
    fp32_logits = 8192 * 128256 * 4
    assert plain.bytes["peak"] - liger.bytes["peak"] >= fp32_logits
    assert plain.bytes["activations"] - liger.bytes["activations"] >= fp32_logits
    assert any("rules from liger-kernel's source, not measured" in n for n in liger.notes)
    # model states are the same: Liger changes what the step computes, not what it stores
    assert {k: liger.bytes[k] for k in ("weights", "gradients", "optimizer_state")} == \
        {k: plain.bytes[k] for k in ("weights", "gradients", "optimizer_state")}


def test_liger_config_switches_kernels_off():
    kw = dict(seq_len=64, batch_size=2)
    full = estimate("tiny-llama", "adamw_torch", use_liger_kernel=True, **kw)
    no_flce = estimate("tiny-llama", "adamw_torch", use_liger_kernel=True,
                       liger_kernel_config='{"fused_linear_cross_entropy": false}', **kw)
    plain = estimate("tiny-llama", "adamw_torch", **kw)
    assert full.bytes["activations"] < no_flce.bytes["activations"] < plain.bytes["activations"]


@pytest.mark.parametrize("fields,needle", [
    (dict(model="gpt2"), "liger-kernel does not patch model type 'gpt2'"),
    (dict(model="tiny-gemma2"), "no rules for yet"),
    (dict(liger_kernel_config='{"bogus": true}'), "not an option"),
    (dict(liger_kernel_config='{"cross_entropy": true, "fused_linear_cross_entropy": false}'), "not modelled"),
    (dict(device="cpu"), "Triton GPU kernels"),
])
def test_liger_refusals_are_one_line(fields, needle):
    with pytest.raises(UserError, match=needle) as err:
        setup = TrainingSetup(**{"model": "tiny-llama", "use_liger_kernel": True, **fields})
        setup.check_trainable()
    assert "\n" not in str(err.value)
