"""`bench sweep`: grids and config keys; a real CPU sweep of 6 optimizers x 2 shapes that is killed halfway
and finished by --resume with no lost, torn or duplicated lines; the max-batch search under a memory limit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import COMMITTED_RESULTS
from optimem.estimators.errors import UserError
from optimem.harness.cli import main
from optimem.harness.grid import (config_key, config_label, grid_from_mapping, parse_shape, parse_size, record_key,
                          select_optimizers)
from optimem.harness.max_batch import OVER_LIMIT, max_batch_path
from optimem.harness.record import validate
from optimem.harness.sweep import Sweep, SweepOptions

ROOT = Path(__file__).resolve().parents[2]

OPTIMS = ["adamw_torch", "adafactor", "sgd", "adagrad", "rmsprop", "schedule_free_adamw"]
SHAPES = ["1x16", "2x32"]
FAST = ["--steps", "2", "--warmup", "1", "--jobs", "2", "--progress", "lines"]


def sweep_argv(out: Path, *extra: str) -> list[str]:
    return ["sweep", "--optim", *OPTIMS, "--shape", *SHAPES, *FAST, "--out", str(out),
            "--fault", "sgd=oom@step0.forward", *extra]


def expected_keys() -> dict[str, str]:
    """Config key -> optimizer, for the grid of sweep_argv."""
    grid = grid_from_mapping({"optim": OPTIMS, "shape": SHAPES, "steps": 2, "warmup": 1})
    return {config_key(c.to_dict(), "cpu"): c.optim for c in grid.configs()}


def read_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the file ends in a torn line"
    records = [json.loads(line) for line in raw.decode().splitlines()]  # every line parses
    for rec in records:
        validate(rec)
    return records


# ------------------------------------------------------------------------------------------- unit
def test_optimizer_selection_families_and_all():
    assert select_optimizers("all")[:2] == ["adamw_torch", "adamw_torch_fused"]
    assert "adamw_apex_fused" not in select_optimizers("all")  # removed names are left out
    assert select_optimizers(["adam-8bit"]) == ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
                                                "adamw_torch_8bit", "flash_adamw", "flash_adam"]
    assert select_optimizers("lomo") == ["lomo"]  # an optimizer's own name wins over its family
    assert select_optimizers("family:lomo") == ["lomo", "adalomo"]
    assert select_optimizers("sgd,adafactor,sgd") == ["sgd", "adafactor"]
    with pytest.raises(UserError, match="unknown optimizer 'adamq'.*family"):
        select_optimizers("adamq")


def test_grid_from_yaml_mapping_expands_in_order(tmp_path):
    from optimem.harness.grid import load_yaml

    f = tmp_path / "grid.yaml"
    f.write_text("optim: [adamw_torch, galore_adamw]\nmodel: tiny-llama\nbatch-size: [1, 2]\nseq_len: 32\n"
                 "mixed_precision: [none, bf16]\ngradient_checkpointing: both\noptim_args: {galore: 'rank=4'}\n"
                 "steps: 3\nwarmup: 1\n")
    grid = grid_from_mapping(load_yaml(f))
    configs = grid.configs()
    assert grid.size() == len(configs) == 2 * 2 * 2 * 2
    assert [c.optim for c in configs[:2]] == ["adamw_torch", "galore_adamw"]
    galore = [c for c in configs if c.optim == "galore_adamw"]
    assert {c.optim_args for c in galore} == {"rank=4"} and {c.optim_target_modules for c in galore} == {"all-linear"}
    assert {c.optim_args for c in configs if c.optim == "adamw_torch"} == {None}
    assert {(c.mixed_precision, c.gradient_checkpointing) for c in configs} == {
        (None, False), (None, True), ("bf16", False), ("bf16", True)}
    with pytest.raises(UserError, match="unknown key"):
        grid_from_mapping({"optim": "sgd", "batchsize": 2})
    with pytest.raises(UserError, match="either shape"):
        grid_from_mapping({"optim": "sgd", "shape": "2x8", "seq_len": 8})


def test_config_key_is_stable_and_canonical():
    base = {"optim": "adamw_torch", "model": "tiny-llama", "dtype": "fp32", "mixed_precision": None,
            "batch_size": 2, "seq_len": 64, "grad_accum": 1, "gradient_checkpointing": False,
            "optim_args": "rank=16, scale=0.25", "optim_target_modules": ["all-linear"], "steps": 6, "warmup": 2,
            "device": "auto", "seed": 0, "data": None, "extra": {}}
    key = config_key(base, "cpu")
    assert key == "374fb236cfbb983e", "config keys must never change: old results files are matched by them"
    same = {**base, "optim": "AdamW_Torch", "optim_args": "scale=0.25,rank=16", "optim_target_modules": "all-linear",
            "device": "cpu", "extra": {"unused": None}}
    assert config_key(same) == key
    assert config_key(base, "cuda") != key
    assert config_key({**base, "batch_size": 4}, "cpu") != key
    assert config_key({**base, "extra": {"memory_limit_bytes": 1 << 20}}, "cpu") != key
    record = {"config": base, "run": {"resolved_device": "cpu"}, "env": {"device": "cpu"}}
    assert record_key(record) == key
    assert config_label(base) == "adamw_torch tiny-llama b2xs64 fp32 [rank=16,scale=0.25]"


def test_units_of_sizes_and_shapes():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MB") == 512_000_000 and parse_size(1234) == 1234
    assert parse_size("1.5 mib") == 3 << 19
    assert parse_shape("4x128") == (4, 128)
    for bad in ("4 parsecs", "-1", "0"):
        with pytest.raises(UserError):
            parse_size(bad)
    with pytest.raises(UserError):
        parse_shape("4by128")


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    assert main(["sweep", "--optim", "sgd", "--find-max-batch", "--device", "cpu", "--out",
                 str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "needs --memory-limit" in err and len(err.strip().splitlines()) == 1
    assert main(["sweep", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no optimizers" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_dry_run_lists_what_resume_skips(capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--optim", "sgd", "adafactor", "--shape", "1x8", "--out", str(out), "--dry-run",
                 "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["configurations"]
    assert [p["action"] for p in planned] == ["run", "run"]
    assert {p["key"] for p in planned} == {config_key(c.to_dict(), "cpu") for c in grid_from_mapping(
        {"optim": ["sgd", "adafactor"], "shape": "1x8"}).configs()}


def test_yaml_file_with_command_line_overrides(capsys, tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text(f"optim: [adam-8bit, sgd]\nmodel: [tiny-llama, tiny-gpt2]\nshape: [2x64, 4x128]\n"
                 f"gradient_checkpointing: both\nmemory_limit: 64MiB\nout: {tmp_path / 'y.jsonl'}\n")
    assert main(["sweep", "--config", str(f), "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    planned = json.loads(out)
    # adam-8bit's FlashOptim members refuse fp32 parameters (master_weight_bits=24): left out, said so
    assert planned["out"] == str(tmp_path / "y.jsonl") and len(planned["configurations"]) == 5 * 2 * 2 * 2
    assert [ln.split(" (")[0] for ln in err.splitlines()] == ["bench sweep: note: leaving out flash_adamw",
                                                              "bench sweep: note: leaving out flash_adam"]
    assert all("limit 64.00 MiB" in p["label"] for p in planned["configurations"])
    assert main(["sweep", "--config", str(f), "--optim", "sgd", "--seq-len", "8", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["configurations"]
    assert len(planned) == 1 * 2 * 1 * 2 and all(p["label"].startswith("sgd ") for p in planned)
    f.write_text("optim: sgd\nbogus: 1\n")
    assert main(["sweep", "--config", str(f)]) == 2
    assert "unknown key(s) bogus" in capsys.readouterr().err


def test_resume_with_repeat_runs_what_is_missing(capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    plan = ["sweep", "--optim", "sgd", "adafactor", "--shape", "1x8", "--out", str(out), "--dry-run", "--json"]
    assert main(plan) == 0
    (sgd, _) = json.loads(capsys.readouterr().out)["configurations"]
    rec = json.loads(COMMITTED_RESULTS.read_text().splitlines()[0])
    rec["config"].update(optim="sgd", batch_size=1, seq_len=8)
    assert record_key(rec) == sgd["key"]
    out.write_text(json.dumps(rec) + "\n")
    assert main([*plan, "--resume", "--repeat", "3"]) == 0
    actions = [p["action"] for p in json.loads(capsys.readouterr().out)["configurations"]]
    assert actions == ["run 2x", "run 3x"]
    assert main([*plan, "--resume"]) == 0
    actions = [p["action"] for p in json.loads(capsys.readouterr().out)["configurations"]]
    assert actions == ["skip (recorded: ok)", "run"]


def test_memory_limit_turns_an_ok_record_into_oom(tmp_path):
    sweep = Sweep(SweepOptions(out=tmp_path / "r.jsonl", memory_limit=1000))
    rec = {"status": "ok", "reason": "", "measured": {"peak_bytes": 1001, "primary_tracker": "tensors"}, "run": {}}
    sweep.apply_memory_limit(rec)
    assert rec["status"] == "oom" and rec["reason"].startswith(OVER_LIMIT)
    assert rec["run"]["memory_limit"]["limit_bytes"] == 1000
    fits = {"status": "ok", "reason": "", "measured": {"peak_bytes": 1000}, "run": {}}
    sweep.apply_memory_limit(fits)
    assert fits["status"] == "ok"


# ------------------------------------------------------------------------------------------- real
@pytest.mark.slow
def test_sweep_killed_halfway_then_resumed(tmp_path, capsys):
    """6 optimizers x 2 shapes: killed with SIGKILL after a few records, the file holds only whole valid
    lines; --resume runs exactly the rest; one run per configuration in the end (sgd's two by a simulated
    out-of-memory, recorded as such while the sweep went on)."""
    out = tmp_path / "sweep.jsonl"
    expected = expected_keys()
    assert len(expected) == 12
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "optimem.harness.cli", *sweep_argv(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    workers: set[int] = set()
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            try:
                workers |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        workers |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        os.kill(proc.pid, signal.SIGKILL)  # the harshest interruption: no handler runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    # the workers of the killed sweep stop too (they watch their parent)
    for pid in workers:
        try:
            psutil.Process(pid).wait(timeout=15)
        except psutil.NoSuchProcess:
            pass
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers)

    before = read_lines(out)
    keys_before = [record_key(r) for r in before]
    assert 4 <= len(before) < 12
    assert len(set(keys_before)) == len(keys_before) and set(keys_before) <= set(expected)

    code = main([*sweep_argv(out), "--resume", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["counts"] == {"ok": 10, "oom": 2} and not summary["interrupted"]
    assert sum(r["reused"] for r in summary["runs"]) == len(before)
    assert "(recorded earlier)" in captured.err and "ETA" in captured.err

    after = read_lines(out)
    assert after[: len(before)] == before  # nothing rewritten
    keys = [record_key(r) for r in after]
    assert sorted(keys) == sorted(expected), "exactly one record per configuration"
    for rec in after:
        assert rec["run"]["config_key"] == record_key(rec)
        optim = expected[record_key(rec)]
        if optim == "sgd":
            assert rec["status"] == "oom" and "simulated out of memory" in rec["reason"]
        else:
            assert rec["status"] == "ok", rec["reason"]
            m = rec["measured"]
            assert m["peak_bytes"] > 0 and m["optimizer_state_bytes"] == rec["predicted"]["bytes"]["optimizer_state"]
    # a second --resume has nothing left to do
    assert main([*sweep_argv(out), "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"ok": 10, "oom": 2}
    assert len(read_lines(out)) == 12


@pytest.mark.slow
def test_find_max_batch_finds_the_boundary_under_a_memory_limit(tmp_path, capsys):
    out = tmp_path / "mb.jsonl"
    limit = parse_size("4.5MiB")
    argv = ["sweep", "--optim", "adamw_torch", "sgd", "--seq-len", "16", "--batch-size", "2", *FAST,
            "--find-max-batch", "--memory-limit", "4.5MiB", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    records = read_lines(out)
    by_batch = {(r["config"]["optim"], r["config"]["batch_size"]): r for r in records}
    assert len(by_batch) == len(records), "no batch size probed twice"
    summaries = {s["config"]["optim"]: s for s in result["max_batch"]}
    assert set(summaries) == {"adamw_torch", "sgd"}
    for optim, s in summaries.items():
        b = s["max_batch_size"]
        assert s["complete"] and not s["capped"] and b >= 2 and s["first_failing_batch"] == b + 1
        fit, too_big = by_batch[(optim, b)], by_batch[(optim, b + 1)]
        assert fit["status"] == "ok" and fit["measured"]["peak_bytes"] <= limit
        assert too_big["status"] == "oom" and too_big["measured"]["peak_bytes"] > limit
        assert too_big["reason"].startswith(OVER_LIMIT)
        assert s["runs"] == sum(1 for (o, _b) in by_batch if o == optim) <= 6
        assert s["peak_bytes_at_max"] == fit["measured"]["peak_bytes"]
    for rec in records:
        assert rec["config"]["extra"] == {"memory_limit_bytes": limit}
        assert rec["run"]["max_batch_probe"]["batch_size"] == rec["config"]["batch_size"]
    # sgd keeps no state: it fits a larger batch than AdamW
    assert summaries["sgd"]["max_batch_size"] > summaries["adamw_torch"]["max_batch_size"]
    lines = [json.loads(x) for x in max_batch_path(out).read_text().splitlines()]
    assert sorted(x["config"]["optim"] for x in lines) == ["adamw_torch", "sgd"]
    # resumed: the searches are recorded, nothing runs again
    assert main([*argv, "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {s["config"]["optim"]: s["max_batch_size"] for s in again["max_batch"]} == {
        k: v["max_batch_size"] for k, v in summaries.items()}
    assert len(read_lines(out)) == len(records)


# ------------------------------------------------------------------------------- search, simulated
def _fake_sweep(tmp_path, peak_of, *, limit=None, real_oom_above=None, cap=4096):
    """A Sweep whose runs are simulated: peak_of(batch) bytes; over real_oom_above a real OOM."""
    from optimem.harness.scenario import RunConfig

    sweep = Sweep(SweepOptions(out=tmp_path / "r.jsonl", memory_limit=limit, max_batch_cap=cap))
    ran: list[int] = []

    def run_one(cfg, label=None):
        ran.append(cfg.batch_size)
        b = cfg.batch_size
        rec = {"status": "ok", "reason": "", "config": cfg.to_dict(), "run": {}, "env": {},
               "measured": {"peak_bytes": int(peak_of(b)), "primary_tracker": "tensors"}}
        if real_oom_above is not None and b > real_oom_above:
            rec.update(status="oom", reason="out of memory in steady.backward: CUDA out of memory")
            rec["measured"]["peak_bytes"] = int(peak_of(real_oom_above) * 0.9)  # partial
        sweep.apply_memory_limit(rec)
        return rec

    sweep.run_one = run_one
    return sweep, ran, RunConfig(optim="adamw_torch", batch_size=2, seq_len=16, device="cpu")


@pytest.mark.parametrize("name,peak_of,limit,expected", [
    ("affine", lambda b: 4_000_000 + 700_000 * b, 9_000_000, 7),
    ("flat then affine", lambda b: max(4_000_000, 3_000_000 + 366_000 * b), 4_718_592, 4),
    ("convex", lambda b: 1_000_000 + 20_000 * b * b, 60_000_000, 54),
    ("nothing fits", lambda b: 10_000_000 * b, 5_000_000, 0),
    ("large", lambda b: 1_000 * b, 1_000_000, 1000),
])
def test_max_batch_search_finds_the_boundary(tmp_path, name, peak_of, limit, expected):
    sweep, ran, base = _fake_sweep(tmp_path, peak_of, limit=limit)
    emitted: list = []
    s = sweep.search(base, 2, emitted.append)
    assert s["max_batch_size"] == expected and s["complete"], (name, ran)
    assert s["first_failing_batch"] == expected + 1 and len(ran) == len(set(ran)) == s["runs"] == len(emitted)
    assert len(ran) <= 12, (name, ran)
    if expected:
        assert peak_of(expected) <= limit < peak_of(expected + 1)


def test_max_batch_search_by_real_oom_and_cap(tmp_path):
    sweep, ran, base = _fake_sweep(tmp_path, lambda b: 1000 * b, real_oom_above=37)
    s = sweep.search(base, 2, lambda item: None)
    assert (s["max_batch_size"], s["first_failing_batch"]) == (37, 38) and len(ran) <= 12
    sweep, ran, base = _fake_sweep(tmp_path, lambda b: 1000 * b, limit=10**9, cap=64)
    s = sweep.search(base, 2, lambda item: None)
    assert s["capped"] and s["max_batch_size"] == 64 and s["first_failing_batch"] is None and max(ran) == 64


def test_a_new_config_field_separates_keys_once_set():
    base = grid_from_mapping({"optim": "sgd"}).configs()[0].to_dict()
    assert config_key({**base, "attn_implementation": None}, "cpu") == config_key(base, "cpu")
    assert config_key({**base, "attn_implementation": "eager"}, "cpu") != config_key(base, "cpu")
