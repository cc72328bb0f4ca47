"""optimem's offload model states beside DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``, what the ``*_all_live`` functions print), with every difference named.

``python -m optimem.harness.offload_check --out results/offload_vs_deepspeed.md`` writes the table (needs
deepspeed: the ``distributed`` extra). Model states only (no activations): DeepSpeed's functions count nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass

from optimem.estimators.inventory import build_inventory
from optimem.estimators.offload import largest_module_params, split
from optimem.estimators.setup import TrainingSetup
from optimem.harness.units import human_bytes, md_table

CONFIGS = {
    "zero2_offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                      "optimizer": {"type": "AdamW"}, "bf16": {"enabled": "auto"}},
    "zero3_offload_optimizer": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                                "optimizer": {"type": "AdamW"}, "bf16": {"enabled": "auto"}},
    "zero3_offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                            "offload_param": {"device": "cpu", "pin_memory": True}},
                      "optimizer": {"type": "AdamW"}, "bf16": {"enabled": "auto"}},
}
"""The DeepSpeed configs compared (the Trainer's usual ZeRO-Offload files, bf16, DeepSpeed's AdamW)."""


@dataclass
class Row:
    model: str
    config: str
    ranks: int
    nodes: int
    ours_gpu: int
    ds_gpu: int
    ours_host_node: int
    ds_host_node: int
    explain: str


def deepspeed_figures(config: str, num_params: int, largest_layer: int, per_node: int, nodes: int) -> tuple[int, int]:
    """(host bytes per node, GPU bytes per rank) by DeepSpeed's own estimator for ``config``."""
    # lazy: pulls in torch, deepspeed, which importing this module does not
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    # lazy: pulls in torch, deepspeed, which importing this module does not
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if config == "zero2_offload":
        cpu, gpu = estimate_zero2_model_states_mem_needs(num_params, per_node, nodes, cpu_offload=True)
        return cpu, gpu
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(num_params, largest_layer, per_node, nodes, cpu_offload=True,
                                                        cpu_offload_params=config == "zero3_offload", zero_init=True)
    return cpu, gpu


def compare(model: str, config: str, ranks: int, nodes: int) -> Row:
    """One comparison: optimem's per-rank GPU model states and host RAM per node against DeepSpeed's."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(CONFIGS[config], fh)
    try:
        setup = TrainingSetup(model=model, mixed_precision="bf16", num_processes=ranks, num_nodes=nodes,
                              deepspeed=fh.name)
        inv = build_inventory(setup.source).with_dtype(setup.dtype)
        parts = split(setup, inv, 0)
    finally:
        os.unlink(fh.name)
    largest = largest_module_params(inv)
    ds_cpu, ds_gpu = deepspeed_figures(config, inv.num_params, largest, ranks // nodes, nodes)
    ours_gpu = sum(parts.device.values())
    if config == "zero2_offload":
        why = ("GPU: DeepSpeed's 2 B/param (16-bit parameters whole) is optimem's params_16bit exactly; optimem adds "
               "the reduce bucket and the largest parameter's offload copy buffer. Host: DeepSpeed takes "
               "max(4 x all GPUs, 16) B/param x 1.5, not divided by nodes: 4 B/param per process is the fp32 model "
               "each process loads at start, which optimem does not count (over before training); optimem counts "
               "this node's share of the 16 B/param fp32 master, gradient and Adam partitions plus the host copy "
               "buffer")
    elif config == "zero3_offload":
        why = ("GPU: DeepSpeed takes 4 B x the largest layer (its 16-bit parameters and gradients); optimem counts "
               "the parameters ZeRO-3 keeps gathered (up to stage3_max_live_parameters, 1e9 elements: 2 GB in "
               "16-bit), the persistent small parameters and the reduce bucket. "
               "Host: both count 18 B/param per node (16-bit partition, fp32 master, gradient, Adam); DeepSpeed "
               "multiplies by its 1.5 allowance")
    else:
        why = ("GPU: DeepSpeed takes the largest layer's 4 B plus 2 B/param / GPUs; optimem the same partition plus "
               "the gathered parameters (up to stage3_max_live_parameters) and the reduce bucket. Host: 16 B/param per node in both; DeepSpeed x 1.5")
    return Row(model, config, ranks, nodes, ours_gpu, ds_gpu, parts.host_per_node, ds_cpu, why)


def table(rows: list[Row]) -> str:
    head = ["model", "DeepSpeed config", "ranks x nodes", "GPU: optimem", "GPU: DeepSpeed", "host/node: optimem",
            "host/node: DeepSpeed", "host ratio (DS / optimem)", "difference"]
    body = [[r.model, r.config, f"{r.ranks // r.nodes} x {r.nodes}", human_bytes(r.ours_gpu), human_bytes(r.ds_gpu),
             human_bytes(r.ours_host_node), human_bytes(r.ds_host_node), f"{r.ds_host_node / r.ours_host_node:.3f}",
             r.explain] for r in rows]
    return md_table(head, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the Markdown here (default: print)")
    args = p.parse_args(argv)
    rows = [compare(m, c, 8 * nodes, nodes) for m in ("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.1-70B")
            for c in CONFIGS for nodes in (1, 2)]
    import deepspeed  # lazy: pulls in torch, deepspeed, which importing this module does not

    text = ("# optimem's offload model states vs DeepSpeed's estimators\n\n"
            f"Generated by `python -m optimem.harness.offload_check --out {args.out or 'FILE'}` with deepspeed "
            f"{deepspeed.__version__}: model states only, bf16, DeepSpeed AdamW (DeepSpeedCPUAdam), 8 GPUs per node. "
            "optimem's figures are rules from DeepSpeed's source, not measurements; DeepSpeed's are its own "
            "`estimate_zero2/zero3_model_states_mem_needs` (cpu_offload=True, zero_init=True, "
            "additional_buffer_factor=1.5).\n\n" + table(rows) + "\n")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
