"""The zoo's case classes (harness/zoo.py): a setting the model does not take, refused alike by the Trainer and the
estimate, is an agreement ("unsupported"), not a failure, and a type is judged by its other cases."""
from __future__ import annotations

from optimem.harness.zoo import UNSUPPORTED, classify, render


def test_a_setting_both_refuse_is_unsupported_not_failed():
    reason = "ValueError in setup: CTRLLMHeadModel does not support activation checkpointing."
    assert classify("error", reason, "ctrl.json: CTRLLMHeadModel does not support activation checkpointing.",
                    "user", None) == UNSUPPORTED
    # the model failing inside its step while the estimate refused for a reason of its own stays a failure
    assert classify("error", "RuntimeError in step0.forward: boom", "bad flag", "user", None) == "failed"
    assert classify("ok", "", None, None, 0.0004) == "exact"
    assert classify("ok", "", None, None, -0.02) == "outside 1%"


def test_a_type_is_judged_by_its_supported_cases():
    rows = {
        "ctrl|causal-lm|adamw_torch|nogc": {"type": "ctrl", "task": "causal-lm", "optim": "adamw_torch", "gc": False,
                                            "class": "exact", "peak_error": 0.0, "measured_peak": 1000},
        "ctrl|causal-lm|adamw_torch|gc": {"type": "ctrl", "task": "causal-lm", "optim": "adamw_torch", "gc": True,
                                          "class": UNSUPPORTED, "estimate_error": "does not support checkpointing"},
    }
    facts = {"cpu": "x", "cpu_count": 2, "torch": "t", "transformers": "v", "git_commit": "c"}
    table, data = render(rows, facts, "cmd", ("causal-lm",))
    assert data["summary"]["causal-lm"]["exact"] == 1 and data["summary"]["causal-lm"]["run"] == 1
    assert "| ctrl | adamw_torch | on | unsupported |" in table
