"""``bench optims``: every optimizer name optimem knows, with its package and state cost per parameter."""
from __future__ import annotations

import argparse
import json

from optimem.estimators import REGISTRY
from optimem.estimators.inventory import ParamRow
from optimem.estimators.optimizers import ParamCtx
from optimem.harness.units import format_table

BIG = (4096, 4096)
"""The reference weight: a 4096 x 4096 nn.Linear weight (targeted by low-rank optimizers)."""


def register(sub) -> None:
    p = sub.add_parser("optims", help="list every optimizer name, its package and its state bytes per parameter",
                       description="List every optimizer name optimem knows: package, whether it is installed "
                                   "(and the pip line if not), whether it runs on CPU, and its state bytes per "
                                   f"parameter for a {BIG[0]}x{BIG[1]} weight stored in fp32 and in bf16.")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=main)


def state_bytes_per_param(spec, dtype: str) -> float | None:
    """Optimizer-state bytes per parameter of the reference weight (default args, targeted)."""
    if spec.availability != "ok" or spec.state is None:
        return None
    row = ParamRow(name="layer.weight", shape=BIG, dtype=dtype, trainable=True, module_kind="linear",
                   module_name="layer", module_class="Linear")
    state = spec.param_state(ParamCtx(row, spec.resolve_args(None), targeted=True))
    return sum(state.values()) / row.numel


def describe(spec) -> dict:
    installed = spec.installed() if spec.availability == "ok" else False
    return {
        "optim": spec.name, "family": spec.family, "class": spec.cls, "package": spec.pip or spec.package or "torch",
        "availability": spec.availability, "installed": installed,
        "install": None if installed or spec.availability != "ok" else spec.install_line(),
        "runs_on_cpu": spec.runs_on_cpu and spec.availability == "ok", "gpu_only": not spec.runs_on_cpu,
        "trainer_name": spec.trainer_name, "state_location": spec.state_location,
        "state_bytes_per_param_fp32": state_bytes_per_param(spec, "fp32"),
        "state_bytes_per_param_bf16": state_bytes_per_param(spec, "bf16"),
        "note": spec.reason or spec.cpu_note, "description": spec.description,
    }


def main(args: argparse.Namespace) -> int:
    rows = [describe(s) for s in REGISTRY.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def fmt(x):
        return "-" if x is None else f"{x:.4g}"

    table = [[r["optim"], r["package"], "yes" if r["installed"] else ("n/a" if r["availability"] != "ok" else "no"),
              "yes" if r["runs_on_cpu"] else "no", fmt(r["state_bytes_per_param_fp32"]),
              fmt(r["state_bytes_per_param_bf16"]),
              r["install"] or (r["note"] if r["availability"] != "ok" or not r["runs_on_cpu"] else "")]
             for r in rows]
    print(format_table(["optimizer", "package", "installed", "CPU", "B/param fp32", "B/param bf16", "note"],
                       table, align="lllrrrl"))
    print(f"\nB/param: optimizer-state bytes per parameter of a {BIG[0]}x{BIG[1]} weight, default Trainer args "
          "(low-rank optimizers: the weight is targeted).")
    return 0
