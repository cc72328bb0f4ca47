"""bench plan pinned to the real whole-step peak estimator: the reported micro-batch fits and one more does not,
known capacity facts hold, sharding lowers the per-GPU peak as its terms say, and the CLI prints an actionable
table."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from optimem.estimators import planner as P

from optimem.estimators import gpus as G

from optimem.estimators import sharding as SH

from optimem.estimators import step_memory as SM

from optimem.estimators import throughput as TP

LLAMA3 = "meta-llama/Meta-Llama-3-8B"
GPUS = G.load_gpus()


def _setup(optim: str, **kw):
    return SM.plan_setup(kw.pop("model", LLAMA3), optim, **kw)


def _max(optim: str, gpu: str, **kw) -> int:
    return SM.max_micro_batch(_setup(optim, **kw), GPUS[gpu].budget())


@pytest.mark.parametrize("optim, gpu, kw", [
    ("adamw_torch_fused", "h200", {"gradient_checkpointing": True}),
    ("adamw_bnb_8bit", "h100-sxm", {"dtype": "bf16", "gradient_checkpointing": True}),
    ("adafactor", "a100-80gb", {"mixed_precision": "bf16"}),  # fp32 GQA attention runs SDPA's math kernel on CUDA
    ("adamw_torch_fused", "l4", {"model": "Qwen/Qwen2.5-0.5B", "seq_len": 1024}),
    ("adamw_torch", "h100-sxm", {"num_processes": 8, "sharding": "fsdp"}),
    ("adamw_torch_fused", "a100-40gb", {"num_processes": 4, "sharding": "zero3", "gradient_checkpointing": True}),
    ("lion_8bit", "rtx4090", {"model": "gpt2", "seq_len": 1024, "mixed_precision": "fp16", "num_processes": 2,
                              "sharding": "zero2"}),  # GPT-2 has 1024 learned positions
])
@pytest.mark.slow
def test_reported_batch_fits_and_one_more_does_not(optim, gpu, kw):
    from optimem.estimators import device_fit as DF

    s, g = _setup(optim, **kw), GPUS[gpu]
    row = P.plan_one(s, g, checkpointing="on" if s.gradient_checkpointing else "off")
    b = row.max_micro_batch
    assert row.status == "fits" and 1 <= b < SM.MAX_BATCH, (optim, gpu, b)
    assert row.peak == SM.step_memory(s, b).peak
    if s.sharding == "none":  # one GPU: the caching allocator's replay runs within usable memory, one more does not
        reserved = DF.reserved_on(s, b, g.usable_bytes)
        assert row.reserved == reserved <= g.usable_bytes and DF.reserved_on(s, b + 1, g.usable_bytes) is None
        assert row.device_total == reserved + g.context_bytes and row.budget == g.usable_bytes
        assert SM.step_memory(s, b).peak < reserved  # the tensor peak alone would allow at least as much
        assert b <= SM.max_micro_batch(s, g.usable_bytes)
    else:  # sharded: the per-GPU tensor peak within the headroom budget
        budget = g.budget()
        assert b == SM.max_micro_batch(s, budget) and row.reserved is None
        assert SM.step_memory(s, b).peak <= budget < SM.step_memory(s, b + 1).peak


def test_peak_is_the_estimators_and_splits_into_its_parts():
    for optim in ("adamw_torch", "adamw_bnb_8bit", "lomo"):
        s = _setup(optim, gradient_checkpointing=True)
        m1, m2 = SM.step_memory(s, 1), SM.step_memory(s, 2)
        est = SM._estimate(s, 1)
        assert m1.peak == m1.single_gpu_peak == est.bytes["peak"] and m1.peak_phase == est.peak_phase
        assert sum(m1.breakdown.values()) == m1.peak and m2.peak > m1.peak
        assert m1.breakdown["weights"] == est.bytes["weights"] + est.phases[est.peak_phase]["weights"] - est.bytes["weights"]


def test_full_adamw_8b_does_not_fit_a_24gb_gpu():
    """Full AdamW fine-tune of an 8B model in bf16 mixed precision (16 B/param = 120 GiB of model states)."""
    for optim in ("adamw_torch", "adamw_torch_fused"):
        for gpu in ("rtx4090", "rtx3090", "l4", "a10g"):
            for ckpt in (False, True):
                assert _max(optim, gpu, gradient_checkpointing=ckpt) == 0
            row = P.plan_one(_setup(optim), GPUS[gpu])
            assert row.status == "no_fit" and row.gradient_checkpointing is True and "needs" in row.reason
    # Not even in pure bf16 (8 B/param for weights, gradients and AdamW state).
    assert _max("adamw_torch_fused", "rtx4090", dtype="bf16", gradient_checkpointing=True) == 0


@pytest.mark.parametrize("gpu, kw, lean", [
    ("h200", {}, ("adamw_bnb_8bit", "adafactor", "adamw_torch_4bit")),
    ("h100-sxm", {"dtype": "bf16"}, ("adamw_bnb_8bit", "adafactor", "galore_adamw_8bit")),
    ("a100-80gb", {"dtype": "bf16"}, ("adamw_bnb_8bit", "adafactor")),
    ("h100-sxm", {}, ("adafactor", "adamw_torch_4bit")),  # fp32 weights: AdamW fits no micro-batch at all
    ("l40s", {"dtype": "bf16"}, ("adafactor", "galore_adamw_8bit")),
])
@pytest.mark.slow
def test_8bit_and_factored_optimizers_fit_more_than_adamw(gpu, kw, lean):
    adamw = _max("adamw_torch_fused", gpu, gradient_checkpointing=True, **kw)
    for optim in lean:
        got = _max(optim, gpu, gradient_checkpointing=True, **kw)
        assert got > adamw, (gpu, kw, optim, got, adamw)
        assert got > _max(optim, gpu, **kw)  # and checkpointing fits more than none


def test_sharding_lowers_the_per_gpu_peak_by_its_terms():
    base = _setup("adamw_torch", gradient_checkpointing=True)
    one = SM.step_memory(base, 1)
    for sh in ("zero1", "zero2", "zero3", "fsdp"):
        prev = None
        for n in (2, 4, 8, 16):
            s = replace(base, sharding=sh, num_processes=n)
            m = SM.step_memory(s, 1)
            assert m.terms == SM.model_state_terms(s)
            assert sum(m.breakdown.values()) == m.peak
            assert m.peak < one.peak and (prev is None or m.peak < prev), (sh, n)
            prev = m.peak
            if m.peak_phase.startswith("steady"):  # the state is whole there: exactly the sharded term
                assert m.breakdown["optimizer_state"] == m.terms["optimizer_state"]
            if not m.peak_phase.endswith("optimizer_step"):  # ZeRO-3's bucket + the gathered copies of the phase
                copies = SH._gathered_copies(sh, m.peak_phase, 1 if m.breakdown["gradients"] else 0)
                assert m.breakdown["sharding_overhead"] == (m.terms["grad_buckets"]
                                                            + copies * m.terms["gathered_working_set"])
    ddp = SM.step_memory(replace(base, sharding="ddp", num_processes=8), 1)
    assert ddp.peak == one.peak + ddp.terms["ddp_buckets"]  # DDP replicates everything and adds buckets
    # ZeRO-3 / FSDP on 8 x 80 GB fit full AdamW where one GPU cannot.
    assert _max("adamw_torch", "h100-sxm") == 0
    assert _max("adamw_torch", "h100-sxm", num_processes=8, sharding="zero3") >= 1
    assert _max("adamw_torch", "h100-sxm", num_processes=8, sharding="fsdp") >= 1


def test_layerwise_and_lomo_report_what_cannot_run():
    rows = {o: P.plan_one(_setup(o, num_processes=4, sharding="ddp"), GPUS["h100-sxm"])
            for o in ("galore_adamw_layerwise", "lomo", "adamw_torch")}
    assert rows["galore_adamw_layerwise"].status == "unsupported" and "DDP" in rows["galore_adamw_layerwise"].reason
    assert rows["lomo"].status == "unsupported"
    assert rows["adamw_torch"].status in ("fits", "no_fit")
    z3 = P.plan_one(_setup("lomo", num_processes=4, sharding="zero3"), GPUS["h100-sxm"])
    assert z3.status == "fits" and any("ZeRO-3" in n for n in z3.notes)


def test_measured_mfu_replaces_the_assumed_one(tmp_path):
    rec = {"status": "ok", "config": {"model": LLAMA3, "dtype": "fp32", "mixed_precision": "bf16",
                                      "gradient_checkpointing": False},
           "env": {"device_name": "NVIDIA H200"},
           "measured": {"device": "cuda", "throughput": {"mfu": 0.55, "peak_flops": 989e12}}}
    cal = TP.calibrate([rec], GPUS)
    s = _setup("adafactor")
    got = P.plan_one(s, GPUS["h200"], calibration=cal)
    assumed = P.plan_one(s, GPUS["h100-sxm"], calibration=cal)
    assert got.mfu == pytest.approx(0.55) and got.mfu_source.startswith("measured")
    assert assumed.mfu == TP.DEFAULT_MFU and assumed.mfu_source == "assumed"


@pytest.mark.slow


def test_cli_plan_llama3_all_gpus(capsys, tmp_path, monkeypatch):
    from optimem.harness.cli import main

    monkeypatch.chdir(tmp_path)  # the default MFU calibration reads ./results/*.jsonl: none here, whatever a user ran
    assert main(["plan", "--model", LLAMA3, "--gpus", "all", "--plot", str(tmp_path / "plan.png")]) == 0
    out = capsys.readouterr().out
    for g in GPUS:
        assert g in out
    for o in P.DEFAULT_OPTIMS:
        assert o in out
    assert "cheapest fit:" in out and "on rtx4090: nothing planned fits one GPU; fewest:" in out
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert main(["plan", "--model", LLAMA3, "--gpus", "rtx4090,h100", "--optim", "adamw_torch,galore_adamw_layerwise",
                 "--num-gpus", "8", "--sharding", "fsdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["optim"], r["gpu"]): r for r in data["rows"]}
    assert rows[("galore_adamw_layerwise", "h100-sxm")]["status"] == "unsupported"
    r = rows[("adamw_torch", "h100-sxm")]
    assert r["status"] == "fits" and r["num_gpus"] == 8 and r["tokens_per_s"] == pytest.approx(8 * r["tokens_per_s_per_gpu"])
    # the backward peak comes before any gradient: one gathered copy of the largest unit, in bf16
    assert r["breakdown"]["sharding_overhead"] == 2 * (128_256 * 4096 + 4096)


def test_fewest_gpus_is_exact():
    bnb = _setup("adamw_bnb_8bit", gradient_checkpointing=True)
    for s, gpu, sh in ((_setup("adamw_torch", gradient_checkpointing=True), "rtx4090", "fsdp"), (bnb, "l4", "zero3"),
                       (bnb, "a100-40gb", "zero2")):
        n = P.min_gpus_to_fit(s, GPUS[gpu], sharding=sh)
        budget = GPUS[gpu].budget()
        assert n is not None and n >= 2
        assert SM.fits(replace(s, sharding=sh, num_processes=n), 1, budget)
        assert n == 2 or not SM.fits(replace(s, sharding=sh, num_processes=n - 1), 1, budget)
    assert P.min_gpus_to_fit(_setup("lomo"), GPUS["l4"], sharding="fsdp") is None  # cannot run so
    assert P.min_gpus_to_fit(bnb, GPUS["l4"], sharding="fsdp") is None  # bitsandbytes cannot step DTensors
