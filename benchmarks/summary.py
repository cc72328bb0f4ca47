"""Print the benchmark targets table (Markdown) from pytest-benchmark JSON files.

    python -m benchmarks.summary results/benchmarks/<file>.json [more.json ...]
"""
from __future__ import annotations

import json
import sys

TARGETS = [
    # (label, benchmark name, target seconds or None)
    ("70B inventory, cold (modules imported)", "test_inventory_cold[70b]", 2.0),
    ("8B inventory, cold", "test_inventory_cold[8b]", None),
    ("70B inventory, from the on-disk cache", "test_inventory_from_disk_cache[70b]", None),
    ("70B inventory, cached", "test_inventory_cached[70b]", None),
    ("70B inventory, fresh Python process (imports included, cache off)", "test_inventory_70b_fresh_process", None),
    ("70B inventory, fresh Python process, cache warm", "test_inventory_70b_fresh_process_cached", None),
    ("one full estimate, warm (8B, adamw_torch)", "test_estimate_warm[adamw_torch]", 1e-3),
    ("one full estimate, warm (8B, galore_adamw)", "test_estimate_warm[galore_adamw]", 1e-3),
    ("10,000 estimates (8B, optimizers x batch x seq)", "test_sweep_10000_estimates", 10.0),
    ("accelerate estimate-memory approach, one call (8B, no Hub)", "test_accelerate_estimate_memory_approach", None),
    ('baseline: `python -c "import torch"`', "test_import_torch_baseline", None),
    ("`bench estimate` 8B, one optimizer, cache warm", "test_cli_estimate_warm", 0.5),
    ("`bench estimate` 8B, one optimizer, `--no-cache`", "test_cli_estimate_cold", None),
    ("`bench estimate --optim all` 8B, cache warm", "test_cli_estimate_all_warm", 1.5),
    ("`bench plan --gpus all` 8B, cache warm", "test_cli_plan_all_warm", 1.5),
    ("first estimate of a new config, trace + fit (8B, batch 4)", "test_first_estimate[4-8b]", 5.0),
    ("first estimate of a new config, trace + fit (8B, batch 1)", "test_first_estimate[1-8b]", 5.0),
    ("first estimate of a new config, trace + fit (70B, batch 4)", "test_first_estimate[4-70b]", 20.0),
    ("first estimate of a new config, trace + fit (70B, batch 1)", "test_first_estimate[1-70b]", 20.0),
    ("warm estimate, any shape (8B, traced)", "test_warm_estimate_any_shape", 1e-3),
    ("bench plan, 8B x GPU catalog x default optimizers, traces cold", "test_plan_gpu_catalog", None),
    ("`bench serve` warm request, same form (8B, 3 optimizers x 3 GPUs)", "test_answer_same_form", 0.1),
    ("`bench serve` warm request, new micro-batch (sequence search reruns)", "test_answer_new_batch", 0.1),
    ("`bench serve` HTTP round trip through Gradio (gradio_client, 127.0.0.1)", "test_http_round_trip", None),
]
RATIO_TARGETS = [
    # (label, benchmark name, target ratio): the benchmark's median over its interleaved import-torch baseline's
    ("`bench estimate` cache warm / `import torch` (same rounds)", "test_cli_estimate_warm", 0.5),
]
SWEEPS = [
    # (label, benchmark name, target seconds for the median per-run overhead or None)
    ("12-run CPU sweep of tiny-llama, forked from the zygote", "test_sweep_12_runs_overhead[fork]", 1.5),
    ("the same sweep, `--no-fork` (a fresh worker process per run)", "test_sweep_12_runs_overhead[no_fork]", None),
]


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def main(path: str) -> None:
    data = json.load(open(path))
    by = {b["name"]: b["stats"] for b in data["benchmarks"]}
    extra = {b["name"]: b.get("extra_info") or {} for b in data["benchmarks"]}
    m = data["machine_info"]
    print(f"Machine: {m.get('cpu', {}).get('brand_raw', m.get('processor'))}, {m.get('cpu', {}).get('count')} cores, "
          f"Python {m.get('python_version')}; run {data.get('datetime', '')[:19]}; file `{path}`\n")
    print("| benchmark | median | target | met |")
    print("| --- | --- | --- | --- |")
    for label, name, target in TARGETS:
        if name not in by:
            continue
        med = by[name]["median"]
        print(f"| {label} | {_fmt(med)} | {_fmt(target) if target else '-'} | "
              f"{('yes' if med < target else 'NO') if target else '-'} |")
    for label, name, target in RATIO_TARGETS:
        e = extra.get(name) or {}
        if "ratio_to_import_torch" in e:
            r = e["ratio_to_import_torch"]
            print(f"| {label}: {_fmt(by[name]['median'])} / {_fmt(e['baseline_import_torch_s'])} | {r:.2f}x | "
                  f"< {target}x | {'yes' if r < target else 'NO'} |")
    for label, name, target in SWEEPS:
        e = extra.get(name) or {}
        if "median_overhead_s" not in e:
            continue
        med = e["median_overhead_s"]
        print(f"| {label}: per-run overhead (time between records minus the record's job time), median; mean "
              f"with the one-off start {_fmt(e['mean_overhead_s'])}, whole sweep {_fmt(e['wall_s'])} | {_fmt(med)} | "
              f"{_fmt(target) if target else '-'} | {('yes' if med < target else 'NO') if target else '-'} |")
    # Overheads compare minima: on a shared machine other processes only ever add time, so the minimum of
    # each series is the least disturbed figure (medians are printed alongside for transparency).
    plain = by.get("test_step_plain")
    for name, label in (("test_step_tensor_accounting", "CPU tensor accountant"), ("test_step_rss_tracker", "RSS tracker")):
        if plain and name in by:
            over = by[name]["min"] / plain["min"] - 1
            print(f"| {label} overhead on a ~20M-param CPU training step (min {_fmt(plain['min'])} plain, "
                  f"{_fmt(by[name]['min'])} tracked; medians {_fmt(plain['median'])} / {_fmt(by[name]['median'])}) "
                  f"| {over:+.1%} | < 10% | {'yes' if over < 0.10 else 'NO'} |")
    acc, est = by.get("test_accelerate_estimate_memory_approach"), by.get("test_estimate_warm[adamw_torch]")
    if acc and est:
        print(f"\nPer call, optimem's warm estimate is {acc['median'] / est['median']:.0f}x faster than rebuilding a "
              "meta model per call as `accelerate estimate-memory` does (same config, same run), and it covers "
              "every optimizer rather than Adam only.")


if __name__ == "__main__":
    for i, arg in enumerate(sys.argv[1:]):
        if i:
            print()
        main(arg)
