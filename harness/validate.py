"""Check the whole-step estimate against the harness: predicted vs measured peak, per phase, on a matrix.

    python -m optimem.harness.validate --out results/peak_error_cpu.md [--json results/peak_error_cpu.json]
    python -m optimem.harness.validate --quick            # a smaller matrix, prints the table
    python -m optimem.harness.validate --families         # only the architecture-family matrix
    python -m optimem.harness.validate --peft             # only the LoRA / QLoRA matrix
    python -m optimem.harness.validate --zoo              # the transformers zoo (optimem.harness.zoo; --help there)

The matrices: :func:`matrix` and :func:`settings_matrix` (Llama, GPT-2, T5 x optimizers x shapes x
checkpointing, and the settings), :data:`FAMILIES` (the architecture families) and :func:`peft_matrix`
(LoRA / QLoRA on plain, 4-bit and 8-bit bases). Every case is a real ``transformers.Trainer`` run of the
harness on the CPU (:func:`optimem.harness.launcher.run_in_process`, one compute thread, 3 optimizer steps so
the steady step has the next batch prefetched); measured: the tensor accountant's live-tensor peak per phase
(bytes); predicted: :func:`optimem.estimators.estimate` (``device="cpu"``) plus the harness's synthetic
dataset (``harness_bytes``). The figures are in results/peak_error_cpu.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from optimem.estimators import estimate, get_spec
from optimem.harness.env_facts import cpu_name, git_commit, package_version
from optimem.harness.launcher import run_in_process
from optimem.harness.process import quiet_libraries
from optimem.harness.run_config import RunConfig

MODELS = ("tiny-llama", "tiny-gpt2", "tiny-t5")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit", "galore_adamw", "apollo_adamw",
              "lomo", "grokadamw", "schedule_free_adamw", "galore_adamw_layerwise")
"""Ten optimizers of nine families: torch single-tensor AdamW, torch fused AdamW, transformers Adafactor,
bitsandbytes 8-bit, GaLore (SVD projector), APOLLO (random projector), LOMO (update fused into backward),
GrokAdamW, schedule-free (foreach), and a layer-wise variant (per-parameter optimizers in backward)."""
SHAPES = ((2, 64), (4, 128))
QUICK = dict(models=MODELS, optimizers=("adamw_torch", "adafactor", "lomo"), shapes=((2, 64),), gcs=(False, True))
PHASE_NAMES = ("step0.forward", "step0.backward", "step0.optimizer_step", "steady.forward", "steady.backward",
               "steady.optimizer_step")
PEAK_TOL = 0.03
PHASE_TOL = 0.05
FAMILY_PEAK_TOL = 0.01
FAMILY_PHASE_TOL = 0.02
"""Tolerance of the architecture-family matrix (the issue's bar: peak within 1%, every phase within 2%)."""
STEPS = 3
FAMILIES = tuple((m, "causal-lm") for m in ("tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-mixtral", "tiny-qwen3-moe",
                                             "tiny-deepseek-v3", "tiny-olmo2", "tiny-falcon", "tiny-starcoder2",
                                             "tiny-gpt-neox", "tiny-phi3", "tiny-phi3-longrope")) + \
    (("tiny-bert", "masked-lm"), ("tiny-bert", "sequence-classification"), ("tiny-bart", "causal-lm"))
"""Architecture families besides Llama / GPT-2 / T5 (configs in ``estimators/configs``; BERT with both heads):
Qwen3 (QK norm), Gemma 2 (sliding/global layers, soft-capping, eager attention) and Gemma 3, Mixtral and
Qwen3-MoE (routed experts on ``grouped_mm``), DeepSeek-V3 (first layer dense, MLA, grouped routing), OLMo 2,
Falcon (multi-query, parallel attention), StarCoder2 (sliding window, biases, dropout), GPT-NeoX (partial rotary,
parallel residual), Phi-3 (fused projections, sliding window) and Phi-3 with longrope (a long-factor table
built on the first step and kept), BERT (masked LM, sequence classification), BART
(encoder-decoder)."""
FAMILY_SHAPE = (3, 96)
"""Longer than every family config's sliding window, so both window regions of the trace are exercised."""
PEFT_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-t5")
"""LoRA / QLoRA architectures: Llama (GQA), Qwen2 (attention biases), GPT-2 (Conv1D layers, tied head), T5
(encoder-decoder)."""
PEFT_OPTIMIZERS = ("adamw_torch", "adafactor", "adamw_bnb_8bit")
PEFT_QUANTS = (None, "nf4", "int8")
"""No quantization (LoRA), 4-bit NF4 with double quantization (QLoRA), LLM.int8."""
PEFT_LORA = "r=8,alpha=16,dropout=0.05,target=all-linear"
PEFT_SHAPE = (2, 64)


@dataclass
class Case:
    model: str
    optim: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    dtype: str = "fp32"
    mixed_precision: str | None = None
    grad_accum: int = 1
    attn: str = "sdpa"
    freeze: str | None = None
    task: str = "causal-lm"
    lora: str | None = None
    quantize: str | None = None
    quant_compute_dtype: str | None = None

    @property
    def label(self) -> str:
        extra = [self.task if self.task != "causal-lm" else "", "gc" if self.gradient_checkpointing else "",
                 self.dtype if self.dtype != "fp32" else "",
                 f"{self.mixed_precision} autocast" if self.mixed_precision else "",
                 f"accum {self.grad_accum}" if self.grad_accum > 1 else "", self.attn if self.attn != "sdpa" else "",
                 f"freeze /{self.freeze}/" if self.freeze else "", f"lora {self.lora}" if self.lora else "",
                 (f"{self.quantize}" + (" dq" if self.double_quant else "")
                  + (f" compute {self.quant_compute_dtype}" if self.quant_compute_dtype else "")) if self.quantize else ""]
        return f"{self.model} {self.optim} {self.batch_size}x{self.seq_len}" + "".join(
            f" {e}" for e in extra if e)

    def config(self):
        """The harness run this case is: a :class:`~optimem.harness.run_config.RunConfig` on the CPU, :data:`STEPS`
        steps (the one setup type the estimator and the harness both take)."""
        return RunConfig(model=self.model, optim=self.optim, dtype=self.dtype, mixed_precision=self.mixed_precision,
                         batch_size=self.batch_size, seq_len=self.seq_len, grad_accum=self.grad_accum,
                         gradient_checkpointing=self.gradient_checkpointing, attn_implementation=self.attn,
                         freeze=self.freeze, optim_target_modules=_targets(self.optim), steps=STEPS, warmup=1,
                         device="cpu", task=self.task, lora=self.lora, quantize=self.quantize,
                         double_quant=self.double_quant, quant_compute_dtype=self.quant_compute_dtype)

    @property
    def double_quant(self) -> bool:
        """4-bit cases use double quantization (QLoRA's recipe)."""
        return self.quantize in ("nf4", "fp4")


@dataclass
class Result:
    case: Case
    status: str
    measured_peak: int = 0
    predicted_peak: int = 0
    phases: dict = field(default_factory=dict)  # name -> (measured, predicted)
    seconds: float = 0.0
    reason: str = ""

    @property
    def peak_error(self) -> float:
        return (self.predicted_peak - self.measured_peak) / self.measured_peak if self.measured_peak else 0.0

    def phase_errors(self) -> dict[str, float]:
        return {k: (p - m) / m for k, (m, p) in self.phases.items() if m}

    @property
    def worst_phase(self) -> tuple[str, float]:
        errs = self.phase_errors()
        if not errs:
            return "", 0.0
        k = max(errs, key=lambda n: abs(errs[n]))
        return k, errs[k]

    def ok(self, peak_tol: float | None = None, phase_tol: float | None = None) -> bool:
        pt, ft = tolerance(self.case)
        peak_tol = pt if peak_tol is None else peak_tol
        phase_tol = ft if phase_tol is None else phase_tol
        return self.status == "ok" and abs(self.peak_error) <= peak_tol and all(
            abs(e) <= phase_tol for e in self.phase_errors().values())


FREEZE = {"tiny-llama": "embed_tokens|mlp", "tiny-gpt2": "attn", "tiny-t5": "DenseReluDense"}
"""Parameters frozen in the frozen-parameter cases (a regex over parameter names)."""


def family_matrix(families=FAMILIES, optimizers=OPTIMIZERS, gcs=(False, True), mixed=(None, "bf16")) -> list[Case]:
    """Every family x optimizer x checkpointing x bf16 autocast, fp32 parameters, one shape."""
    b, s = FAMILY_SHAPE
    return [Case(m, o, b, s, gc, mixed_precision=mp, task=task) for m, task in families for o in optimizers
            for gc in gcs for mp in mixed]


def peft_matrix(models=PEFT_MODELS, optimizers=PEFT_OPTIMIZERS) -> list[Case]:
    """LoRA / QLoRA cases (:data:`PEFT_LORA`, one shape): every model x base (plain, nf4, int8) x optimizer x
    checkpointing, and per model bf16 (parameters; a 4-bit base computing in bf16; bf16 autocast over a 4-bit
    base) and DoRA (plain and 4-bit base)."""
    b, s = PEFT_SHAPE
    out = [Case(m, o, b, s, gc, lora=PEFT_LORA, quantize=q) for m in models for q in PEFT_QUANTS for o in optimizers
           for gc in (False, True)]
    for m in models:
        out += [Case(m, "adamw_torch", b, s, False, dtype="bf16", lora=PEFT_LORA),
                Case(m, "adamw_torch", b, s, True, dtype="bf16", lora=PEFT_LORA, quantize="nf4",
                     quant_compute_dtype="bf16"),
                Case(m, "adamw_torch", b, s, False, mixed_precision="bf16", lora=PEFT_LORA, quantize="nf4"),
                Case(m, "adamw_torch", b, s, False, lora=PEFT_LORA + ",dora=true"),
                Case(m, "adafactor", b, s, True, lora=PEFT_LORA + ",dora=true", quantize="nf4")]
    return out


def tolerance(case: Case) -> tuple[float, float]:
    """(peak, per-phase) tolerance of a case: the families' bar (LoRA / QLoRA too), else the original
    matrix's."""
    if (case.model, case.task) in FAMILIES or case.lora:
        return FAMILY_PEAK_TOL, FAMILY_PHASE_TOL
    return PEAK_TOL, PHASE_TOL


def matrix(models=MODELS, optimizers=OPTIMIZERS, shapes=SHAPES, gcs=(False, True)) -> list[Case]:
    """The main matrix: every optimizer x model x shape x gradient checkpointing, fp32, SDPA."""
    return [Case(m, o, b, s, gc) for m in models for o in optimizers for (b, s) in shapes for gc in gcs]


def settings_matrix(models=MODELS) -> list[Case]:
    """The other settings, one shape: parameters stored in bf16 (with optimizers that upcast), bf16
    autocast, eager attention, gradient accumulation, frozen parameters; with and without checkpointing."""
    out = []
    for m in models:
        for ckpt in (False, True):
            out += [Case(m, "adamw_torch", 2, 64, ckpt, dtype="bf16"),
                    Case(m, "adafactor", 2, 64, ckpt, dtype="bf16"),
                    Case(m, "adamw_torch", 2, 64, ckpt, mixed_precision="bf16"),
                    Case(m, "adamw_torch", 2, 64, ckpt, attn="eager"),
                    Case(m, "adamw_torch", 2, 64, ckpt, grad_accum=2),
                    Case(m, "adamw_torch", 2, 64, ckpt, freeze=FREEZE[m])]
        out += [Case(m, o, 2, 64, False, dtype="bf16") for o in ("lomo", "galore_adamw", "grokadamw")]
    return out


def _targets(optim: str):
    return "all-linear" if get_spec(optim).needs_target_modules else None


def harness_bytes(case: Case) -> int:
    """The harness's synthetic dataset: ``batch * grad_accum * steps`` samples of ``seq_len`` int64 ids (and one
    int64 label each for sequence classification), in memory from the Trainer's construction on
    (``harness/scenario.py``)."""
    samples = case.batch_size * case.grad_accum * STEPS
    if case.task == "image-text-to-text":  # the stored samples of harness/image_data.py
        # lazy: pulls in torch, which importing this module does not
        from optimem.estimators.trace.images import layout, spec_for

        spec = spec_for(case.config().source, case.task, None, 1)
        return samples * sum(per + tok * case.seq_len for _, per, tok in layout(spec))
    return samples * case.seq_len * 8 + (samples * 8 if case.task == "sequence-classification" else 0)


def predict(case: Case) -> tuple[int, dict[str, int], list[str]]:
    """The estimate of ``case`` plus the harness's own bytes: its peak, its phases' peaks and its notes."""
    est = estimate(case.config())
    extra = harness_bytes(case)  # (the dataset is made after the model: not in model_load)
    phases = {k: v["peak"] + (0 if k == "model_load" else extra) for k, v in est.phases.items()}
    return (max(phases.values()) if phases else est.bytes["peak"] + extra), phases, list(est.notes)


@contextlib.contextmanager
def _one_thread():
    import torch  # lazy: pulls in torch, which importing this module does not

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure(case: Case) -> dict:
    """One harness run (in this process); the worker's payload. bitsandbytes' module cache of quantization
    codes is emptied first, as a fresh process (``bench run``'s worker) has it: the code double quantization
    creates is then born in this run, as in every real one."""
    if case.quantize:
        from bitsandbytes import functional  # lazy: bitsandbytes is optional

        functional.name2qmap.clear()
    with _one_thread(), _frozen_gc():
        return run_in_process(case.config(), track_tensors=True).payload


@contextlib.contextmanager
def _frozen_gc():
    """accelerate's ``free_memory()`` runs ``gc.collect()`` when training ends (after the tracked steps); with
    the objects that exist before the run frozen, that collection only walks the run's own objects."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_case(case: Case) -> Result:
    t0 = time.perf_counter()
    payload = measure(case)
    if payload.get("status") != "ok":
        return Result(case, payload.get("status", "error"), reason=payload.get("reason", ""),
                      seconds=time.perf_counter() - t0)
    m = payload["measured"]
    pred_peak, pred_phases, _ = predict(case)
    phases = {}
    for name in PHASE_NAMES:
        ph = m["phases"].get(name)
        if ph is not None and name in pred_phases:
            phases[name] = (int(ph["peak_bytes"]), int(pred_phases[name]))
    measured_peak = int(m["peaks"]["tensor_peak_bytes"])
    return Result(case, "ok", measured_peak, pred_peak, phases, time.perf_counter() - t0)


def summarize(results: list[Result]) -> dict:
    """Per column (``peak`` and every phase): median absolute relative error, the worst (signed) error and
    the largest absolute difference in bytes."""
    ok = [r for r in results if r.status == "ok"]
    out: dict = {"cases": len(results), "ran": len(ok), "within_tolerance": sum(r.ok() for r in ok)}
    cols: dict[str, list[tuple[float, int]]] = {"peak": [(r.peak_error, r.predicted_peak - r.measured_peak) for r in ok]}
    for name in PHASE_NAMES:
        cols[name] = [((p - m) / m, p - m) for r in ok for k, (m, p) in r.phases.items() if k == name and m]
    out["errors"] = {k: {"median_abs": statistics.median(abs(e) for e, _ in v) if v else None,
                         "worst": max((e for e, _ in v), key=abs) if v else None,
                         "worst_bytes": max((d for _, d in v), key=abs) if v else None, "n": len(v)}
                     for k, v in cols.items()}
    return out


def _pct(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x * 100:+.{digits}f}%"


def machine_facts() -> dict:
    """The machine and package versions a validation table was measured with (its header line)."""
    commit, dirty = git_commit()
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit, "git_dirty": dirty,
            **{p: package_version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")}}


def _summary_table(results: list[Result]) -> list[str]:
    s = summarize(results)
    lines = ["| | median abs error | worst error | worst difference (bytes) | cases |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for k, v in s["errors"].items():
        lines.append(f"| {k} | {_pct(v['median_abs'], 4).lstrip('+')} | {_pct(v['worst'], 4)} | "
                     f"{v['worst_bytes']:+,} | {v['n']} |" if v["n"] else f"| {k} | - | - | - | 0 |")
    return lines


def _family_table(results: list[Result], by=None) -> list[str]:
    """Per family (and head), or per ``by(case)`` (a ``(name, detail)`` pair): cases, how many within
    tolerance, the worst peak and worst phase errors."""
    by = by or (lambda c: (c.model, c.task))
    lines = ["| family | cases | within tolerance | worst peak error | worst phase error (phase) |",
             "| --- | ---: | ---: | ---: | --- |"]
    keys: list = []
    for r in results:
        if by(r.case) not in keys:
            keys.append(by(r.case))
    for model, task in keys:
        rs = [r for r in results if by(r.case) == (model, task)]
        ok = [r for r in rs if r.status == "ok"]
        worst = max(ok, key=lambda r: abs(r.peak_error), default=None)
        wp = max(((r.worst_phase, r) for r in ok), key=lambda x: abs(x[0][1]), default=None)
        name = model + (f" ({task})" if task else "")
        lines.append(f"| {name} | {len(rs)} | {sum(r.ok() for r in rs)} | "
                     f"{_pct(worst.peak_error) if worst else '-'} | "
                     f"{_pct(wp[0][1]) + ' (' + wp[0][0] + ')' if wp else '-'} |")
    return lines


def render(results: list[Result], facts: dict, command: str, seconds: float) -> str:
    s = summarize(results)
    peft = [r for r in results if r.case.lora]
    core = [r for r in results if (r.case.model, r.case.task) not in FAMILIES and not r.case.lora]
    fams = [r for r in results if (r.case.model, r.case.task) in FAMILIES and not r.case.lora]
    lines = ["# Whole-step peak: predicted vs measured on CPU", "",
             f"Regenerate: `{command}`", "",
             f"Machine: {facts['cpu']} ({facts.get('cpu_count', '?')} cores; runs use 1 thread), "
             f"{facts['platform']}; Python {facts['python']}, torch {facts['torch']}, transformers "
             f"{facts['transformers']}; commit {facts['git_commit'] or 'unknown'}"
             + (" plus uncommitted changes" if facts.get("git_dirty") else "") + f"; {seconds:.0f} s.", "",
             "Measured: the harness's tensor accountant (exact live tensor bytes at every op) during real "
             "`transformers.Trainer` runs on the CPU, per phase (`step0.*`: the first step, `steady.*`: step 1), and "
             "over the whole run. Predicted: `optimem.estimators.estimate(..., device=\"cpu\")` for the same configuration "
             "-- the real model traced on meta-backed trace tensors (`estimators/trace`) and replayed on the phase "
             "simulator -- plus the harness's in-memory synthetic dataset. Error = (predicted - measured) / measured. "
             "Shapes are batch x sequence; `gc`: gradient checkpointing.", "",
             f"**{s['within_tolerance']} of {s['cases']} cases within tolerance** ({s['ran']} ran).", ""]
    if core:
        lines += [f"## Llama, GPT-2, T5 (tolerance: peak within {PEAK_TOL:.0%}, every phase within {PHASE_TOL:.0%})",
                  "", "Models: `tiny-llama` (GQA decoder, SDPA), `tiny-gpt2` (Conv1D, tied embeddings, dropout: "
                  "SDPA's math path), `tiny-t5` (encoder-decoder, relative position bias).", "",
                  f"**{sum(r.ok() for r in core)} of {len(core)} cases within tolerance.**", ""]
        lines += _summary_table(core) + [""]
    if fams:
        lines += [f"## Other architecture families (tolerance: peak within {FAMILY_PEAK_TOL:.0%}, every phase within "
                  f"{FAMILY_PHASE_TOL:.0%})", "",
                  "Small configs in `estimators/configs/tiny-*.json`; every optimizer of the matrix x gradient "
                  "checkpointing on/off x bf16 autocast on/off, fp32 parameters, batch "
                  f"{FAMILY_SHAPE[0]} x sequence {FAMILY_SHAPE[1]} (longer than each config's sliding window).", "",
                  f"**{sum(r.ok() for r in fams)} of {len(fams)} cases within tolerance.**", ""]
        lines += _summary_table(fams) + [""] + _family_table(fams) + [""]
    if peft:
        lines += [f"## LoRA and QLoRA (tolerance: peak within {FAMILY_PEAK_TOL:.0%}, every phase within "
                  f"{FAMILY_PHASE_TOL:.0%})", "",
                  f"peft adapters (`--lora {PEFT_LORA}`; DoRA cases add `dora=true`) on a plain base, a 4-bit NF4 "
                  "base with double quantization (`--quantize nf4 --double-quant`, prepare_model_for_kbit_training "
                  "on) and an LLM.int8 base (`--quantize int8`), loaded by transformers' bitsandbytes quantizer "
                  "and trained by bitsandbytes' CPU backend; "
                  f"batch {PEFT_SHAPE[0]} x sequence {PEFT_SHAPE[1]}, every optimizer of {', '.join(PEFT_OPTIMIZERS)} "
                  "x checkpointing, plus bf16 parameters, bf16 compute of 4-bit layers, bf16 autocast and DoRA. "
                  "Predicted: the peft model `optimem.estimators.peft_model.build_training_model` builds, traced on meta "
                  "(bitsandbytes' ops on their fake kernels).", "",
                  f"**{sum(r.ok() for r in peft)} of {len(peft)} cases within tolerance.**", ""]
        lines += _summary_table(peft) + [""] + _family_table(peft, lambda c: (c.model, c.quantize or "LoRA"))
        lines += [""]
    lines += ["## Every case", "", "| case | measured peak | predicted peak | peak error | worst phase | its error |",
              "| --- | ---: | ---: | ---: | --- | ---: |"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.case.label} | {r.status} | | | {r.reason[:80]} | |")
            continue
        ph, pe = r.worst_phase
        mark = "" if r.ok() else " **(out of tolerance)**"
        lines.append(f"| {r.case.label} | {r.measured_peak:,} | {r.predicted_peak:,} | {_pct(r.peak_error)}{mark} "
                     f"| {ph} | {_pct(pe)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimem.harness.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the Markdown error table here")
    p.add_argument("--json", default=None, help="write every case's figures here as JSON")
    p.add_argument("--quick", action="store_true", help="a small matrix (a few optimizers, one shape)")
    p.add_argument("--optim", action="append", default=None, help="only these optimizers (repeatable)")
    p.add_argument("--model", action="append", default=None, help="only these models (repeatable)")
    p.add_argument("--no-settings", action="store_true",
                   help="skip the other-settings cases (bf16, autocast, eager, accumulation, frozen)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--families", action="store_true", help="only the architecture-family matrix")
    group.add_argument("--no-families", action="store_true", help="skip the architecture-family matrix")
    group.add_argument("--peft", action="store_true", help="only the LoRA / QLoRA matrix")
    args = p.parse_args(argv)
    quiet_libraries()
    kw = dict(QUICK) if args.quick else {}
    if args.optim:
        kw["optimizers"] = tuple(args.optim)
    if args.model:
        kw["models"] = tuple(args.model)
    core_models = tuple(m for m in kw.get("models", MODELS) if m in MODELS)
    cases = [] if args.families or args.peft else matrix(**{**kw, "models": core_models})
    if not (args.quick or args.optim or args.no_settings or args.families or args.peft):
        cases += settings_matrix(core_models)
    if not (args.no_families or args.quick or args.peft):
        fams = tuple(f for f in FAMILIES if not args.model or f[0] in args.model)
        cases += family_matrix(fams, optimizers=tuple(args.optim) if args.optim else OPTIMIZERS)
    if not (args.quick or args.families):
        pms = tuple(m for m in PEFT_MODELS if not args.model or m in args.model)
        cases += peft_matrix(pms, optimizers=tuple(args.optim) if args.optim else PEFT_OPTIMIZERS)
    t0 = time.perf_counter()
    results = []
    for case in cases:
        r = run_case(case)
        results.append(r)
        flag = "ok " if r.ok() else "OUT"
        print(f"{flag} {case.label:55s} peak {_pct(r.peak_error):>9s}  worst {r.worst_phase[0]:22s} "
              f"{_pct(r.worst_phase[1]):>9s}  ({r.seconds:.1f} s)" if r.status == "ok" else
              f"ERR {case.label}: {r.reason}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    command = "python -m optimem.harness.validate" + (" --quick" if args.quick else "") + \
        (" --no-settings" if args.no_settings else "") + (" --families" if args.families else "") + \
        (" --no-families" if args.no_families else "") + (" --peft" if args.peft else "") + \
        "".join(f" --optim {o}" for o in (args.optim or [])) + "".join(f" --model {m}" for m in (args.model or [])) + \
        (f" --out {args.out}" if args.out else "") + (f" --json {args.json}" if args.json else "")
    facts = machine_facts()
    write_outputs(args, render(results, facts, command, seconds),
                  {"facts": facts, "summary": summarize(results),
                   "results": [{**asdict(r.case), "status": r.status, "measured_peak": r.measured_peak,
                                "predicted_peak": r.predicted_peak, "phases": r.phases, "reason": r.reason}
                               for r in results]})
    return 0 if all(r.ok() for r in results) else 1


def write_outputs(args, table: str, data: dict) -> None:
    """The Markdown ``table`` to ``args.out`` (else stdout) and ``data`` to ``args.json`` when asked."""
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    else:
        print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    if "--zoo" in sys.argv[1:]:  # the zoo run builds on this module: run as its own program (no import cycle)
        import runpy

        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--zoo"]
        runpy.run_module("optimem.harness.zoo", run_name="__main__", alter_sys=True)
    else:
        sys.exit(main())
