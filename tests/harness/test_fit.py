"""Refusing what cannot fit, before it starts (optimem.harness.fit): the model states against the memory the
device has, then the whole-step peak; ``bench run`` exits 2 in one line with the figures, ``bench sweep``
records ``oom-predicted`` and runs nothing, ``--force`` overrides. No training run starts in this file."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from optimem.harness import fit
from optimem.harness.cli import main
from optimem.harness.launcher import predict
from optimem.harness.record import validate
from optimem.harness.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    """A two-layer Llama 65536 wide: 1.4e11 parameters (fp32 weights alone 513 GiB), quick to build on meta."""
    cfg = json.loads((ROOT / "estimators" / "configs" / "tiny-llama.json").read_text())
    cfg.update(hidden_size=65536, intermediate_size=262144, num_attention_heads=64, num_key_value_heads=8)
    path = tmp_path_factory.mktemp("big") / "big.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_states_first_then_the_whole_step():
    cfg = RunConfig(model="tiny-llama", optim="adamw_torch", device="cpu", batch_size=2, seq_len=64)
    pred = predict(cfg)
    b = pred["bytes"]
    states = b["weights"] + b["gradients"] + b["optimizer_state"]
    assert b["peak"] > states  # the activations and transients of the step come on top
    assert fit.check(cfg, "cpu", predicted=pred, available=(b["peak"], "test")) is None  # exactly fits
    r = fit.check(cfg, "cpu", available=(states - 1, "test"))  # the states alone: no trace needed
    assert r is not None and r.needed == states and r.what.startswith("weights + gradients")
    r = fit.check(cfg, "cpu", predicted=pred, available=(b["peak"] - 1, "test"))
    assert r is not None and r.needed == b["peak"] and r.available == b["peak"] - 1
    assert "predicted out of memory" in r.text() and "test" in r.text()
    assert fit.check(cfg, "cpu", available=(None, "")) is None  # memory that cannot be read: no judgement
    two = RunConfig(model="tiny-llama", optim="adamw_torch", device="cpu", num_processes=2, sharding="ddp")
    assert fit.check(two, "cpu", available=(1, "test")) is None  # per-rank figures are the planner's


def test_host_memory_is_read():
    room, source = fit.available_memory("cpu")
    assert room > 0 and source


def test_bench_run_refuses_in_one_line_fast(capsys, tmp_path, big):
    argv = ["run", "--optim", "adamw_torch", "--model", big, "--device", "cpu", "--out", str(tmp_path / "r.jsonl")]
    assert main(argv) == 2  # the first time builds the inventory (meta device, cached)
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(argv) == 2
    took = time.perf_counter() - t0
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "predicted out of memory" in lines[0] and "--force" in lines[0]
    assert "GiB" in lines[0] and "available" in lines[0]
    assert took < 1.0, took
    assert not (tmp_path / "r.jsonl").exists()


def test_sweep_records_oom_predicted_and_resume_keeps_it(capsys, tmp_path, big):
    out = tmp_path / "s.jsonl"
    argv = ["sweep", "--optim", "adamw_torch", "sgd", "--model", big, "--device", "cpu", "--shape", "1x8",
            "--out", str(out), "--progress", "none"]
    assert main(argv) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in recs] == ["oom-predicted", "oom-predicted"]
    for r in recs:
        validate(r)
        assert r["measured"] is None and r["run"]["duration_s"] == 0.0
        assert r["run"]["fit"]["needed_bytes"] > r["run"]["fit"]["available_bytes"]
        assert "predicted out of memory" in r["reason"]
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert len(out.read_text().splitlines()) == 2  # nothing run again
