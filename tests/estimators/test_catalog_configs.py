"""The bundled catalog's current configs: each one transformers builds (on the meta device) has its published
parameter count, and each says where it came from (estimators/configs/sources.json)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from optimem.estimators import build_inventory, catalog, estimate

SOURCES = json.loads((Path(__file__).resolve().parents[2] / "estimators/configs/sources.json").read_text())
MODELS = [name for name in SOURCES if not name.startswith("_")]
UNITS = {"K": 1e3, "M": 1e6, "B": 1e9}


def _within(count: int, published, match: str) -> bool:
    if match == "exact":
        return count == published
    m = re.fullmatch(r"(\d+(?:\.(\d+))?)([KMB])", published)
    value, unit = float(m.group(1)) * UNITS[m.group(3)], UNITS[m.group(3)]
    if match == "stated":  # the figure as published, rounded or cut at its last digit
        return abs(count - value) < unit / 10 ** len(m.group(2) or "")
    return abs(count - value) <= 0.01 * value  # nominal: the size in the name


def test_every_new_config_is_in_the_catalog_with_its_sources():
    assert len(MODELS) >= 20
    for name in MODELS:
        entry = SOURCES[name]
        assert name in catalog() and entry["config"] and entry["params_source"] and entry["match"] in (
            "exact", "stated", "nominal")
    families = {json.loads((Path(__file__).resolve().parents[2] / "estimators/configs" / catalog()[n]).read_text())
                ["model_type"] for n in MODELS}
    assert {"llama", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "mistral", "mixtral", "phi3", "deepseek_v2",
            "olmo2"} <= families


@pytest.mark.parametrize("name", MODELS)
def test_published_parameter_count(name):
    entry = SOURCES[name]
    count = build_inventory(name).num_params  # the real transformers class, built on the meta device
    assert _within(count, entry["params"], entry["match"]), (name, count, entry["params"])


@pytest.mark.slow


def test_new_configs_estimate():
    """A dense, a mixture-of-experts and a sliding-window model of the new entries go through the estimator."""
    for name in ("Qwen/Qwen3-0.6B", "Qwen3-30B-A3B", "gemma-3-1b-it"):
        est = estimate(name, "adamw_torch", seq_len=128, mixed_precision="bf16")
        assert est.bytes["optimizer_state"] == 8 * est.trainable_params + 4 * sum(
            1 for r in build_inventory(name).rows if r.trainable)  # exp_avg + exp_avg_sq, fp32; one step count each
        assert est.bytes["peak"] > est.bytes["weights"] + est.bytes["optimizer_state"]
