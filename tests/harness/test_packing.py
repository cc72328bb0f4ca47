"""Padding-free packing (issue 23): the worst micro-batch of a data file, and one real CPU Trainer run with
``DataCollatorWithFlattening`` whose exact tensor peak the estimate must meet (the full matrix is
``python -m optimem.harness.validate_packing``, results/packing_cpu.md)."""
from __future__ import annotations

import json

import pytest

from optimem.estimators import estimate
from optimem.estimators.packing import packed_seq_len, padded_worst, samples, worst_micro_batch


def test_worst_micro_batch(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": "x" * n}) + "\n" for n in (5, 70, 12, 1, 30)))
    lengths = [len(s) for s in samples(str(f), 64)]
    assert lengths == [5, 64, 12, 30]  # cut at seq_len; a one-token sample has nothing to learn and is dropped
    assert worst_micro_batch(lengths, 2) == 94 and packed_seq_len(94, 2) == 47 and packed_seq_len(95, 2) == 48


def test_packed_estimate_is_one_row():
    est = estimate("tiny-llama", "adamw_torch", seq_len=48, batch_size=2, device="cpu", padding_free=True)
    assert any("one row of 96 tokens" in n for n in est.notes)  # the shape the real run below is predicted at


@pytest.mark.slow
def test_padding_free_run_matches_the_estimate(tmp_path):
    from optimem.harness.validate_packing import PackCase, run_case, write_data

    files = write_data(tmp_path)
    r = run_case(PackCase("tiny-llama", "adamw_torch", 2, 64, False, files["uniform"], "uniform"))
    assert r["status"] == "ok", r.get("reason")
    assert abs(r["predicted"] - r["measured"]) <= 64  # bytes: the estimate is exact up to scalar bookkeeping


def test_group_by_length_run_matches_the_estimate(tmp_path):
    """--group-by-length: the Trainer's LengthGroupedSampler, each micro-batch padded to its longest; the estimate
    (batch x the file's longest sample) meets the exact tensor peak of a real run whose samples are all that long."""
    from optimem.harness.validate_packing import PackCase, run_case, write_data

    assert padded_worst([5, 64, 12, 30], 2) == (2, 64) and padded_worst([5, 9], 4) == (2, 9)
    files = write_data(tmp_path)
    r = run_case(PackCase("tiny-llama", "adamw_torch", 2, 64, False, files["uniform"], "uniform", "grouped"))
    assert r["status"] == "ok", r.get("reason")
    assert r["tokens"] == "2 x 48" and abs(r["predicted"] - r["measured"]) <= 64
