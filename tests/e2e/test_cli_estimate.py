"""`bench estimate` and `bench optims`: output a user and a script can read; bad input is one line, exit 2."""
import json
import subprocess
import sys

import pytest

from optimem.estimators import REGISTRY, estimate
from optimem.harness.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_fields(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "tiny-llama", "--optim", "adamw_torch", "--optim",
                       "adamw_bnb_8bit", "--dtype", "bf16", "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["optim"] for d in data] == ["adamw_torch", "adamw_bnb_8bit"]
    for d in data:
        assert {"optim", "model", "dtype", "num_params", "trainable_params", "bytes"} <= set(d)
        assert d["bytes"] == estimate("tiny-llama", d["optim"], dtype="bf16").bytes


@pytest.mark.slow


def test_estimate_all_lists_every_name(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "gpt2-medium", "--optim", "all", "--json")
    assert code == 0
    data = json.loads(out)
    assert sorted(d["optim"] for d in data) == sorted(REGISTRY)
    unsupported = {d["optim"] for d in data if d["status"] not in ("ok", "not_applicable")}
    assert unsupported == {n for n, s in REGISTRY.items() if s.availability != "ok"}
    # GPT-2's layers are Conv1D: GaLore/APOLLO have nothing to project, as in the Trainer.
    assert all(d["reason"] for d in data if d["status"] != "ok")
    # GPT-2's lm_head is its only nn.Linear and it is tied to the embedding: 'all-linear' matches it, as in the
    # Trainer, and nothing is projected.
    lowrank = [d for d in data if REGISTRY[d["optim"]].needs_target_modules and d["status"] == "ok"]
    assert lowrank and all(d["targeted_params"] == 0 for d in lowrank)
    assert all("reason" in d for d in data if d["status"] != "ok")


@pytest.mark.slow


def test_estimate_table_for_llama_3_8b(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "meta-llama/Meta-Llama-3-8B", "--optim", "all")
    assert code == 0
    assert "8.03B parameters" in out and "not estimated:" in out
    adamw = next(line for line in out.splitlines() if line.startswith("adamw_torch "))
    assert "59.83 GiB" in adamw and "8.000" in adamw  # 8 B/param fp32 state
    assert "assumed 'all-linear'" in out


def test_optims_listing(capsys):
    code, out, _ = run(capsys, "optims", "--json")
    assert code == 0
    rows = {r["optim"]: r for r in json.loads(out)}
    assert set(rows) == set(REGISTRY)
    assert rows["adamw_torch"]["state_bytes_per_param_fp32"] == pytest.approx(8 + 4 / 4096 ** 2)
    assert rows["adamw_bnb_8bit"]["state_bytes_per_param_bf16"] == pytest.approx(2 + 8 / 256)
    assert rows["adafactor"]["state_bytes_per_param_fp32"] < 0.01
    assert rows["adalomo"]["gpu_only"] and not rows["adalomo"]["runs_on_cpu"]
    code, out, _ = run(capsys, "optims")
    assert code == 0 and "B/param fp32" in out


@pytest.mark.parametrize("argv,needle", [
    (["estimate", "--optim", "adamw_torhc"], "did you mean 'adamw_torch'"),
    (["estimate", "--model", "llama-9", "--optim", "sgd"], "unknown model"),
    (["estimate", "--optim", "galore_adamw", "--optim-args", "rank16"], "malformed optim_args"),
    (["estimate", "--optim", "adamw_torch_xla"], "needs a TPU"),
    (["estimate", "--optim", "sgd", "--dtype", "int4"], "unknown dtype"),
    (["estimate", "--optim", "sgd", "--batch-size", "x"], "invalid int value"),
    (["estimate"], "--optim"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) if argv[0] == "nosuchcommand" or "--optim" not in argv or "x" in argv \
            else _no_raise() as exc:
        code = main(argv)
    code = exc.value.code if exc else code
    _, err = capsys.readouterr()
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


class _no_raise:
    value = None

    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_subprocess_bad_config_no_traceback(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"architectures": ["Foo"]}')
    proc = subprocess.run([sys.executable, "-m", "optimem.harness.cli", "estimate", "--model", str(bad), "--optim", "sgd"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "model_type" in proc.stderr
