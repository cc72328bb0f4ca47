"""The layering: estimators/ is pure (imports nothing from harness/), and one setup type serves every command."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from optimem.estimators.errors import UserError
from optimem.estimators.setup import CLI, TrainingSetup
from optimem.estimators.user_objects import from_training_arguments

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_estimators_import_nothing_from_the_harness():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                                  if m.split(".")[0] == "harness" or m.startswith("optimem.harness"))
                 for p in (ROOT / "estimators").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] layers, checked by import-linter (function-level imports count)."""
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_import_cycle_among_modules():
    """Module by module (function-level imports count, as grimp reads them): the import graph is a DAG."""
    import grimp

    graph = grimp.build_graph("optimem")
    deps = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in deps[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = {stack.pop()}
            while v not in comp:
                comp.add(stack.pop())
            on.difference_update(comp)
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(deps):
        if m not in index:
            visit(m)
    assert cycles == []


def test_every_setup_field_has_one_flag_and_a_record_form():
    from dataclasses import fields

    from optimem.harness.run_config import RunConfig

    assert [f.name for f in fields(TrainingSetup)] == list(CLI)
    cfg = RunConfig(optim="galore_adamw", optim_target_modules=["q_proj", "v_proj"], optim_args="rank=8",
                    freeze="embed", attn_implementation="eager", mixed_precision="bfloat16", steps=3)
    back = RunConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.mixed_precision == "bf16" and back.optim_target_modules == ("q_proj", "v_proj")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("attn_implementation", "task", "freeze")}
    old["extra"] = {"attn_implementation": "eager"}  # where version-1 records kept it
    assert RunConfig.from_dict(old).attn_implementation == "eager" and RunConfig.from_dict(old).extra == {}


def test_the_cli_and_the_api_build_the_same_setup():
    from optimem.harness.cli import build_parser
    from optimem.harness.commands.setup_args import setup_kwargs

    args = build_parser().parse_args(["run", "--optim", "ADAMW_TORCH", "--bf16", "--batch-size", "3",
                                      "--gradient-checkpointing", "--freeze", "lm_head"])
    from optimem.harness.commands.run import config_from_args

    cfg = config_from_args(args)
    assert cfg.setup() == TrainingSetup(optim="adamw_torch", mixed_precision="bf16", batch_size=3, seq_len=64,
                                        gradient_checkpointing=True, freeze="lm_head")
    assert setup_kwargs(args)["optim"] == "ADAMW_TORCH" and cfg.optim == "adamw_torch"


@pytest.mark.parametrize("kw, needle", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"optim": "adamw_torch", "optim_args": "rank=4"}, "not read by adamw_torch"),
    ({"optim_target_modules": "(unclosed"}, "bad optim_target_modules regex"),
    ({"freeze": "[x"}, "bad freeze regex"),
    ({"num_processes": 2}, "need a sharding scheme"),
    ({"sharding": "zero4"}, "sharding must be one of"),
    ({"task": "translation"}, "task must be one of"),
    ({"optim": "galore_adamw_layerwise", "optim_target_modules": "all-linear", "grad_accum": 2},
     "does not support gradient accumulation"),
    ({"gradient_checkpointing": "yes"}, "true or false"),
])
def test_one_validation_refuses_in_one_line(kw, needle):
    """Field values are checked when the setup is built; what the Trainer refuses, by check_trainable() (the
    estimator and the harness call it first). Either way: one line naming the field."""
    from optimem.estimators.setup import SetupError

    with pytest.raises(SetupError, match=needle) as err:
        TrainingSetup(**kw).check_trainable()
    assert "\n" not in str(err.value) and err.value.field in CLI


def test_from_training_arguments(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw", optim_args="rank=8",
                             optim_target_modules=["attn", "mlp"], per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, bf16=True, gradient_checkpointing=True, use_cpu=True,
                             report_to="none")
    s = from_training_arguments(args, model="tiny-llama", seq_len=256)
    assert s == TrainingSetup(model="tiny-llama", optim="galore_adamw", optim_args="rank=8",
                              optim_target_modules=("attn", "mlp"), batch_size=4, grad_accum=2, seq_len=256,
                              mixed_precision="bf16", gradient_checkpointing=True, device="cpu")
