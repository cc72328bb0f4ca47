"""CUDA's autocast policy on the trace (estimators/trace/cuda_autocast.py): for every op the traced models run
under --fp16/--bf16 with device="cuda", the dtype the trace produces is the one torch's own AutocastCUDA kernel
gives on fake CUDA tensors, and CPU autocast is left exactly as it was (CPU estimates stay exact)."""
import pytest
import torch

from optimem.estimators.catalog import resolve
from optimem.estimators.trace import cuda_autocast as ca
from optimem.estimators.trace.run import _Tracer
from optimem.estimators.trace.setting import TraceSetting

CASES = [("tiny-bert", "masked-lm", "eager"), ("tiny-gpt2", None, "eager"), ("tiny-t5", None, "sdpa")]


def _trace(model, task, attn, mixed, device):
    _Tracer(resolve(model), TraceSetting(mixed=mixed, attn=attn, task=task, device=device)).run(2, 24, False)


def test_every_traced_op_gets_cudas_dtype():
    ca.SEEN.clear()
    for model, task, attn in CASES:
        for mixed in ("fp16", "bf16"):
            _trace(model, task, attn, mixed, "cuda")
    wrong = {k: v for k, v in ca.SEEN.items() if v[0] != v[1]}
    assert ca.SEEN and not wrong, wrong
    ops = {k[0] for k in ca.SEEN}
    # the policy is torch's: every op decided here has an AutocastCUDA kernel in this torch
    assert ops <= set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))
    out = {(k[0], k[1]): v[0] for k, v in ca.SEEN.items()}
    for low in (torch.float16, torch.bfloat16):  # CUDA's lists, where CPU's differ
        assert out[("aten::softmax.int", low)] == torch.float32
        assert out[("aten::layer_norm", low)] == torch.float32
        assert out[("aten::linear", low)] == low
        assert out[("aten::pow.Tensor_Scalar", low)] == torch.float32


def test_cpu_traces_and_cpu_autocast_are_untouched():
    x, w = torch.randn(4, 8), torch.randn(8, 8)

    def cpu_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [t.dtype for t in (x @ w, torch.softmax(x, -1), torch.nn.functional.layer_norm(x, (8,)),
                                      x.pow(2), torch.nn.functional.linear(x, w))]

    before = cpu_policy()
    ca.SEEN.clear()
    _trace("tiny-gpt2", None, "eager", "bf16", "cpu")
    assert not ca.SEEN  # a CPU trace keeps torch's CPU autocast kernels
    _trace("tiny-gpt2", None, "eager", "bf16", "cuda")
    assert ca.SEEN and cpu_policy() == before  # the CUDA policy's kernels are gone after its trace


@pytest.mark.parametrize("mixed", ["fp16", "bf16"])
def test_cuda_estimates_differ_from_cpu_policy(mixed):
    from optimem import estimate

    kw = dict(batch_size=2, seq_len=32, mixed_precision=mixed, attn_implementation="eager")
    cuda = estimate("tiny-gpt2", "adamw_torch", device="cuda", **kw)
    cpu = estimate("tiny-gpt2", "adamw_torch", device="cpu", **kw)
    # fp32 softmax / layer norm outputs saved for the backward: more activation bytes than CPU's policy keeps
    assert cuda.bytes["activations"] > cpu.bytes["activations"]
