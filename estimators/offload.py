"""CPU / NVMe offload: where each rank's model states live (device, host, NVMe), in bytes.

Rules written from the engines' source (no GPU run checks them; ``results/offload_vs_deepspeed.md`` sets them
beside DeepSpeed's own estimators):

* DeepSpeed ZeRO-1/2 with ``offload_optimizer`` (``runtime/zero/stage_1_and_2.py``): the 16-bit parameters stay
  whole on the device; each rank's fp32 master partition, its fp32 gradient partition
  (``single_partition_of_fp32_groups[i].grad``) and the CPU optimizer's state (DeepSpeedCPUAdam: exp_avg and
  exp_avg_sq, fp32) live in host memory (page-locked with ``pin_memory``); gradients leave the device bucket by
  bucket (ZeRO-2: the ``reduce_bucket_size`` contiguous buffer; ZeRO-1 keeps the whole gradient until the step),
  through two buffers of the largest parameter's size, ``temp_grad_buffer_for_gpu_offload`` on the device and
  ``temp_grad_buffer_for_cpu_offload`` on the host.
* DeepSpeed ZeRO-3 (``runtime/zero/stage3.py``, ``partition_parameters.py``, ``partitioned_param_coordinator.py``):
  each rank's 16-bit parameter partition lives on the device, the host (``offload_param`` cpu) or NVMe (then the
  host holds ``buffer_count x buffer_size`` swap buffers); parameters under ``stage3_param_persistence_threshold``
  elements stay whole on every device; forward and backward gather parameters and keep them up to
  ``stage3_max_live_parameters`` (1e9 elements by default; a smaller model stays gathered whole); gradients pass through the ``reduce_bucket_size`` buffer into the
  fp32 gradient partition, which lives with the optimizer (device, host, or host for NVMe sub-groups swapped in
  ``buffer_count`` at a time, each at most ``sub_group_size`` elements with its state).
* FSDP2 ``CPUOffloadPolicy`` (``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``): the sharded parameters and
  their sharded gradients live in host memory (pinned by default) in the parameters' storage dtype; the optimizer
  (the Trainer's own) steps there; the device holds the unsharded unit being computed (its parameters, and in
  backward its unsharded gradients before the reduce-scatter).

Activations and transients on the device come from the traced step (the estimate's phases, less the model states
they held). Host figures are model states and offload buffers, not the Python process (torch, CUDA context).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .offload_config import CPU_OPTIMIZERS, DeepSpeedSettings, read_deepspeed
from .params import Inventory
from .setup import TrainingSetup

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


@dataclass
class OffloadSplit:
    """Per-rank bytes by place: ``device``, ``host``, ``nvme`` (each ``{term: bytes}``); ``ranks_per_node``;
    ``device_peak``: the device's peak (model states here plus the traced step's activations and transients);
    ``notes``: where each figure comes from."""

    scheme: str
    device: dict[str, int]
    host: dict[str, int]
    nvme: dict[str, int]
    ranks_per_node: int
    pinned: int = 0
    device_peak: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def host_per_node(self) -> int:
        """Host bytes of one node: every rank on it (bytes)."""
        return sum(self.host.values()) * self.ranks_per_node

    @property
    def nvme_per_node(self) -> int:
        return sum(self.nvme.values()) * self.ranks_per_node

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "device": dict(self.device), "host": dict(self.host), "nvme": dict(self.nvme),
                "device_total": sum(self.device.values()), "host_per_rank": sum(self.host.values()),
                "nvme_per_rank": sum(self.nvme.values()), "ranks_per_node": self.ranks_per_node,
                "host_per_node": self.host_per_node, "nvme_per_node": self.nvme_per_node, "pinned_per_rank": self.pinned,
                "device_peak": self.device_peak}


def _ceil(a: int, n: int) -> int:
    return -(-int(a) // int(n))


def _hidden(setup: TrainingSetup) -> int | None:
    cfg = setup.source.load()
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    return cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd")


def deepspeed_settings(setup: TrainingSetup) -> DeepSpeedSettings:
    """The setup's DeepSpeed settings: its config, or DeepSpeed's defaults for its sharding and offload fields
    (a setup the planner offers: the Trainer's optimizer, stepped on the host)."""
    if setup.deepspeed:
        return read_deepspeed(setup.deepspeed, batch_size=setup.batch_size, grad_accum=setup.grad_accum,
                              mixed_precision=setup.mixed_precision)
    return DeepSpeedSettings(stage=int(setup.sharding[-1]), offload_optimizer=setup.offload_optimizer,
                             offload_param=setup.offload_param, force_cpu_optimizer=False,
                             buckets=(("reduce_bucket_size", None), ("stage3_param_persistence_threshold", None),
                                      ("stage3_prefetch_bucket_size", None)))


def largest_module_params(inv: Inventory) -> int:
    """Elements of the module that owns the most parameters directly (DeepSpeed's "largest layer")."""
    per: dict[str, int] = {}
    for r in inv.rows:
        per[r.module_name] = per.get(r.module_name, 0) + r.numel
    return max(per.values(), default=0)


def largest_unit_params(inv: Inventory) -> int:
    """Elements of the largest FSDP unit: a repeated block (``...layers.<i>``) or a module outside them."""
    per: dict[str, int] = {}
    for r in inv.rows:
        m = _BLOCK.match(r.name)
        key = m.group(1) if m else r.module_name
        per[key] = per.get(key, 0) + r.numel
    return max(per.values(), default=0)


def split(setup: TrainingSetup, inv: Inventory, optimizer_state: int, phases: dict | None = None) -> OffloadSplit:
    """Per-rank device / host / NVMe bytes of ``setup`` (offloaded: ``offload_optimizer`` or ``offload_param`` set)
    for the model ``inv``. ``optimizer_state``: the Trainer optimizer's whole state (bytes; used where the
    Trainer's own optimizer steps on the host). ``phases``: the estimate's, for the device's activations."""
    n = setup.num_processes
    per_node = n // setup.num_nodes
    N, P = inv.num_params, inv.trainable_params
    eb = 2 if setup.sixteen_bit else 4
    dev: dict[str, int] = {}
    host: dict[str, int] = {}
    nvme: dict[str, int] = {}
    pinned = 0
    notes: list[str] = []
    if setup.sharding == "fsdp":
        scheme = "FSDP2 CPUOffloadPolicy"
        pb = max(inv.weight_bytes // max(N, 1), 1)
        unit = largest_unit_params(inv)
        dev["gathered_unit_params"] = unit * eb
        dev["gathered_unit_grads"] = unit * eb
        host["param_shards"] = _ceil(N, n) * pb
        host["grad_shards"] = _ceil(P, n) * pb
        host["optimizer_state"] = _ceil(optimizer_state, n)
        pinned = host["param_shards"] + host["grad_shards"]
        notes.append("FSDP2 CPUOffloadPolicy: parameter and gradient shards in pinned host memory, the Trainer's "
                     "optimizer steps there; the device holds the unit being computed (rule from torch's fully_shard "
                     "source, not measured)")
    else:
        ds = deepspeed_settings(setup)
        hidden = _hidden(setup)
        bucket = ds.bucket("reduce_bucket_size", hidden)
        state_pp = CPU_OPTIMIZERS.get(ds.optimizer or "", None)
        state = state_pp * _ceil(P, n) if state_pp is not None else _ceil(optimizer_state, n)
        opt_dev = ds.offload_optimizer
        scheme = f"DeepSpeed ZeRO-{ds.stage}" + (f", optimizer on {opt_dev}" if opt_dev != "none" else "") \
            + (f", parameters on {ds.offload_param}" if ds.offload_param != "none" else "")
        master, grads32 = 4 * _ceil(P, n), 4 * _ceil(P, n)
        largest = max((r.numel for r in inv.rows if r.trainable), default=0)
        if ds.stage in (1, 2):
            # the engine casts the model to its 16-bit dtype; a quantized (frozen) weight keeps its packed storage
            dev["params_16bit"] = sum(r.nbytes if r.quant else r.numel * eb for r in inv.rows)
            if ds.stage == 1:
                dev["gradients"] = P * eb
            else:
                dev["grad_bucket"] = min(bucket, P) * eb
            dev["grad_offload_buffer"] = largest * eb
            host.update(master_weights=master, grad_partition_fp32=grads32, optimizer_state=state,
                        grad_offload_buffer=largest * eb)
            if ds.optimizer_pin_memory:
                pinned = grads32 + largest * eb
        else:
            threshold = ds.bucket("stage3_param_persistence_threshold", hidden)
            prefetch = ds.bucket("stage3_prefetch_bucket_size", hidden)
            live = ds.bucket("stage3_max_live_parameters", hidden)
            persistent = sum(r.numel for r in inv.rows if r.numel < threshold)
            dev["persistent_params"] = persistent * eb
            # the parameter coordinator keeps what it gathered while the model's reuse distance is under
            # stage3_max_reuse_distance (1e9 by default), up to stage3_max_live_parameters: the rule sharding.py
            # uses for ZeRO-3 without offload (measured there on CPU); never less than the running module plus
            # the prefetch bucket
            rest = sum(r.numel for r in inv.rows if r.numel >= threshold)
            dev["gathered_params"] = min(rest, max(live, largest_module_params(inv) + prefetch)) * eb
            dev["grad_bucket"] = min(bucket, P) * eb
            part16 = _ceil(N, n) * eb
            if ds.offload_param == "none":
                dev["param_partition"] = part16
            elif ds.offload_param == "cpu":
                host["param_partition"] = part16
                pinned += part16 if ds.param_pin_memory else 0
            else:
                nvme["param_partition"] = part16
                host["param_swap_buffers"] = ds.param_buffer_count * ds.param_buffer_size * eb
                pinned += host["param_swap_buffers"]
            if opt_dev == "none":
                dev.update(master_weights=master, grad_partition_fp32=grads32, optimizer_state=state)
            elif opt_dev == "cpu":
                host.update(master_weights=master, grad_partition_fp32=grads32, optimizer_state=state)
                pinned += (master + grads32 + state) if ds.optimizer_pin_memory else 0
            else:
                sub = min(ds.bucket("sub_group_size"), _ceil(P, n))
                per_elem = 8 + (state_pp if state_pp is not None else 8)  # fp32 master + fp32 grad + state
                host["grad_partition_fp32"] = grads32
                host["optimizer_swap_buffers"] = ds.optimizer_buffer_count * sub * per_elem
                nvme.update(master_weights=master, optimizer_state=state)
                pinned += host["optimizer_swap_buffers"]
        notes.append(f"{scheme}: bytes per rank from DeepSpeed's source (stage_1_and_2.py / stage3.py), rule from "
                     "source, not measured; reduce_bucket_size "
                     f"{bucket:,} elements{' (auto: hidden^2)' if dict(ds.buckets).get('reduce_bucket_size', 0) is None else ''}")
    out = OffloadSplit(scheme, dev, host, nvme, per_node, pinned, notes=notes)
    if phases:
        rest = [v["peak"] - v.get("weights", 0) - v.get("gradients", 0) - v.get("optimizer_state", 0)
                for k, v in phases.items() if "optimizer_step" not in k]
        if rest:
            out.device_peak = sum(dev.values()) + max(rest)
            out.notes.append("device peak: the model states above plus the traced step's largest activations and "
                             "transients outside the optimizer step (which runs on the host)")
    return out


__all__ = ["OffloadSplit", "deepspeed_settings", "largest_module_params", "largest_unit_params", "split"]
