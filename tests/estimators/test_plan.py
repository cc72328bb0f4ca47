"""bench plan, the parts that need no whole-step peak: the GPU catalog, sharding arithmetic against hand-computed
values, FLOPs/throughput, MFU calibration from records, the batch search, and failing loudly without the peak.

The tests that pin the planner to the real peak estimator are in tests/estimators/test_plan_peak.py."""
from __future__ import annotations

import json
import math
import sys

import pytest

from optimem.estimators import UserError, estimate
from optimem.estimators import planner as P
from optimem.estimators import gpus as G
from optimem.estimators import model_sizes as MS
from optimem.estimators import sharding as SH
from optimem.estimators import step_memory as SM
from optimem.estimators import throughput as TP

LLAMA3 = "meta-llama/Meta-Llama-3-8B"
P8 = 8_030_261_248  # Llama-3-8B parameters (all trainable)
EMBED8 = 128_256 * 4096  # its input embedding = its lm_head
REQUIRED = ("t4", "l4", "a10g", "rtx3090", "rtx4090", "rtx5090", "l40s", "a100-40gb", "a100-80gb", "h100-sxm",
            "h100-pcie", "h200", "b200", "mi300x")


# ---------------------------------------------------------------------------------------------- catalog
def test_catalog_has_the_gpus_with_sane_figures():
    cat = G.load_gpus()
    assert set(REQUIRED) <= set(cat)
    fields = {"memory_gb", "reported_gib", "context_gib", "tflops", "bandwidth_gbs"}
    for g in cat.values():
        assert 0 < g.usable_bytes < g.total_bytes <= g.memory_gb * 1e9 * 1.1, g.id
        assert g.budget() < g.usable_bytes
        assert g.tflops.get("fp16") and g.tflops.get("fp32") and g.bandwidth_gbs, g.id
        assert set(g.unsure) <= fields, g.id
        assert g.source
    assert cat["t4"].tflops["bf16"] is None  # Turing: no bf16
    assert cat["h100-sxm"].peak_flops("bf16") == 989e12 and cat["h100-pcie"].peak_flops("bf16") == 756e12
    assert cat["a100-40gb"].usable_bytes < cat["a100-80gb"].usable_bytes < cat["h200"].usable_bytes


def test_the_harness_reads_peak_flops_from_the_one_catalog():
    """Recorded MFU and planned tokens/s use the same catalog figures: the harness asks the catalog by device
    name (tf32 included, for fp32 matmuls with TF32 allowed)."""
    from optimem.estimators.gpus import device_peak_flops

    cat = G.load_gpus()
    names = {"a100-80gb": "NVIDIA A100-SXM4-80GB", "h100-sxm": "NVIDIA H100 80GB HBM3", "h100-pcie": "NVIDIA H100 PCIe",
             "h200": "NVIDIA H200", "l40s": "NVIDIA L40S", "l4": "NVIDIA L4", "a10g": "NVIDIA A10G", "t4": "Tesla T4",
             "h100-nvl": "NVIDIA H100 NVL", "v100": "Tesla V100-SXM2-16GB", "gh200": "NVIDIA GH200 480GB"}
    for gid, device in names.items():
        assert G.match_gpu(device, cat).id == gid
        for dt in ("bf16", "fp16", "tf32", "fp32"):
            assert device_peak_flops(device, dt) == cat[gid].peak_flops(dt), (gid, dt)
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.5e12
    assert device_peak_flops("Tesla T4", "tf32") is None and device_peak_flops("cpu", "bf16") is None


@pytest.mark.parametrize("device, gid", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"),
    ("Tesla T4", "t4"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA GeForce RTX 3090", "rtx3090"),
    ("AMD Instinct MI300X", "mi300x"), ("NVIDIA B200", "b200")])
def test_device_names_match_one_gpu(device, gid):
    assert G.match_gpu(device, G.load_gpus()).id == gid


def test_select_gpus_aliases_and_errors():
    cat = G.load_gpus()
    assert [g.id for g in G.select_gpus("h100,4090,A100-80GB", cat)] == ["h100-sxm", "rtx4090", "a100-80gb"]
    assert [g.id for g in G.select_gpus("NVIDIA L40S", cat)] == ["l40s"]
    assert len(G.select_gpus("all", cat)) == len(cat)
    with pytest.raises(UserError, match="not in the catalog"):
        G.select_gpus("k80", cat)


def test_user_gpu_file_adds_and_replaces(tmp_path):
    yml = tmp_path / "mine.yaml"
    yml.write_text("gpus:\n  - {id: v100-32gb, name: Tesla V100 32GB, memory_gb: 32, reported_gib: 31.7,\n"
                   "     tflops: {fp16: 125, fp32: 15.7}, bandwidth_gbs: 900, usd_per_hour: 0.9}\n"
                   "  - {id: h100-sxm, memory_gb: 80, tflops: {bf16: 989}, context_gib: 1.0}\n")
    cat = G.load_gpus([yml])
    assert cat["v100-32gb"].usable_bytes == int(31.7 * 2**30) - 2**29 and cat["v100-32gb"].usd_per_hour == 0.9
    assert cat["h100-sxm"].context_bytes == 2**30 and cat["h100-sxm"].reported_bytes is None
    assert "h100-sxm" in G.load_gpus() and G.load_gpus()["h100-sxm"].context_bytes == 2**29  # bundled untouched
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(UserError, match="malformed"):
        G.load_gpus([bad])


# ---------------------------------------------------------------------------------------------- sharding by hand
def test_model_facts_by_hand():
    f = MS.model_sizes(SM._inventory(LLAMA3, "fp32"))
    assert f.num_params == f.trainable_params == P8
    assert f.non_embedding_params == P8 - EMBED8  # lm_head is not an embedding: its matmul costs FLOPs
    assert f.largest_module_params == EMBED8  # ZeRO-3 gathers module by module
    assert f.largest_unit_params == EMBED8 + 4096  # accelerate's tail unit: lm_head + final norm
    assert f.no_decay_params == 65 * 4096  # 2 norms x 32 layers + the final norm
    block = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    l2 = MS.model_sizes(SM._inventory("meta-llama/Llama-2-7b-hf", "fp32"))
    assert l2.largest_unit_params == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096 > l2.largest_module_params == 32000 * 4096
    assert block < EMBED8


def _terms(optim: str, sharding: str, n: int = 8, **kw) -> dict[str, int]:
    return SM.model_state_terms(SM.plan_setup(model=LLAMA3, optim=optim, num_processes=n, sharding=sharding, **kw))


def test_sharded_adamw_matches_deepspeed_and_fsdp_by_hand():
    """Llama-3-8B, fp32 weights + bf16 autocast, AdamW, 8 GPUs. P = 8,030,261,248 (every dimension divides by
    8: no padding); per GPU, as the engines cut the parameter list (measured on CPU ranks in fp32:
    tests/harness/test_distributed.py):
    DDP: 4P weights + 4P grads + 8P state + 4P gradient buckets = 20P.
    ZeRO-1/2 (DeepSpeed bf16): 2P bf16 flat weights + 4P/8 fp32 master + 8P/8 state + the bf16 gradient
    partition (views of whole gradients: a parameter across a partition edge is held whole) + its 4P/8 fp32 copy
    in the step.
    ZeRO-3: 2P/8 bf16 partitions + the persistent small parameters whole + 4P/8 master + 2P/8 bf16 gradient
    partition + one fp32 sub-group (1e9 elements < P/8) in the step + 8P/8 state; gathered: up to
    stage3_max_live_parameters (1e9) bf16 parameters; a hidden² bucket.
    FSDP2: (4P + 4P + 8P)/8 + the largest unit (lm_head + final norm) gathered in bf16 (one copy; the
    phases count how many)."""
    n = 8
    ddp = _terms("adamw_torch", "ddp")
    assert ddp == {"weights": 4 * P8, "master_weights": 0, "gradients": 4 * P8, "grad_partition_fp32": 0,
                   "optimizer_state": 8 * P8, "gathered_working_set": 0, "ddp_buckets": 4 * P8, "grad_buckets": 0}
    biggest_layer_param = 4096 * 14336
    for stage in ("zero1", "zero2"):
        z = _terms("adamw_torch", stage)
        assert z["weights"] == 2 * P8 and z["master_weights"] == 4 * P8 // n == z["grad_partition_fp32"]
        assert z["optimizer_state"] == 8 * P8 // n
        assert 2 * P8 // n <= z["gradients"] <= 2 * (P8 // n + 2 * EMBED8)
    z3 = _terms("adamw_torch", "zero3")
    persistent = 65 * 4096  # the norms (< 10 x hidden elements)
    assert z3["weights"] == 2 * (P8 // n + persistent) and z3["master_weights"] == 4 * P8 // n
    assert z3["gradients"] == 2 * P8 // n and z3["grad_partition_fp32"] == 4 * SH.ZERO3_SUB_GROUP < 4 * P8 // n
    assert z3["gathered_working_set"] == 2 * SH.ZERO3_MAX_LIVE and z3["grad_buckets"] == 2 * 4096 ** 2
    assert _terms("adamw_torch", "zero3", 64)["grad_partition_fp32"] == 4 * math.ceil(P8 / 64)
    assert biggest_layer_param < EMBED8
    fsdp = _terms("adamw_torch", "fsdp")
    assert fsdp == {"weights": 4 * P8 // n, "master_weights": 0, "gradients": 4 * P8 // n, "grad_partition_fp32": 0,
                    "optimizer_state": 8 * P8 // n, "gathered_working_set": 2 * (EMBED8 + 4096), "ddp_buckets": 0,
                    "grad_buckets": 0}
    # One GPU: nothing sharded.
    assert _terms("adamw_torch", "none", 1) == {**ddp, "ddp_buckets": 0}


def test_sharding_uses_each_optimizers_own_state():
    n = 8
    assert not SH.sharding_support("adamw_bnb_8bit", "fsdp", n)[0]  # bitsandbytes cannot step FSDP2's DTensors
    single = estimate(LLAMA3, "adamw_torch_4bit").bytes["optimizer_state_device"]
    assert _terms("adamw_torch_4bit", "fsdp")["optimizer_state"] == pytest.approx(single / n, rel=1e-3)
    # ZeRO's flat fp32 partitions: blockwise 8-bit codes + one fp32 absmax per 256 elements, 2 states, plus
    # the optimizer's quantization maps; the Trainer's 32-bit embedding override is not needed to match.
    z = _terms("adamw_bnb_8bit", "zero2")["optimizer_state"]
    per = P8 // n
    assert 2 * per + 2 * 4 * (per // 256) <= z <= 2 * per + 2 * 4 * (per // 256) + 16 * 1024
    # Adafactor: factored on whole 2-D weights, but ZeRO hands it a 1-D partition: a full second moment.
    af1 = estimate(LLAMA3, "adafactor").bytes["optimizer_state_device"]
    assert af1 < P8 * 0.01
    assert _terms("adafactor", "zero1")["optimizer_state"] == 4 * (P8 // n) + 2 * 4  # exp_avg_sq + RMS per group
    assert not SH.sharding_support("adafactor", "fsdp", n)[0]  # transformers' Adafactor cannot step DTensors
    # Host-resident state is not GPU memory.
    assert _terms("grokadamw", "zero2")["optimizer_state"] == 0
    assert _terms("grokadamw", "ddp")["optimizer_state"] == 0
    # Pure fp32 training under ZeRO: DeepSpeed still keeps an fp32 master partition (a copy), fp32 grads.
    z2 = _terms("adamw_torch", "zero2", mixed_precision=None)
    assert z2["weights"] == 4 * P8 and z2["master_weights"] == 4 * P8 // n and z2["gradients"] >= 4 * P8 // n


def test_what_cannot_run_sharded():
    ok, why = SH.sharding_support("galore_adamw_layerwise", "ddp", 2)
    assert not ok and "does not support DDP" in why
    assert not SH.sharding_support("apollo_adamw_layerwise", "fsdp", 4)[0]
    for sh in ("ddp", "zero1", "zero2", "fsdp"):
        assert not SH.sharding_support("lomo", sh, 2)[0]
    assert SH.sharding_support("lomo", "zero3", 2)[0] and SH.sharding_support("adalomo", "zero3", 2)[0]
    assert not SH.sharding_support("galore_adamw", "zero2", 2)[0]
    assert SH.sharding_support("galore_adamw", "fsdp", 2)[0]
    assert SH.sharding_support("adamw_torch", "none", 1)[0] and not SH.sharding_support("adamw_torch", "none", 2)[0]
    with pytest.raises(UserError):
        SH.sharding_support("adamw_torch", "tp", 2)


# ---------------------------------------------------------------------------------------------- throughput
def test_flops_and_tokens_per_second():
    f = MS.model_sizes(SM._inventory(LLAMA3, "fp32"))
    fpt = f.flops_per_token(2048)
    assert fpt == 6 * (P8 - EMBED8) + 12 * 32 * 4096 * 2048 == TP.flops_per_token(P8 - EMBED8, 32, 4096, 2048)
    h100 = G.load_gpus()["h100-sxm"]
    s = SM.plan_setup(model=LLAMA3, optim="adamw_torch")
    tp = TP.throughput(fpt, h100, s)
    assert tp.tokens_per_s == pytest.approx(0.4 * 989e12 / fpt) and tp.mfu_source == "assumed"
    ck = TP.throughput(fpt, h100, SM.plan_setup(model=LLAMA3, optim="adamw_torch", gradient_checkpointing=True))
    assert ck.tokens_per_s == pytest.approx(tp.tokens_per_s * 3 / 4)
    assert TP.throughput(fpt, G.load_gpus()["t4"], s).tokens_per_s is None  # no bf16 on a T4


def _record(device_name, mfu, *, ckpt=False, status="ok", device="cuda", model=LLAMA3, mp="bf16", peak=989e12):
    return {"status": status, "config": {"model": model, "dtype": "fp32", "mixed_precision": mp,
                                         "gradient_checkpointing": ckpt},
            "env": {"device_name": device_name},
            "measured": {"device": device, "throughput": {"mfu": mfu, "peak_flops": peak, "tokens_per_s": 1.0}}}


def test_mfu_calibration_from_records():
    lines = [_record("NVIDIA H100 80GB HBM3", 0.5), _record("NVIDIA H100 80GB HBM3", 0.3, ckpt=True),
             _record("NVIDIA H100 80GB HBM3", 0.9, status="oom"), _record("cpu", 0.9, device="cpu"),
             _record("NVIDIA A100-SXM4-80GB", 0.2, model="Meta-Llama-3-8B", peak=312e12),
             _record("NVIDIA H100 80GB HBM3", 0.1, mp="fp16")]
    cal = TP.calibrate(lines + ["not a record"], G.load_gpus())
    h = cal[("h100-sxm", LLAMA3, "bf16")]
    assert h.runs == 2 and h.mfu == pytest.approx((0.5 + 0.3 * 4 / 3) / 2)
    assert cal[("a100-80gb", LLAMA3, "bf16")].mfu == pytest.approx(0.2)  # model name resolved through the catalog
    assert cal[("h100-sxm", LLAMA3, "fp16")].mfu == pytest.approx(0.1)
    assert len(cal) == 3
    # A record computed against another peak figure is rescaled to the catalog's.
    assert TP.calibrate([_record("NVIDIA H100 80GB HBM3", 0.5, peak=1000e12)], G.load_gpus())[("h100-sxm", LLAMA3, "bf16")].mfu == pytest.approx(0.5 * 1000 / 989)


# ---------------------------------------------------------------------------------------------- search and the peak contract
def test_max_micro_batch_search_is_exact(monkeypatch):
    """The search itself, on a synthetic monotone peak (the real estimator: tests/estimators/test_plan_peak.py)."""
    def fake(setup, batch):
        return SM.StepMemory(batch, 1000 + 37 * batch + (batch // 5) * 11, {}, 0, 0, 0)

    monkeypatch.setattr(SM, "step_memory", fake)
    s = SM.plan_setup(model="tiny-llama", optim="sgd")
    for budget in (1000, 1036, 1037, 1500, 5000, 37_000):
        b = SM.max_micro_batch(s, budget)
        assert b == 0 or fake(s, b).peak <= budget
        assert fake(s, b + 1).peak > budget
    assert SM.max_micro_batch(s, 10**12) == SM.MAX_BATCH


def test_cli_rejects_bad_input(capsys):
    from optimem.harness.cli import main

    for argv, msg in ((["--gpus", "k80"], "not in the catalog"), (["--num-gpus", "0"], "at least 1"),
                      (["--headroom", "1.5"], "headroom"), (["--optim", "adamw_hf"], "removed"),
                      (["--num-gpus", "4", "--sharding", "none"], "need a sharding")):
        assert main(["plan", "--model", "tiny-llama", *argv]) == 2, argv
        assert msg in capsys.readouterr().err
