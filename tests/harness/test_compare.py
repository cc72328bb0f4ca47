"""`bench compare`: identical results pass, one run's peak raised by 2% fails, environment mismatches are
refused (or listed when allowed), missing/new configurations are listed, throughput is gated on a minimum
effect and a significance test of the per-step times."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from conftest import COMMITTED_RESULTS
from optimem.harness.cli import main
from optimem.harness.compare import Tolerances, compare_records, mann_whitney_greater
from optimem.harness.grid import config_label
from optimem.harness.results import load_records



def committed() -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in load_records(COMMITTED_RESULTS)]


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def first_ok(records: list[dict]) -> int:
    return next(i for i, r in enumerate(records) if r["status"] == "ok")


@pytest.fixture()
def base(tmp_path):
    records = committed()
    return records, write(tmp_path / "base.jsonl", records)


def bench(capsys, *argv):
    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_identical_files_pass(base, capsys, tmp_path):
    records, path = base
    md = tmp_path / "summary.md"
    code, out, err = bench(capsys, path, path, "--markdown", str(md))
    assert code == 0, out + err
    assert "OK: no regressions" in out
    assert md.read_text().startswith("## ✅ optimem benchmark comparison: no regressions")


def test_peak_raised_by_two_percent_fails(base, capsys, tmp_path):
    records, path = base
    current = copy.deepcopy(records)
    i = first_ok(current)
    current[i]["measured"]["peak_bytes"] = int(current[i]["measured"]["peak_bytes"] * 1.02)
    cur = write(tmp_path / "cur.jsonl", current)
    md = tmp_path / "summary.md"
    code, out, err = bench(capsys, path, cur, "--markdown", str(md))
    assert code == 1, out + err
    label = config_label(current[i]["config"])
    text = md.read_text()
    assert text.startswith("## ❌ optimem benchmark comparison: 1 regression")
    regressions = text.split("### Regressions", 1)[1].split("###", 1)[0]
    assert label in regressions and "peak memory" in regressions and "+2.00%" in regressions
    assert "FAIL: 1 regression" in out
    code, out, _ = bench(capsys, path, cur, "--json")
    assert code == 1 and json.loads(out)["regressions"] == 1
    # within a looser tolerance it passes; a 0.5% rise passes the default 1%
    assert bench(capsys, path, cur, "--memory-tolerance", "3")[0] == 0
    current[i]["measured"]["peak_bytes"] = int(records[i]["measured"]["peak_bytes"] * 1.005)
    assert bench(capsys, path, write(tmp_path / "cur2.jsonl", current))[0] == 0


def test_environment_mismatch_is_refused_unless_allowed(base, capsys, tmp_path):
    records, path = base
    current = copy.deepcopy(records)
    for r in current:
        r["env"]["torch"] = "2.99.0+cpu"
    cur = write(tmp_path / "cur.jsonl", current)
    md = tmp_path / "summary.md"
    code, out, err = bench(capsys, path, cur, "--markdown", str(md))
    assert code == 2
    assert "different environments (torch)" in err and len(err.strip().splitlines()) == 1
    assert "not compared" in md.read_text() and "2.99.0+cpu" in md.read_text()
    code, out, err = bench(capsys, path, cur, "--allow-env-mismatch", "--markdown", str(md))
    assert code == 0, out + err
    assert "### Environment differences (allowed)" in md.read_text()
    # an optimizer package version counts too
    current = copy.deepcopy(records)
    current[first_ok(current)]["env"]["optimizer_package"]["version"] = "0.0.1"
    assert bench(capsys, path, write(tmp_path / "cur3.jsonl", current))[0] == 2


def test_missing_and_new_configs_are_listed_not_errors(base, capsys, tmp_path):
    records, path = base
    current = copy.deepcopy(records)
    dropped = current.pop(0)
    extra = copy.deepcopy(current[0])
    extra["config"]["seed"] = 123
    current.append(extra)
    md = tmp_path / "summary.md"
    code, out, err = bench(capsys, path, write(tmp_path / "cur.jsonl", current), "--markdown", str(md))
    assert code == 0, out + err
    text = md.read_text()
    assert "### Missing from current (1)" in text and config_label(dropped["config"]) in text
    assert "### New in current (1)" in text


def test_a_run_that_now_fails_is_a_regression(base, capsys, tmp_path):
    records, path = base
    current = copy.deepcopy(records)
    i = first_ok(current)
    current[i].update(status="oom", reason="out of memory in steady.backward: CUDA out of memory")
    code, out, _ = bench(capsys, path, write(tmp_path / "cur.jsonl", current), "--markdown", "-")
    assert code == 1
    assert "now oom" in out and "❌" in out


def _with_step_times(record: dict, times: list[float]) -> dict:
    r = copy.deepcopy(record)
    tp = r["measured"]["throughput"]
    tp["warmup_steps"] = 2
    tp["all_step_times_s"] = [1.0, 1.0] + times
    return r


def test_throughput_needs_effect_and_significance():
    rec = next(r for r in committed() if r["status"] == "ok")
    tol = Tolerances(throughput_pct=10.0)
    base = [_with_step_times(rec, [0.100, 0.102, 0.098, 0.101, 0.099, 0.100])]

    def verdict(times):
        cmp = compare_records(base, [_with_step_times(rec, times)], tol)
        (f,) = [f for f in cmp.findings if f.metric == "tokens_per_s"]
        return f.verdict, f

    v, f = verdict([0.130, 0.131, 0.129, 0.133, 0.128, 0.130])  # 30% slower, every step
    assert v == "regression" and f.p_value < 0.01 and f.change_pct < -20
    assert verdict([0.104, 0.105, 0.103, 0.104, 0.106, 0.104])[0] == "ok"  # significant but below the 10% effect
    assert verdict([0.100, 0.200, 0.098, 0.101, 0.300, 0.099])[0] == "ok"  # median unmoved: noise, not slowdown
    assert verdict([0.07, 0.071, 0.069, 0.07, 0.072, 0.07])[0] == "improvement"
    # too few samples: reported, not gated
    cmp = compare_records([_with_step_times(rec, [0.1, 0.1])], [_with_step_times(rec, [0.5, 0.5])], tol)
    (f,) = [f for f in cmp.findings if f.metric == "tokens_per_s"]
    assert f.verdict == "inconclusive" and cmp.exit_code() == 0


def test_mann_whitney_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for n1, n2 in ((4, 4), (5, 7), (3, 9), (30, 40)):
        x = [rng.gauss(1.1, 0.1) for _ in range(n1)]
        y = [rng.gauss(1.0, 0.1) for _ in range(n2)]
        method = "exact" if n1 + n2 < 20 else "asymptotic"
        ref = stats.mannwhitneyu(x, y, alternative="greater", method=method).pvalue
        assert mann_whitney_greater(x, y) == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert mann_whitney_greater([2, 3, 4, 5], [0, 0.5, 1, 1.5]) == pytest.approx(1 / 70)


def test_repeated_runs_are_the_throughput_samples():
    """With several runs per configuration on both sides, each run's median step time is one sample, so
    run-to-run noise is in the test."""
    rec = next(r for r in committed() if r["status"] == "ok")
    tol = Tolerances(throughput_pct=10.0)

    def runs(medians):
        return [_with_step_times(rec, [m * 0.99, m, m * 1.01, m]) for m in medians]

    base = runs([0.100, 0.104, 0.097, 0.101])
    cmp = compare_records(base, runs([0.130, 0.128, 0.133, 0.131]), tol)
    (f,) = [f for f in cmp.findings if f.metric == "tokens_per_s"]
    assert f.verdict == "regression" and "over 4 runs" in f.note
    # one slow run among normal ones: the median moved 15% but the runs overlap: not significant
    cmp = compare_records(base, runs([0.096, 0.140, 0.103, 0.136]), tol)
    (f,) = [f for f in cmp.findings if f.metric == "tokens_per_s"]
    assert f.verdict == "ok" and "not significant" in f.note
    # memory is compared on the last record of each side
    assert {f.metric for f in cmp.findings} == {"peak_bytes", "optimizer_state_bytes", "tokens_per_s"}


def test_the_fullest_node_of_a_multi_node_run_is_compared():
    records = committed()
    base = copy.deepcopy(records[first_ok(records)])
    base["distributed"] = {"nodes": {"measured": [{"node": "a", "peak_bytes_sum": 1000},
                                                  {"node": "b", "peak_bytes_sum": 900}]}}
    cur = copy.deepcopy(base)
    cur["distributed"]["nodes"]["measured"][1]["peak_bytes_sum"] = 1050  # node b is now the fullest: +5%
    found = [f for f in compare_records([base], [cur]).findings if f.metric == "node_peak_bytes"]
    assert [(f.baseline, f.current, f.verdict) for f in found] == [(1000, 1050, "regression")]
    assert not [f for f in compare_records(records, records).findings if f.metric == "node_peak_bytes"]
