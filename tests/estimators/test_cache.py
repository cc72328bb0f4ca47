"""The on-disk cache (estimators/cache.py): entries are keyed by content + versions + setting, written
atomically, and a corrupt or stale entry is rebuilt, never trusted; a warm `bench estimate` / `bench plan`
imports neither torch nor transformers and prints exactly what a cold one does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optimem.estimators import cache, estimate
from optimem.estimators.estimate import _matched, _phase_model
from optimem.estimators.peak import forget_traces
from optimem.estimators.inventory import _inventory_cached, build_inventory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def fresh(tmp_path, monkeypatch):
    """An empty cache directory of its own, and no in-memory caches in front of it."""
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.ENV_OFF, raising=False)
    for f in (_inventory_cached, _phase_model, _matched):
        f.cache_clear()
    forget_traces()
    yield tmp_path / "cache"
    for f in (_inventory_cached, _phase_model, _matched):
        f.cache_clear()
    forget_traces()


class Builder:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_memo_stores_once_and_rebuilds_corrupt_or_stale_entries(fresh, monkeypatch):
    k = cache.key("demo", 1, config="abc", setting={"dtype": "bf16", "shape": (2, 3)})
    build = Builder({"x": [1, 2, 3]})
    assert cache.memo(k, build) == {"x": [1, 2, 3]} and build.calls == 1
    assert cache.memo(k, build) == {"x": [1, 2, 3]} and build.calls == 1  # from disk
    path = k.path()
    assert path.parent == fresh / "demo" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    stored = json.loads(path.read_text())
    assert stored["key"]["parts"] == {"config": "abc", "setting": {"dtype": "bf16", "shape": [2, 3]}}
    assert set(stored["key"]["versions"]) == {"torch", "transformers", "optimem", "source"}

    def rebuilt_after(damage) -> None:
        before = build.calls
        damage()
        assert cache.memo(k, build) == {"x": [1, 2, 3]} and build.calls == before + 1
        assert cache.get(k) == {"x": [1, 2, 3]}  # the entry was rewritten whole

    good = path.read_bytes()
    rebuilt_after(lambda: path.write_bytes(good[: len(good) // 2]))            # truncated
    rebuilt_after(lambda: path.write_bytes(os.urandom(300)))                  # garbage
    rebuilt_after(lambda: path.write_text(json.dumps({**stored, "key": {**stored["key"], "versions": {
        **stored["key"]["versions"], "torch": "0.0.1"}}})))                   # another key's document in the file
    rebuilt_after(lambda: path.write_text(json.dumps({**stored, "format": 99})))
    # a payload the caller's decoder rejects is rebuilt too
    strict = Builder(5)
    k2 = cache.key("demo", 1, config="int")
    cache.put(k2, "not an int")
    assert cache.memo(k2, strict, decode=lambda p: p if isinstance(p, int) else int("x")) == 5 and strict.calls == 1
    # a new torch (or transformers, optimem, estimator source) is another key: the old entry is not read
    real = cache.versions()
    monkeypatch.setattr(cache, "versions", lambda: {**real, "torch": "9.9.9"})
    k_new = cache.key("demo", 1, config="abc", setting={"dtype": "bf16", "shape": (2, 3)})
    assert k_new.digest != k.digest and cache.get(k_new) is None
    before = build.calls
    assert cache.memo(k_new, build) == {"x": [1, 2, 3]} and build.calls == before + 1


def test_arrays_round_trip_and_corrupt_npz_is_a_miss(fresh):
    k = cache.key("trace", 1, config="abc", setting="bf16 sdpa")
    arrays = {"peaks": np.arange(12, dtype=np.int64).reshape(3, 4), "names": np.array(["a", "bb"])}
    assert cache.put_arrays(k, arrays)
    got = cache.get_arrays(k)
    assert set(got) == {"peaks", "names"} and (got["peaks"] == arrays["peaks"]).all() and got["peaks"].dtype == np.int64
    data = k.path(".npz").read_bytes()
    k.path(".npz").write_bytes(data[:40])
    assert cache.get_arrays(k) is None
    k.path(".npz").write_bytes(b"PK\x03\x04" + os.urandom(100))
    assert cache.get_arrays(k) is None
    with pytest.raises(ValueError):
        cache.put_arrays(k, {"x": np.array([object()])})
    build = Builder({"peaks": np.ones(3, dtype=np.int64)})
    k2 = cache.key("trace", 1, config="memo")
    first = cache.memo_arrays(k2, build)
    second = cache.memo_arrays(k2, build, decode=lambda a: {"peaks": a["peaks"]})
    assert build.calls == 1 and (second["peaks"] == first["peaks"]).all()


def test_off_switch_and_unwritable_directory(fresh, monkeypatch, tmp_path):
    k = cache.key("demo", 1, config="off")
    monkeypatch.setenv(cache.ENV_OFF, "1")
    build = Builder(1)
    assert cache.memo(k, build) == 1 and cache.memo(k, build) == 1 and build.calls == 2
    assert not fresh.exists()
    monkeypatch.delenv(cache.ENV_OFF)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(cache.ENV_DIR, str(blocker / "cache"))  # cannot be created: values are still built
    assert cache.memo(k, build) == 1 and build.calls == 3 and not cache.put(k, 1)


@pytest.mark.slow


def test_inventory_and_estimates_from_cache_equal_rebuilt_ones(fresh, monkeypatch):
    cases = [("tiny-gpt2", "adamw_torch", {}), ("tiny-llama", "galore_adamw",
                                                {"optim_target_modules": r".*\.(q_proj|down_proj)", "dtype": "bf16"}),
             ("tiny-t5", "adafactor", {"gradient_checkpointing": True, "mixed_precision": "bf16", "batch_size": 3})]
    cold = {}
    for model, optim, kw in cases:
        cold[model] = (build_inventory(model), estimate(model, optim, **kw).to_dict())
    assert {p.parent.name for p in cache.entries()} == {"inventory", "trace", "phases", "targets"}
    for f in (_inventory_cached, _phase_model, _matched):
        f.cache_clear()
    forget_traces()
    import optimem.estimators.inventory as inventory_module

    def no_model(*a, **k):
        raise AssertionError("the inventory was rebuilt instead of read from the cache")

    monkeypatch.setattr(inventory_module, "instantiate", no_model)
    for model, optim, kw in cases:
        inv, est = cold[model]
        warm = build_inventory(model)
        assert warm is not inv and warm.rows == inv.rows and warm.linear_modules == inv.linear_modules
        assert (warm.model, warm.model_type, warm.architecture, warm.config_hash) == \
            (inv.model, inv.model_type, inv.architecture, inv.config_hash)
        assert estimate(model, optim, **kw).to_dict() == est
    # a damaged inventory entry is rebuilt, and gives the same numbers
    monkeypatch.undo()
    monkeypatch.setenv(cache.ENV_DIR, str(fresh))
    for p in cache.entries("inventory"):
        p.write_text("{}")
    _inventory_cached.cache_clear()
    assert build_inventory("tiny-gpt2").rows == cold["tiny-gpt2"][0].rows


def _python(code: str, cache_dir: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{cache.ENV_DIR: str(cache_dir)})
    env.pop(cache.ENV_OFF, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow


def test_warm_cli_imports_neither_torch_nor_transformers(fresh):
    runs = [["estimate", "--model", "meta-llama/Meta-Llama-3-8B", "--optim", "adamw_torch"],
            ["estimate", "--model", "gpt2", "--optim", "all", "--optim-target-modules", r".*attn.*", "--json"],
            ["plan", "--model", "Qwen/Qwen2.5-0.5B", "--gpus", "l4,h100", "--no-calibrate"]]
    code = ("import contextlib, io, json, sys\nfrom optimem.harness.cli import main\nouts = []\n"
            f"for argv in {runs!r}:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        assert main(argv) == 0\n"
            "    outs.append(buf.getvalue())\n"
            "print(json.dumps({'outs': outs, 'torch': 'torch' in sys.modules,\n"
            "                  'transformers': 'transformers' in sys.modules}))")
    cold = json.loads(_python(code, fresh))
    warm = json.loads(_python(code, fresh))
    assert cold["torch"] and cold["transformers"]  # the first process built the inventories
    assert not warm["torch"] and not warm["transformers"]
    assert warm["outs"] == cold["outs"]


def test_no_cache_flag_neither_reads_nor_writes(fresh, monkeypatch, capsys):
    from optimem.harness.cli import main

    monkeypatch.setenv(cache.ENV_OFF, "0")  # restored after the test: --no-cache sets it for the process
    argv = ["estimate", "--model", "tiny-llama", "--optim", "adafactor", "--json"]
    assert main(argv) == 0
    cached = capsys.readouterr().out
    assert cache.entries("trace")
    for p in cache.entries():
        p.write_text("{}")  # unusable: a read would be a miss and rewrite it
    for f in (_inventory_cached, _phase_model, _matched):
        f.cache_clear()
    forget_traces()
    assert main([*argv, "--no-cache"]) == 0
    assert capsys.readouterr().out == cached
    assert all(p.read_text() == "{}" for p in cache.entries())  # nothing written
