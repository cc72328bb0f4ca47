"""CPU/NVMe offload (issue 23): the DeepSpeed config read as the Trainer reads it, and the per-rank device / host /
NVMe bytes set beside DeepSpeed's own model-state estimators (every difference is named in
``optimem.harness.offload_check``)."""
from __future__ import annotations

import json

import pytest

from optimem.estimators import estimate
from optimem.estimators.errors import UserError
from optimem.estimators.inventory import build_inventory
from optimem.estimators.offload import largest_module_params, split
from optimem.estimators.offload_config import (OFFLOAD_OPTIMIZER_DEFAULTS, OFFLOAD_PARAM_DEFAULTS, ZERO_DEFAULTS,
                                               read_deepspeed)
from optimem.estimators.setup import TrainingSetup

ADAMW = {"optimizer": {"type": "AdamW"}, "bf16": {"enabled": "auto"}}
Z3_OFFLOAD = {**ADAMW, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                             "offload_param": {"device": "cpu", "pin_memory": True},
                                             "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                             "stage3_param_persistence_threshold": "auto"}}


def _setup(config: dict, n: int = 8, nodes: int = 1, model: str = "tiny-llama", **kw) -> TrainingSetup:
    return TrainingSetup(model=model, mixed_precision="bf16", num_processes=n, num_nodes=nodes,
                         deepspeed=json.dumps(config), **kw)


def test_defaults_are_deepspeeds():
    """The bucket and offload defaults optimem assumes are the installed DeepSpeed's."""
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    z = config.DeepSpeedZeroConfig(stage=3, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    assert (z.reduce_bucket_size, z.allgather_bucket_size, z.prefetch_bucket_size, z.param_persistence_threshold,
            z.max_live_parameters, z.sub_group_size) == tuple(ZERO_DEFAULTS[k] for k in (
                "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold", "stage3_max_live_parameters", "sub_group_size"))
    assert (z.offload_optimizer.buffer_count, z.offload_optimizer.pin_memory) == tuple(OFFLOAD_OPTIMIZER_DEFAULTS.values())
    p = z.offload_param
    assert (p.buffer_count, p.buffer_size, p.max_in_cpu, p.pin_memory) == tuple(OFFLOAD_PARAM_DEFAULTS.values())


def test_auto_resolved_as_the_trainer_does():
    s = _setup(Z3_OFFLOAD)
    assert (s.sharding, s.offload_optimizer, s.offload_param) == ("zero3", "cpu", "cpu")
    ds = read_deepspeed(json.dumps(Z3_OFFLOAD))
    h = 64  # tiny-llama's hidden_size
    assert ds.bucket("reduce_bucket_size", h) == h * h
    assert ds.bucket("stage3_prefetch_bucket_size", h) == int(0.9 * h * h)
    assert ds.bucket("stage3_param_persistence_threshold", h) == 10 * h
    assert read_deepspeed('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8}}').bucket(
        "reduce_bucket_size") == 200_000_000
    with pytest.raises(UserError, match="the Trainer refuses the mismatch"):
        TrainingSetup(deepspeed='{"train_micro_batch_size_per_gpu": 4}', batch_size=2)


@pytest.mark.parametrize("n,nodes", [(8, 1), (8, 2), (4, 1)])
def test_zero3_offload_matches_deepspeeds_estimator(n, nodes):
    """Host RAM per node: DeepSpeed's 18 B/param (zero_init) times its 1.5 allowance; GPU: DeepSpeed's 4 B x the
    largest layer against the gathered module, prefetch bucket, persistent parameters and reduce bucket."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    s = _setup(Z3_OFFLOAD, n, nodes, model="SmolLM2-135M")
    inv = build_inventory(s.source).with_dtype(s.dtype)
    parts = split(s, inv, 0)
    largest = largest_module_params(inv)
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(inv.num_params, largest, n // nodes, nodes)
    assert cpu / parts.host_per_node == pytest.approx(1.5, rel=1e-4)
    big = sum(r.numel for r in inv.rows if r.numel >= 10 * 576)  # below 1e9 live elements: all stay gathered
    assert parts.device["gathered_params"] == 2 * big  # 16-bit; DeepSpeed counts 2 B + 2 B of the largest layer
    assert gpu == 4 * largest
    assert not parts.nvme and "optimizer_state" in parts.host and "optimizer_state" not in parts.device


def test_zero2_offload_matches_deepspeeds_estimator():
    """ZeRO-2 offload: the 16-bit parameters stay whole on each GPU (DeepSpeed's 2 B/param exactly); the host
    holds the fp32 master, gradient and Adam partitions (16 B/param per node when one node holds every rank)."""
    s12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    cfg = {**ADAMW, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    s = _setup(cfg, 4, model="SmolLM2-135M")
    inv = build_inventory(s.source).with_dtype(s.dtype)
    parts = split(s, inv, 0)
    _, gpu = s12.estimate_zero2_model_states_mem_needs(inv.num_params, 4, 1, cpu_offload=True)
    assert parts.device["params_16bit"] == gpu
    states = parts.host["master_weights"] + parts.host["grad_partition_fp32"] + parts.host["optimizer_state"]
    assert states * 4 == pytest.approx(16 * inv.num_params, rel=1e-4)


def test_nvme_and_fsdp_offload():
    nvme = {**ADAMW, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"},
                                           "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}}
    s = _setup(nvme, 2)
    inv = build_inventory(s.source).with_dtype(s.dtype)
    parts = split(s, inv, 0)
    assert set(parts.nvme) == {"param_partition", "master_weights", "optimizer_state"}
    assert parts.host["param_swap_buffers"] == 5 * 100_000_000 * 2  # buffer_count x buffer_size, 16-bit
    f = TrainingSetup(model="tiny-llama", num_processes=2, fsdp="full_shard offload auto_wrap")
    assert (f.sharding, f.offload_optimizer, f.offload_param) == ("fsdp", "cpu", "cpu")
    fp = split(f, build_inventory(f.source), 1000)
    assert fp.host["optimizer_state"] == 500 and fp.host["param_shards"] == 4 * (-(-inv.num_params // 2))


def test_estimate_has_no_optimizer_state_on_the_gpu():
    est = estimate(_setup(Z3_OFFLOAD, 2, seq_len=32, optim="adamw_torch"))
    assert est.bytes["optimizer_state_device"] == 0 and est.bytes["optimizer_state_host"] == est.bytes["optimizer_state"]
    off = est.offload
    assert off["host_per_node"] == 2 * off["host_per_rank"] and off["device_peak"] > off["device_total"]
    assert not any("optimizer_state" in k for k in off["device"])
    assert any("rule from source, not measured" in n for n in est.notes)


def test_plan_offers_the_least_offload_that_fits():
    """bench plan's offer: the optimizer state on the host first, the parameters too only when that is not enough,
    nothing when even the activations do not fit."""
    from dataclasses import replace

    from optimem.estimators.offload_plan import offload_offer

    base = TrainingSetup(model="tiny-llama", optim="adamw_torch", mixed_precision="bf16", seq_len=32)

    def peak(opt: str, par: str) -> int:
        s = replace(base, sharding="zero3", num_processes=8, offload_optimizer=opt, offload_param=par)
        return estimate(s).offload["device_peak"]

    opt_only, both = peak("cpu", "none"), peak("cpu", "cpu")
    assert both < opt_only
    first = offload_offer(base, opt_only)
    assert (first.offload_optimizer, first.offload_param, first.num_gpus) == ("cpu", "none", 8)
    assert first.host_per_node > 0 and '"offload_optimizer": {"device": "cpu"}' in first.config_hint()
    assert offload_offer(base, opt_only - 1).offload_param == "cpu"
    assert offload_offer(base, both - 1) is None


def test_plan_offers_offload_when_nothing_else_fits():
    """A GPU too small for micro-batch 1, large enough once the optimizer state is on the host: the plan's row
    does not fit, and beside the sharding it would take, the offload offer names the host RAM per node."""
    from dataclasses import replace

    from optimem.estimators import planner as P
    from optimem.estimators.gpus import GPU

    base = TrainingSetup(model="tiny-llama", optim="adamw_torch", mixed_precision="bf16", seq_len=32)
    need = estimate(replace(base, sharding="zero3", num_processes=8, offload_optimizer="cpu",
                            gradient_checkpointing=True)).offload["device_peak"]
    gpu = GPU("tiny", "Tiny GPU", "test", 0.0, need + 1000, 0, {"bf16": 1.0, "fp32": 1.0}, None)
    plan = P.plan(base, ["adamw_torch"], [gpu], headroom=0.0)
    assert plan.rows[0].status == "no_fit"
    offer = plan.offload["adamw_torch"]
    zero3 = plan.to_fit["adamw_torch"]["tiny"]["zero3"]
    assert zero3 is None or zero3 > offer["num_gpus"]  # offload fits on fewer GPUs than ZeRO-3 without it
    assert (offer["offload_optimizer"], offer["offload_param"], offer["device_peak"]) == ("cpu", "none", need)
    assert offer["host_per_node"] > 0 and plan.to_dict()["offload"] == plan.offload
