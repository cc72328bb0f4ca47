"""Multi-process runs: torchrun + the Trainer's DDP / FSDP2 / DeepSpeed ZeRO on 2 CPU ranks (gloo), each rank
measured by the tensor accountant, held to the planner's per-rank prediction; failures of one rank are one
recorded status; the planner's ZeRO figures against DeepSpeed's own estimator.

The launches take ~15-25 s each on a 2-core machine (two Python processes importing transformers): the
default run has one per engine family (DDP, FSDP2, ZeRO-3) and one failure; more of the matrix and the hang
case run with ``OPTIMEM_DISTRIBUTED_MATRIX=1`` (the committed results file,
``results/cpu-amd-epyc-2026-12-02-distributed.jsonl``, holds all of it).
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest

from optimem.estimators import model_sizes as MS
from optimem.estimators import sharding as SH
from optimem.estimators import step_memory as SM
from optimem.harness.distributed import launch as DL
from optimem.harness.distributed import report as DR
from optimem.harness.distributed import schemes as DS
from optimem.harness.launcher import execute
from optimem.harness.record import validate
from optimem.harness.run_config import RunConfig

pytestmark = pytest.mark.slow  # real Trainer runs or processes throughout: the inner loop (-m 'not slow') skips this file

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install deepspeed)")
MATRIX_ENV = "OPTIMEM_DISTRIBUTED_MATRIX"
full_matrix = pytest.mark.skipif(not os.environ.get(MATRIX_ENV), reason=(
    f"more 2-rank launches (~20 s each): set {MATRIX_ENV}=1; the default run checks each engine family once and "
    "results/cpu-amd-epyc-2026-12-02-distributed.jsonl holds the whole matrix"))


def _cfg(optim="adamw_torch", model="tiny-llama", sharding="ddp", **kw) -> RunConfig:
    targets = "all-linear" if optim.startswith(("galore", "apollo")) else None
    return RunConfig(model=model, optim=optim, optim_target_modules=targets, device="cpu", num_processes=2,
                     sharding=sharding, steps=3, warmup=1, **kw)


def _check_ranks(record: dict) -> list[dict]:
    validate(record)
    assert record["status"] == "ok", record["reason"]
    d = record["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and len(d["ranks"]) == 2
    rows = DR.rank_rows(record)
    for r in rows:
        assert r["status"] == "ok"
        assert abs(r["optimizer_state_error"]) <= DR.STATE_TOLERANCE, r
        assert abs(r["gradients_error"]) <= DR.STATE_TOLERANCE, r
        assert abs(r["peak_error"]) <= DR.PEAK_TOLERANCE, r
    # the top-level measurement is the rank with the highest peak
    assert record["measured"]["peak_bytes"] == max(r["peak"] for r in rows)
    return rows


# ------------------------------------------------------------------------------------------ real launches
def test_ddp_two_cpu_ranks_match_the_per_rank_prediction():
    rec = execute(_cfg("adamw_torch", "tiny-llama", "ddp"), timeout_s=300)
    rows = _check_ranks(rec)
    # DDP replicates: each rank holds the whole AdamW state (2 x 4 B/param) and whole fp32 gradients
    inv = SM._inventory("tiny-llama", "fp32")
    assert rows[0]["gradients"] == 4 * inv.trainable_params
    assert rec["distributed"]["predicted"]["terms"]["ddp_buckets"] == 4 * inv.trainable_params


def test_fsdp2_two_cpu_ranks_shard_state_and_gradients():
    rec = execute(_cfg("adamw_torch", "tiny-gpt2", "fsdp"), timeout_s=300)
    rows = _check_ranks(rec)
    args = rec["distributed"]["training_arguments"]
    assert args["fsdp"] == "full_shard auto_wrap" and args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["GPT2Block"]
    inv = SM._inventory("tiny-gpt2", "fp32")
    assert rows[0]["gradients"] == 4 * inv.trainable_params // 2  # dim-0 shards of every parameter


@needs_deepspeed
def test_deepspeed_zero3_two_cpu_ranks():
    rec = execute(_cfg("adafactor", "tiny-llama", "zero3"), timeout_s=300)
    rows = _check_ranks(rec)
    assert rec["distributed"]["training_arguments"]["deepspeed"]["zero_optimization"]["stage"] == 3
    ms = rec["distributed"]["ranks"][0]["measured"]["model_states"]
    assert ms["master_weights"] > 0 and ms["gradient_buckets"] == 4 * 64 * 64  # hidden² fp32 reduce bucket
    assert rows[0]["weights"] == rows[0]["weights_predicted"]


def test_a_failing_rank_fails_the_whole_run_without_hanging():
    """Rank 1 raises in its first backward; rank 0 waits in a collective: torchrun tears it down, and the
    record is one ``error`` naming rank 1, written whole."""
    rec = execute(_cfg("adamw_torch", "tiny-llama", "ddp"), timeout_s=120, fault="1:error@step0.backward")
    validate(rec)
    assert rec["status"] == "error" and rec["reason"].startswith("rank 1: RuntimeError in step0.backward")
    assert rec["run"]["duration_s"] < 110  # torched down, not timed out
    statuses = {e["rank"]: e["status"] for e in rec["distributed"]["ranks"]}
    assert statuses[1] == "error"


@pytest.mark.slow
@full_matrix
@pytest.mark.parametrize("optim, model, sharding", [
    ("adafactor", "tiny-gpt2", "ddp"), ("galore_adamw", "tiny-llama", "ddp"),
    ("adamw_torch", "tiny-llama", "fsdp"), ("galore_adamw", "tiny-gpt2", "fsdp"),
    pytest.param("adamw_bnb_8bit", "tiny-llama", "zero1", marks=needs_deepspeed),
    pytest.param("adamw_torch", "tiny-gpt2", "zero2", marks=needs_deepspeed),
    pytest.param("adamw_bnb_8bit", "tiny-gpt2", "zero3", marks=needs_deepspeed),
])
def test_more_schemes_match_the_per_rank_prediction(optim, model, sharding):
    _check_ranks(execute(_cfg(optim, model, sharding), timeout_s=300))


@pytest.mark.slow
@full_matrix
def test_a_hanging_rank_is_a_timeout_not_a_hung_caller():
    rec = execute(_cfg("adamw_torch", "tiny-llama", "ddp"), timeout_s=40, fault="0:hang@step0.forward")
    validate(rec)
    assert rec["status"] == "error" and "timed out after 40 s" in rec["reason"]


def test_unsupported_combinations_are_skipped_runs_with_the_reason():
    rec = execute(_cfg("galore_adamw", "tiny-llama", "zero2"), timeout_s=60)
    assert rec["status"] == "skipped" and "1-D partitions" in rec["reason"]
    rec = execute(_cfg("lomo", "tiny-llama", "ddp"), timeout_s=60)
    assert rec["status"] == "skipped" and "not data-parallel" in rec["reason"]
    rec = execute(_cfg("adamw_bnb_8bit", "tiny-llama", "fsdp"), timeout_s=60)  # measured: NotImplementedError
    assert rec["status"] == "skipped" and "DTensor" in rec["reason"]


# --------------------------------------------------------------------------------------- pure functions
def test_combine_maps_rank_outcomes_to_one_status():
    ok = {"status": "ok", "reason": "", "measured": {"peak_bytes": 10}, "device_facts": {}}
    big = {**ok, "measured": {"peak_bytes": 20}}
    got = DL.combine([ok, big], returncode=0, timed_out=False, timeout_s=9)
    assert got["status"] == "ok" and got["measured"]["peak_bytes"] == 20 and got["distributed"]["measured_rank"] == 1
    oom = {"status": "oom", "reason": "out of memory in step0.forward: x", "measured": {"peak_bytes": 5}}
    got = DL.combine([ok, oom], returncode=1, timed_out=False, timeout_s=9)
    assert got["status"] == "oom" and got["reason"].startswith("rank 1: out of memory")
    got = DL.combine([ok, None], returncode=-9, timed_out=False, timeout_s=9, log_tail="Killed")
    assert got["status"] == "oom" and "died without a result" in got["reason"]
    got = DL.combine([None, None], returncode=None, timed_out=True, timeout_s=9)
    assert got["status"] == "error" and got["reason"].startswith("timed out after 9 s")
    assert DL.rank_faults("1:crash@step0.forward", 2) == {"1": "crash@step0.forward"}
    assert DL.rank_faults("oom@setup", 2) == {"0": "oom@setup", "1": "oom@setup"}


def test_generated_trainer_arguments():
    z = DS.training_arguments(_cfg(sharding="zero2", batch_size=3, grad_accum=2), DS.model_class(_cfg()), 77)
    ds = z["deepspeed"]
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": "auto"}
    assert ds["train_batch_size"] == 3 * 2 * 2 and ds["zero_allow_untested_optimizer"] and z["ddp_timeout"] == 77
    f = DS.training_arguments(_cfg(sharding="fsdp"), DS.model_class(_cfg()))
    assert f["fsdp_config"] == {"version": 2, "reshard_after_forward": True,
                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert DS.training_arguments(_cfg(sharding="ddp"), None) == {}


def test_zero_partition_edges_keep_whole_gradients():
    """DeepSpeed ZeRO-1/2 cut each padded flat group into N partitions of views of the parameters' gradients:
    a parameter across an edge keeps its whole gradient alive on both ranks. tiny-gpt2 on 2 ranks, measured
    (fp32): rank 0 holds 439,808 B of gradient storage, rank 1 396,800 B; an even split would be 393,728 B."""
    inv = SM._inventory("tiny-gpt2", "fp32")
    lay = SH.shard_layout(inv, MS.model_sizes(inv), "zero2", 2)
    assert [4 * g for g in lay.grad_storage] == [439_808, 396_800]
    assert 4 * lay.local_trainable == 4 * inv.trainable_params // 2
    z3 = SH.shard_layout(inv, MS.model_sizes(inv), "zero3", 2)
    assert z3.persistent == sum(r.numel for r in inv.rows if r.numel < 10 * 64)  # norms, small biases: whole


def test_fsdp2_state_of_galore_follows_dtensor_placements():
    """GaLore under FSDP2 (measured, tiny-llama on 2 ranks: 1,189,120 B per rank, where an even split of the
    single-process 1,942,016 B would be 971,008 B): the SVD's projector comes out replicated, the moments of a
    gradient projected from the right keep its dim-0 shard, those projected from the left are replicated."""
    from dataclasses import replace

    s = replace(_cfg("galore_adamw", "tiny-llama", "fsdp").setup(), device="cpu")
    assert SH._fsdp_state(s, SM._inventory("tiny-llama", "fp32"), 2) == 1_189_120
    ok, why = SH.sharding_support("adafactor", "fsdp", 2)
    assert not ok and "mixed torch.Tensor and DTensor" in why
    assert not SH.sharding_support("adamw_bnb_8bit", "fsdp", 2)[0]


# ------------------------------------------------------------------------------------ DeepSpeed's estimator
@needs_deepspeed
def test_zero_model_states_against_deepspeeds_estimator(n=8):
    """Llama-3-8B, bf16 mixed precision, AdamW. ZeRO-2: DeepSpeed estimates 2P + 18P/N; ours adds the
    partition-edge gradients and padding (< 0.1% here). ZeRO-3: DeepSpeed estimates 18P/N + 4 x the largest
    layer; ours holds the live gathered parameters instead (with DeepSpeed's defaults, up to
    ``stage3_max_live_parameters`` = 1e9 elements in bf16: 2 GB, which DeepSpeed's estimator does not count),
    the persistent small parameters and the reduction bucket, and one fp32 gradient sub-group in the step."""
    # the functions estimate_zero{2,3}_model_states_mem_needs_all_cold print a table of (one setting each)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = "meta-llama/Meta-Llama-3-8B"
    inv = SM._inventory(model, "fp32")
    p = inv.num_params
    facts = MS.model_sizes(inv)
    setup = SM.plan_setup(model=model, optim="adamw_torch", num_processes=n, sharding="zero2")
    _, ds2 = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=False,
                                                   additional_buffer_factor=1.0)
    from dataclasses import replace

    t2 = SM.model_state_terms(replace(setup, sharding="zero2"))
    ours2 = (t2["weights"] + t2["master_weights"] + t2["gradients"] + t2["grad_partition_fp32"]
             + t2["optimizer_state"])
    assert ds2 == 2 * p + int(18 * p / n)
    assert ds2 <= ours2 <= ds2 * 1.01  # + the gradients of parameters across partition edges (0.5% here)
    _, ds3, largest = estimate_zero3_model_states_mem_needs(
        p, facts.largest_module_params, num_gpus_per_node=n, cpu_offload=False, cpu_offload_params=False,
        additional_buffer_factor=1.0)
    t3 = SM.model_state_terms(replace(setup, sharding="zero3"))
    sharded = t3["weights"] + t3["master_weights"] + t3["gradients"] + t3["optimizer_state"]
    assert sharded == pytest.approx(16 * p / n, rel=2e-3)  # DeepSpeed: 18P/N (a whole fp32 gradient partition)
    assert t3["gathered_working_set"] == 2 * min(p, SH.ZERO3_MAX_LIVE)
    # DeepSpeed's working set is 4 B x the largest layer (here the 525M-element embedding: 2.1 GB); ours is
    # the live gathered parameters (2 GB here; the whole model below 1e9 parameters, as measured on CPU)
    assert math.isclose(largest, 4 * facts.largest_module_params)
