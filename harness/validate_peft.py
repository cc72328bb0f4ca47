"""Check LoRA / QLoRA estimates against real peft models trained by the Trainer on the CPU, on a matrix.

    python -m optimem.harness.validate_peft --out results/peft_exact_cpu.md --json results/peft_exact_cpu.json
    python -m optimem.harness.validate_peft --quick          # one adapter setting per architecture and optimizer

Each case is the peft model ``bench run`` trains (``optimem.harness.scenario.build_trainer``: the plain model with
seeded random weights; quantized, saved and loaded back with ``BitsAndBytesConfig`` on the CPU, then
``prepare_model_for_kbit_training``; ``get_peft_model``), trained 2 steps by the real ``transformers.Trainer``.
Compared, to the byte / the parameter:

* trainable parameters: ``estimate().trainable_params`` vs peft's ``get_nb_trainable_parameters()`` of the
  trained model;
* weights: ``estimate().bytes["weights"]`` vs the unique storage bytes of the trained model's parameters and
  bitsandbytes' quantization state (absmax, codes, nested statistics, 8-bit row scales);
* optimizer state: ``estimate().bytes["optimizer_state"]`` vs every tensor the optimizer keeps
  (``optimem.harness.state_walker``).

The whole-step peak of these setups is compared by ``python -m optimem.harness.validate --peft`` (the LoRA/QLoRA
section of ``results/peak_error_cpu.md``).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict, dataclass, field

from optimem.estimators import estimate
from optimem.estimators.errors import one_line
from optimem.harness.compat import prepare_run
from optimem.harness.launcher import skip_reason
from optimem.harness.process import quiet_libraries
from optimem.harness.run_config import RunConfig
from optimem.harness.validate import machine_facts, write_outputs

MODELS = ("tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-qwen2")
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "adafactor", "lomo")
RANKS = (8, 64)
TARGETS = ("all-linear", "attention")
ATTENTION = {"tiny-llama": r".*self_attn\.(q|k|v|o)_proj", "tiny-qwen2": r".*self_attn\.(q|k|v|o)_proj",
             "tiny-gpt2": r".*\.attn\.(c_attn|c_proj)", "tiny-t5": r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)"}
"""Attention-only targets per architecture: regexes over whole module names, as peft matches a string."""
QUANTS = (None, "nf4", "int8")
STEPS = 2


@dataclass
class Case:
    model: str
    optim: str
    r: int
    target: str
    dora: bool
    quantize: str | None

    @property
    def lora(self) -> str:
        target = "all-linear" if self.target == "all-linear" else ATTENTION[self.model]
        return f"r={self.r},target={target}" + (",dora=true" if self.dora else "")

    @property
    def label(self) -> str:
        q = f" {self.quantize}" + (" dq" if self.quantize in ("nf4", "fp4") else "") if self.quantize else ""
        return f"{self.model} {self.optim} r{self.r} {self.target}{' dora' if self.dora else ''}{q}"

    def config(self):
        return RunConfig(model=self.model, optim=self.optim, lora=self.lora, quantize=self.quantize,
                         double_quant=self.quantize in ("nf4", "fp4"), batch_size=2, seq_len=16, steps=STEPS,
                         warmup=1, device="cpu")


@dataclass
class Result:
    case: Case
    status: str
    measured: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""

    @property
    def exact(self) -> bool:
        return self.status == "ok" and self.measured == self.predicted


def matrix(models=MODELS, optimizers=OPTIMIZERS, quick: bool = False) -> list[Case]:
    """Every architecture x optimizer x rank x target x DoRA x quantization (``quick``: the adapter settings
    rotated, one per architecture and optimizer, each quantization once per architecture)."""
    if not quick:
        return [Case(m, o, r, t, d, q) for m, o, r, t, d, q in
                itertools.product(models, optimizers, RANKS, TARGETS, (False, True), QUANTS)]
    adapters = list(itertools.product(RANKS, TARGETS, (False, True)))
    out = []
    for i, m in enumerate(models):
        for j, o in enumerate(optimizers):
            r, t, d = adapters[(i + 3 * j) % len(adapters)]
            out.append(Case(m, o, r, t, d, QUANTS[(i + j) % len(QUANTS)]))
    return out


def run_case(case: Case) -> Result:
    """Train the case, measure, estimate."""
    import torch  # lazy: pulls in torch, which importing this module does not

    # lazy: pulls in torch, which importing this module does not
    from optimem.harness.scenario import build_trainer, remove_printer_callback, unwrap_optimizer
    # lazy: pulls in torch, which importing this module does not
    from optimem.harness.state_check import adapter_fields, weight_storage_bytes
    # lazy: pulls in torch, which importing this module does not
    from optimem.harness.state_walker import measure_optimizer_state

    t0 = time.perf_counter()
    cfg = case.config()
    reason = skip_reason(cfg, "cpu")
    if reason:
        return Result(case, "skipped", reason=reason)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare_run(cfg.optim, "cpu")
        trainer = build_trainer(cfg)
        remove_printer_callback(trainer)
        trainer.train()
        model = trainer.model
        state = measure_optimizer_state(unwrap_optimizer(trainer.optimizer), exclude=list(model.parameters()))
        measured = {"trainable_params": int(model.get_nb_trainable_parameters()[0]),
                    "weights": weight_storage_bytes(model), "optimizer_state": int(state.total)}
    except Exception as exc:  # noqa: BLE001 - a failed case is a row of the table
        return Result(case, "error", reason=one_line(exc, 200 + len(type(exc).__name__) + 2, kind=True),
                      seconds=time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    est = estimate(cfg.model, cfg.optim, **adapter_fields(cfg))
    predicted = {"trainable_params": est.trainable_params, "weights": est.bytes["weights"],
                 "optimizer_state": est.bytes["optimizer_state"]}
    return Result(case, "ok", measured, predicted, time.perf_counter() - t0)


def render(results: list[Result], facts: dict, command: str, seconds: float) -> str:
    ran = [r for r in results if r.status == "ok"]
    exact = sum(r.exact for r in ran)
    skipped = [r for r in results if r.status == "skipped"]
    lines = ["# LoRA / QLoRA: estimate vs real peft models on CPU", "", f"Regenerate: `{command}`", "",
             f"Machine: {facts['cpu']} ({facts.get('cpu_count', '?')} cores; runs use 1 thread), {facts['platform']}; "
             f"Python {facts['python']}, torch {facts['torch']}, transformers {facts['transformers']}, peft "
             f"{facts['peft']}, bitsandbytes {facts['bitsandbytes']}; commit {facts['git_commit'] or 'unknown'}"
             + (" plus uncommitted changes" if facts.get("git_dirty") else "") + f"; {seconds:.0f} s.", "",
             "Each case trains the peft model `bench run` trains for 2 steps with the real `transformers.Trainer` "
             "on the CPU (quantized cases: `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` on "
             "the CPU, `prepare_model_for_kbit_training`, then `get_peft_model`; nf4 with double quantization). "
             "Measured: peft's `get_nb_trainable_parameters()`, the unique storage of every parameter and of "
             "bitsandbytes' quantization state, and every tensor the optimizer keeps. Predicted: "
             "`optimem.estimators.estimate()` of the same setup (the peft model built on the meta device). "
             "Attention-only targets are regexes over whole module names. The whole-step peak of LoRA/QLoRA setups "
             "is compared in `results/peak_error_cpu.md` (`python -m optimem.harness.validate --peft`).", "",
             f"**{exact} of {len(ran)} cases exact** in all three figures ({len(results)} cases; {len(skipped)} "
             f"skipped on CPU; {len(results) - len(ran) - len(skipped)} failed).", ""]
    if skipped:
        lines += [f"Skipped: {skipped[0].reason} ({len(skipped)} cases: DoRA x int8).", ""]
    lines += ["| case | trainable params | weights (bytes) | optimizer state (bytes) | status |",
              "| --- | ---: | ---: | ---: | --- |"]
    for r in results:
        if r.status == "skipped":
            continue
        if r.status != "ok":
            lines.append(f"| {r.case.label} | | | | error: {r.reason[:100]} |")
            continue
        m, p = r.measured, r.predicted
        cell = {k: f"{m[k]:,}" if m[k] == p[k] else f"{m[k]:,} measured, {p[k]:,} predicted" for k in m}
        lines.append(f"| {r.case.label} | {cell['trainable_params']} | {cell['weights']} | "
                     f"{cell['optimizer_state']} | {'exact' if r.exact else '**differs**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimem.harness.validate_peft", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--json", help="write every case's figures here as JSON")
    p.add_argument("--quick", action="store_true", help="the adapter settings rotated (16 cases)")
    p.add_argument("--model", action="append", help="only these models (repeatable)")
    p.add_argument("--optim", action="append", help="only these optimizers (repeatable)")
    args = p.parse_args(argv)
    quiet_libraries("peft")
    cases = matrix(tuple(args.model or MODELS), tuple(args.optim or OPTIMIZERS), quick=args.quick)
    t0 = time.perf_counter()
    results = []
    for case in cases:
        r = run_case(case)
        results.append(r)
        tag = {"ok": "ok " if r.exact else "DIF", "skipped": "skp"}.get(r.status, "ERR")
        print(f"{tag} {case.label:50s} {r.measured if r.status == 'ok' else r.reason} ({r.seconds:.1f} s)",
              file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    command = ("python -m optimem.harness.validate_peft" + (" --quick" if args.quick else "")
               + "".join(f" --model {m}" for m in args.model or []) + "".join(f" --optim {o}" for o in args.optim or [])
               + (f" --out {args.out}" if args.out else "") + (f" --json {args.json}" if args.json else ""))
    facts = machine_facts()
    write_outputs(args, render(results, facts, command, seconds), {"facts": facts, "results": [
        {**asdict(r.case), "lora": r.case.lora, "status": r.status, "measured": r.measured,
         "predicted": r.predicted, "reason": r.reason} for r in results]})
    return 0 if all(r.exact or r.status == "skipped" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
