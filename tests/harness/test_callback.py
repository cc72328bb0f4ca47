"""MemoryCallback in a real transformers Trainer on CPU: it predicts before training, measures the first steps with
the harness's trackers, writes a schema-v2 record that `bench plot` draws, and leaves nothing in the loop."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optimem.estimators import estimate
from optimem.estimators.catalog import resolve
from optimem.harness.callback import MemoryCallback
from optimem.harness.record import read_records, validate

SEQ = 32


def _trainer(tmp_path, *, steps: int, batch: int = 2, accum: int = 1, seq: int = SEQ, model=None):
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from optimem.harness.scenario import SyntheticTokens

    torch.manual_seed(0)
    if model is None:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**resolve("tiny-llama").load()))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, max_steps=steps, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, optim="adamw_torch",
                             dataloader_num_workers=0)
    data = SyntheticTokens(batch * accum * steps, seq, model.config.vocab_size, 0, False)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator), args


@pytest.mark.slow


def test_callback_in_a_real_trainer_writes_a_record_bench_plot_draws(tmp_path, capsys):
    from optimem.harness.cli import main

    trainer, args = _trainer(tmp_path, steps=5, accum=2)
    lines: list[str] = []
    cb = MemoryCallback(seq_len=SEQ, steps=3, log=lines.append)
    trainer.add_callback(cb)
    trainer.train()

    # predicted before the first step, from the Trainer's own model and arguments
    assert lines[0].startswith("optimem: predicted for LlamaForCausalLM#") and "adamw_torch" in lines[0]
    same = estimate(trainer.model, args, seq_len=SEQ)
    assert cb.estimate.bytes == same.bytes
    assert same.setup.batch_size == 2 and same.setup.grad_accum == 2 and same.setup.device == "cpu"

    # the record: bench run's schema, measured by phase over the first 3 steps, at <output_dir>/optimem.jsonl
    path = Path(args.output_dir) / "optimem.jsonl"
    assert cb.saved_to == str(path) and "record appended to" in lines[-1]
    (rec,) = list(read_records(path))
    validate(rec)
    assert rec["schema_version"] == 2 and rec["status"] == "ok" and rec["run"]["source"] == "callback"
    m = rec["measured"]
    assert list(m["phases"]) == ["step0.forward", "step0.backward", "step0.optimizer_step", "steady.forward",
                                 "steady.backward", "steady.optimizer_step"]
    assert m["steps_completed"] == 3 and m["phases"]["steady.forward"]["occurrences"] == 4  # 2 steps x accum 2
    assert m["primary_tracker"] == "rss" and m["peak_bytes"] >= m["phases"]["step0.backward"]["peak_bytes"] > 0
    assert m["optimizer_state_bytes"] == rec["predicted"]["bytes"]["optimizer_state"]  # the walked AdamW state
    assert m["parameters_bytes"] == rec["predicted"]["bytes"]["weights"]
    assert rec["config"]["steps"] == 3 and rec["config"]["grad_accum"] == 2 and rec["config"]["batch_size"] == 2

    # bench plot reads the user's run like any other
    capsys.readouterr()  # the Trainer's own printing
    assert main(["plot", str(path), "--out", str(tmp_path / "plots"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completed"] == 1
    for name in ("predicted_vs_measured", "memory_breakdown"):
        assert Path(out["files"][name]).stat().st_size > 10_000


def test_after_its_steps_nothing_is_left(tmp_path):
    trainer, _ = _trainer(tmp_path, steps=4)
    model = trainer.model
    hooks_before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    cb = MemoryCallback(seq_len=SEQ, steps=2, save=False, log=lambda s: None)
    trainer.add_callback(cb)
    seen_active = []
    orig = cb.on_step_end

    def spy(*a, **k):
        seen_active.append(cb._active)
        return orig(*a, **k)

    cb.on_step_end = spy
    trainer.train()
    assert seen_active == [True, True, False, False]  # measuring for 2 steps, then returning at once
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert cb._run is None and cb._phases is None and cb.record["status"] == "ok"


def test_shape_that_ran_wins_and_a_misfit_warns(tmp_path, monkeypatch):
    trainer, _ = _trainer(tmp_path, steps=2, seq=48)
    lines: list[str] = []
    cb = MemoryCallback(seq_len=SEQ, steps=2, save=False, log=lines.append)
    trainer.add_callback(cb)
    monkeypatch.setattr(MemoryCallback, "_device_total", staticmethod(lambda device: 1 << 20))  # a 1 MiB device
    with pytest.warns(ResourceWarning, match="will not fit"):
        trainer.train()
    assert any(ln.startswith("optimem: WARNING: this run will not fit: predicted peak") for ln in lines), lines
    assert cb.record["config"]["seq_len"] == 48 and cb.record["predicted"]["seq_len"] == 48
    assert any("48 tokens" in ln for ln in lines)

    with pytest.raises(Exception, match="seq_len must be a positive integer"):
        MemoryCallback(seq_len=0)


@pytest.mark.slow


def test_readme_example_script_runs(tmp_path, monkeypatch, capsys):
    """The README's own-training-script example, as written, with only its model swapped for a local tiny one (a
    directory holding tiny-llama's config.json: AutoConfig.from_pretrained reads it like a Hub id's)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## In your own training script", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(resolve("tiny-llama").load()))
    script, n = re.subn(r'^MODEL, SEQ = .*$', f'MODEL, SEQ = {str(model_dir)!r}, {SEQ}', script, flags=re.M)
    assert n == 1 and "trainer.add_callback(MemoryCallback(" in script
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "optimem: predicted for" in out and "record appended to out/optimem.jsonl" in out
    (rec,) = list(read_records(tmp_path / "out" / "optimem.jsonl"))
    assert rec["status"] == "ok" and rec["config"]["grad_accum"] == 2 and rec["config"]["seq_len"] == SEQ
