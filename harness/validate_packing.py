"""Padding-free packing and pad-to-longest checked against real runs: predicted vs measured peak.

    python -m optimem.harness.validate_packing --out results/packing_cpu.md

Each case is a real ``transformers.Trainer`` run of the harness on the CPU (``--padding-free --data FILE``, the
tensor accountant of ``bench run``, one compute thread, :data:`optimem.harness.validate.STEPS` steps) and the
estimate the run's record carries (:func:`optimem.harness.launcher.predict`: the worst micro-batch the file's samples
can make, packed), plus the harness's own term: the samples it holds in memory (int64 ids). Two data files are
written: every sample 48 tokens (each micro-batch is the worst one: prediction and measurement must agree), and
mixed lengths (the prediction is the worst micro-batch any draw can make: an upper bound of what the run drew).
A few tiny-llama rows run ``--group-by-length`` instead (the file's samples padded to the longest of each micro-batch,
drawn by the Trainer's ``LengthGroupedSampler``; predicted: batch x the longest sample).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from optimem.harness.units import human_bytes, md_table
from optimem.estimators.packing import samples
from optimem.harness.validate import STEPS, _frozen_gc, _one_thread, machine_facts, quiet_libraries
from optimem.harness.launcher import predict, run_in_process
from optimem.harness.run_config import RunConfig

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")
OPTIMIZERS = ("adamw_torch", "adafactor")
TOL = 0.01


@dataclass
class PackCase:
    model: str
    optim: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    data: str
    kind: str
    collator: str = "packed"  # "packed": DataCollatorWithFlattening; "grouped": group_by_length, pad to longest

    def config(self):
        return RunConfig(model=self.model, optim=self.optim, batch_size=self.batch_size, seq_len=self.seq_len,
                         gradient_checkpointing=self.gradient_checkpointing, steps=STEPS, warmup=1, device="cpu",
                         padding_free=self.collator == "packed", group_by_length=self.collator == "grouped",
                         data=self.data)


def write_data(folder: Path) -> dict[str, str]:
    """The two data files (see the module doc): ``uniform`` and ``mixed``."""
    rng = random.Random(0)
    files = {}
    for kind, lengths in (("uniform", [48] * 40), ("mixed", [rng.randint(8, 64) for _ in range(40)])):
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(n))}) + "\n"
                                for n in lengths))
        files[kind] = str(path)
    return files


def harness_bytes(case: PackCase) -> int:
    """The samples the harness holds: ``batch * steps`` of the file's samples in turn, int64 ids."""
    got = samples(case.data, case.seq_len)
    return sum(len(got[i % len(got)]) for i in range(case.batch_size * STEPS)) * 8


def run_case(case: PackCase) -> dict:
    with _one_thread(), _frozen_gc():
        payload = run_in_process(case.config(), track_tensors=True).payload
    if payload.get("status") != "ok":
        return {"case": case, "status": payload.get("status"), "reason": payload.get("reason", "")}
    measured = int(payload["measured"]["peaks"]["tensor_peak_bytes"])
    pred = predict(case.config())
    predicted = int(pred["bytes"]["peak"]) + harness_bytes(case)
    shape = f"{pred['batch_size']} x {pred['seq_len']}"
    return {"case": case, "status": "ok", "measured": measured, "predicted": predicted,
            "tokens": str(pred["batch_size"] * pred["seq_len"]) if case.collator == "packed" else shape}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the Markdown table here (default: print it)")
    p.add_argument("--quick", action="store_true", help="one model, one optimizer")
    args = p.parse_args(argv)

    quiet_libraries()
    with tempfile.TemporaryDirectory() as d:
        files = write_data(Path(d))
        models, optims = (MODELS[:1], OPTIMIZERS[:1]) if args.quick else (MODELS, OPTIMIZERS)
        cases = [PackCase(m, o, b, 64, gc, files[kind], kind) for m in models for o in optims for b in (2, 4)
                 for gc in (False, True) for kind in ("uniform", "mixed")]
        cases += [PackCase(MODELS[0], OPTIMIZERS[0], b, 64, gc, files[kind], kind, "grouped") for b in (2, 4)
                  for gc in (False, True) for kind in ("uniform", "mixed")]
        results = [run_case(c) for c in cases]
    rows, ok = [], 0
    for r in results:
        c = r["case"]
        if r["status"] != "ok":
            rows.append([c.model, c.optim, f"{c.batch_size} x <=64", "gc" if c.gradient_checkpointing else "", c.kind,
                         c.collator, "-", "-", "-", r["status"] + ": " + r["reason"][:80]])
            continue
        err = (r["predicted"] - r["measured"]) / r["measured"]
        good = abs(err) <= TOL if c.kind == "uniform" else -TOL <= err
        ok += good
        rows.append([c.model, c.optim, f"{c.batch_size} x <=64", "gc" if c.gradient_checkpointing else "", c.kind,
                     c.collator, r["tokens"], human_bytes(r["measured"]), human_bytes(r["predicted"]),
                     f"{100 * err:+.2f}%" + ("" if good else " (out of tolerance)")])
    facts = machine_facts()
    text = ("# Padding-free packing and pad-to-longest: predicted vs measured (CPU)\n\n"
            "Generated by `python -m optimem.harness.validate_packing"
            f"{' --quick' if args.quick else ''} --out FILE` on {facts['cpu']} ({facts['cpu_count']} cores, "
            f"{facts['platform']}; python {facts['python']}, torch {facts['torch']}, transformers "
            f"{facts['transformers']}, accelerate {facts['accelerate']}; optimem {facts['git_commit']}"
            f"{' + local changes' if facts['git_dirty'] else ''}): real Trainer runs with "
            "`DataCollatorWithFlattening` (collator packed) or `group_by_length=True` with each micro-batch padded to "
            "its longest sample (collator grouped), the tensor accountant's exact peak against the estimate of the "
            "worst micro-batch (worst column: packed tokens, or rows x padded length). uniform: every sample 48 tokens (must agree within "
            f"{100 * TOL:.0f}%); mixed: 8-64 tokens (the estimate is an upper bound of the draw, within {100 * TOL:.0f}%: "
            "a grouped micro-batch that holds padding makes SDPA take a materialized batch x seq x seq mask, which the "
            "estimate, traced with an all-ones attention_mask, does not hold).\n\n"
            f"{ok} of {len(results)} within tolerance.\n\n"
            + md_table(["model", "optimizer", "batch x seq", "checkpointing", "data", "collator", "worst", "measured",
                        "predicted", "error"], rows) + "\n")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
