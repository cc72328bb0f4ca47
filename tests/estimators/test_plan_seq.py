"""``bench plan --max-seq``: the longest sequence that fits at a micro-batch, beside the micro-batch search."""
from __future__ import annotations

from dataclasses import replace

import pytest

from optimem.estimators import planner as P

from optimem.estimators import gpus as G

from optimem.estimators import step_memory as SM
from optimem.harness.cli import main


def test_longest_sequence_fits_and_one_more_token_does_not():
    setup = SM.plan_setup("tiny-llama", "adafactor", dtype="bf16", gradient_checkpointing=True)
    budget = SM.step_memory(replace(setup, seq_len=300), 1).peak
    n = SM.max_seq_len(setup, 1, budget)
    assert 300 <= n < SM.position_limit(setup) == 512
    assert SM.fits(replace(setup, seq_len=n), 1, budget) and not SM.fits(replace(setup, seq_len=n + 1), 1, budget)
    assert SM.max_seq_len(setup, 2, budget) < n  # twice the samples: a shorter sequence
    assert SM.max_seq_len(setup, 1, 1000) == 0  # not even one token
    assert SM.position_limit(SM.plan_setup("meta-llama/Llama-3.1-8B", "adafactor")) == 131072
    assert SM.position_limit(SM.plan_setup("tiny-t5", "adafactor")) == SM.MAX_SEQ  # relative positions: no limit


def test_tiny_model_reaches_its_position_limit():
    gpu = G.load_gpus()["h100-sxm"]
    row = P.plan_seq(SM.plan_setup("tiny-llama", "adamw_torch"), gpu, batch=1, checkpointing="off")
    assert row.max_seq_len == row.seq_limit == 512 and row.at_cap


def test_cli_max_seq_table_and_flag_checks(capsys):
    assert main(["plan", "--model", "tiny-gpt2", "--optim", "adamw_torch", "--gpus", "l4", "--max-seq",
                 "--batch-size", "4", "--gradient-checkpointing", "off"]) == 0
    out = capsys.readouterr().out
    assert "Longest sequence per GPU at micro-batch 4" in out and "512+" in out
    assert main(["plan", "--model", "tiny-gpt2", "--optim", "adamw_torch", "--batch-size", "4"]) == 2
    assert "--max-seq" in capsys.readouterr().err
