"""The whole-step peak of LoRA / QLoRA setups: the peft model traced (estimators/trace, ``TraceSetting.peft``)
against real Trainer runs on the CPU, the estimate and the planner.

The full matrix (4 architectures x plain / nf4 / int8 bases x 3 optimizers x checkpointing, bf16, DoRA) is
``python -m optimem.harness.validate --peft`` (results/peak_error_cpu.md); here a few cases of it, tight.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from optimem.estimators import estimate  # noqa: E402
from optimem.estimators import step_memory as SM
from optimem.harness.cli import main  # noqa: E402
from optimem.harness.validate import PEFT_LORA, Case, run_case  # noqa: E402

TIGHT = 5e-4
"""Relative error allowed per phase here (the matrix's bar is 1% / 2%; these cases come out within bytes)."""


def _check(case: Case) -> None:
    r = run_case(case)
    assert r.status == "ok", r.reason
    errors = r.phase_errors()
    assert len(errors) == 6, r.phases
    assert abs(r.peak_error) < TIGHT and all(abs(e) < TIGHT for e in errors.values()), (r.measured_peak,
                                                                                      r.predicted_peak, r.phases)


def test_lora_trace_equals_a_real_cpu_run():
    """LoRA with dropout on Llama: adapters' dropout input and low-rank intermediates, fp32 adapters."""
    _check(Case("tiny-llama", "adamw_torch", 2, 64, False, lora=PEFT_LORA))


def test_qlora_nf4_trace_equals_a_real_cpu_run():
    """QLoRA as recipes run it: a bf16 base loaded as NF4 with double quantization, bf16 compute,
    prepare_model_for_kbit_training, checkpointing; Qwen2's biased projections (bitsandbytes casts each
    bias to the compute dtype on the first call) and the dynamic code bitsandbytes caches."""
    _check(Case("tiny-qwen2", "adamw_torch", 2, 64, True, dtype="bf16", lora=PEFT_LORA, quantize="nf4",
                quant_compute_dtype="bf16"))


def test_int8_trace_equals_a_real_cpu_run():
    _check(Case("tiny-gpt2", "adafactor", 2, 64, False, lora=PEFT_LORA, quantize="int8"))


def test_estimate_of_lora_setups_has_a_traced_peak():
    lora = estimate("tiny-llama", "adamw_torch", lora="r=8,target=all-linear", seq_len=64)
    full = estimate("tiny-llama", "adamw_torch", seq_len=64)
    assert lora.bytes["peak"] is not None and set(lora.phases) == set(full.phases)
    # frozen base: no gradients nor moments for it, so far less than the full fine-tune
    assert lora.bytes["peak"] < full.bytes["peak"] and lora.bytes["gradients"] < full.bytes["gradients"] / 10
    assert lora.cuda is not None and lora.cuda["peak_device"] > lora.bytes["peak"]
    qlora = estimate("tiny-llama", "adamw_torch", lora="r=8,target=all-linear", quantize="nf4", seq_len=64)
    assert qlora.bytes["peak"] < lora.bytes["peak"]  # a 4-bit base
    # on CUDA an LLM.int8 layer splits outlier columns by value: refused, with the reason, never a number
    int8 = estimate("tiny-llama", "adamw_torch", lora="r=8,target=all-linear", quantize="int8", seq_len=64)
    assert int8.bytes["peak"] is None and "llm_int8_threshold" in int8.notes[-1]
    assert int8.bytes["optimizer_state"] == qlora.bytes["optimizer_state"]
    assert estimate("tiny-llama", "adamw_torch", lora="r=8,target=all-linear", quantize="int8", seq_len=64,
                    device="cpu").bytes["peak"] is not None


def test_cuda_rule_books_the_dequantized_weight_of_a_4bit_matmul():
    """On CUDA bitsandbytes' gemm_4bit dequantizes the weight (and, double-quantized, the absmax) before its
    matmul; the CPU op is one opaque kernel: the CUDA trace books those transients, the CPU trace does not."""
    import torch

    from optimem.estimators.trace.cuda_rules import kernels_of
    from optimem.estimators.trace.tensor import Recorder, TraceMode, from_meta, set_recorder

    n, k, m = 96, 64, 10
    blocks = n * k // 64

    def meta(*shape, dtype=torch.float32):
        return from_meta(torch.empty(shape, dtype=dtype, device="meta"))

    def booked(dev: str) -> list[int]:
        args = (meta(m, k, dtype=torch.bfloat16), meta(n * k // 2, 1, dtype=torch.uint8), [n, k],
                meta(blocks // 256 + 1), 64, "nf4")
        kwargs = dict(absmax_8bit=meta(blocks, dtype=torch.uint8), absmax_code=meta(256), absmax_offset=meta())
        rec = Recorder()
        old = set_recorder(rec)
        rec.active = True
        try:
            with kernels_of(dev), TraceMode():
                out = torch.ops.bitsandbytes.gemm_4bit.default(*args, **kwargs)
        finally:
            set_recorder(old)
        assert tuple(out.shape) == (m, n) and out.dtype == torch.bfloat16
        return [e[2] for e in rec.events if e[0] == "a"]

    assert booked("cpu") == [m * n * 2]
    assert sorted(booked("cuda")) == sorted([blocks * 4, blocks * 4, n * k * 2, m * n * 2])


@pytest.mark.parametrize("extra", [["--lora", "r=32,target=all-linear"],
                                   ["--lora", "r=32,target=all-linear", "--quantize", "nf4"]])
@pytest.mark.slow
def test_bench_plan_lora_and_qlora_give_rows(capsys, extra):
    assert main(["plan", "--model", "tiny-llama", "--optim", "adamw_torch", "--gpus", "l4", "--max-seq",
                 *extra]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=32,target=all-linear" in out and "Longest sequence per GPU" in out and "512+" in out


def test_bench_plan_refuses_int8_on_cuda_in_one_line(capsys):
    assert main(["plan", "--model", "tiny-llama", "--optim", "adamw_torch", "--lora", "r=8",
                 "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LLM.int8" in err[0]


def test_longest_qlora_sequence_fits_and_one_more_token_does_not():
    setup = SM.plan_setup("tiny-llama", "adamw_torch", lora="r=16,target=all-linear", quantize="nf4",
                         gradient_checkpointing=True)
    budget = SM.step_memory(replace(setup, seq_len=300), 1).peak
    n = SM.max_seq_len(setup, 1, budget)
    assert 300 <= n < 512
    assert SM.fits(replace(setup, seq_len=n), 1, budget) and not SM.fits(replace(setup, seq_len=n + 1), 1, budget)
