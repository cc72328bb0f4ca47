"""`bench plot`: non-empty PNGs and a report from the committed results; robust to files with no completed run."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import COMMITTED_RESULTS, ROOT
from optimem.harness.cli import main
from optimem.harness.plots import pareto_front
from optimem.estimators.categories import BREAKDOWN
from optimem.harness.results import load_records, measured_parts, to_frame

FIGURES = ("predicted_vs_measured", "memory_breakdown", "throughput_vs_memory")


def committed_results() -> Path:
    """The committed results file the README's figures come from (never a user's results/runs.jsonl)."""
    return COMMITTED_RESULTS


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_drawn(path: Path) -> None:
    """A real picture: big enough, and not one flat colour."""
    import matplotlib.image as mpimg

    w, h = png_size(path)
    assert w >= 600 and h >= 300 and path.stat().st_size > 20_000
    pixels = mpimg.imread(path)
    assert pixels.std() > 0.05


@pytest.mark.slow


def test_plot_reads_multi_process_records(tmp_path, capsys):
    """The committed multi-process file plots too (per-rank predictions; failed FSDP2 runs listed)."""
    src = ROOT / "results" / "cpu-amd-epyc-2026-12-02-distributed.jsonl"
    assert main(["plot", str(src), "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    df = to_frame(load_records(src))
    assert out["records"] == len(df) and (df.num_processes == 2).all()
    ok = df[df.status == "ok"]
    assert (ok.peak_error_pct.abs() < 1).all()  # against the planner's per-rank peak


@pytest.mark.slow


def test_plot_committed_results(tmp_path, capsys):
    src = committed_results()
    assert main(["plot", str(src), "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    files = {k: Path(v) for k, v in out["files"].items()}
    assert set(files) >= set(FIGURES) | {"report"}
    for name in FIGURES:
        assert_drawn(files[name])
    report = files["report"].read_text()
    for name in FIGURES:
        assert f"]({name}.png)" in report
    df = to_frame(load_records(src))
    assert out["records"] == len(df) and out["completed"] == int((df.status == "ok").sum()) >= 16
    table_rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "optimizer" not in ln]
    assert len(table_rows) >= len(df)
    assert len(set(df["family"])) >= 8


def test_measured_breakdown_adds_up_to_the_peak():
    """The stacked bars are the tensor accountant's breakdown at the peak: they sum to the measured peak."""
    for rec in load_records(committed_results()):
        if rec["status"] != "ok":
            continue
        parts = measured_parts(rec)
        assert set(parts) == set(BREAKDOWN)
        assert sum(parts.values()) == rec["measured"]["peak_bytes"]
        assert parts["optimizer_state"] <= rec["measured"]["optimizer_state_bytes"]


def test_plot_without_completed_runs_still_writes_figures(tmp_path, capsys):
    rec = next(r for r in load_records(committed_results()) if r["status"] == "ok")
    rec = {k: v for k, v in rec.items() if not k.startswith("_")}
    failed = dict(rec, status="oom", reason="out of memory in step0.forward: simulated", measured=None)
    skipped = dict(rec, status="skipped", reason="needs CUDA", measured=None,
                   config=dict(rec["config"], optim="flash_adamw"))
    src = tmp_path / "failed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in (failed, skipped)))
    assert main(["plot", str(src), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "2 configurations (0 completed)" in out
    for name in FIGURES:
        assert png_size(tmp_path / "plots" / f"{name}.png")[0] > 0
    assert "did not complete" in (tmp_path / "plots" / "report.md").read_text()


def test_plot_bad_input(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such results file" in capsys.readouterr().err


@pytest.mark.parametrize("points,front", [
    ([(1, 10, "a"), (2, 20, "b"), (3, 15, "c"), (0.5, 5, "d")], ["d", "a", "b"]),
    ([(1, 10, "a"), (1, 12, "b")], ["b"]),
    ([(5, 1, "a")], ["a"]),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_predicted_peak_uses_the_whole_step_estimate_when_there_is_one():
    from optimem.harness.results import predicted_parts, predicted_peak

    parts_only = {"predicted": {"bytes": {"weights": 10, "gradients": 10, "optimizer_state": 20}}}
    assert predicted_peak(parts_only) == (40, False)
    whole = {"predicted": {"bytes": {"weights": 10, "gradients": 10, "optimizer_state": 20, "activations": 30,
                                     "peak": 100}}}
    assert predicted_peak(whole) == (100, True)
    assert predicted_parts(whole)["other"] == 30
    cuda = {"predicted": {"bytes": {"weights": 1, "gradients": 1, "optimizer_state": 9, "optimizer_state_device": 5}},
            "run": {"resolved_device": "cuda"}}
    assert predicted_parts(cuda)["optimizer_state"] == 5
    phased = {"predicted": {"bytes": {"weights": 10, "gradients": 10, "optimizer_state": 20, "activations": 30,
                                      "peak": 90},
                            "peak_phase": "steady.backward",
                            "phases": {"steady.backward": {"peak": 90, "weights": 10, "gradients": 0,
                                                           "optimizer_state": 20, "activations": 25,
                                                           "temporaries": 30, "other": 5}}}}
    assert predicted_parts(phased) == {"weights": 10, "gradients": 0, "optimizer_state": 20, "activations": 25,
                                       "other": 35}
    assert sum(predicted_parts(phased).values()) == predicted_peak(phased)[0]
