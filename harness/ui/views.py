"""What the page shows for a form, computed without Gradio: :func:`answer` returns an :class:`Answer`.

The estimates are ``bench estimate``'s (``commands/estimate.run_estimates`` on the parsed command line), the
plan is ``bench plan``'s (``commands/plan.build_plan``, once for the largest micro-batch at the sequence length
and once for the longest sequence at the micro-batch), so the page, the commands it shows and ``estimate()``
give the same figures. All figures are bytes (tables print them in binary units and, for the peak, exactly).
"""
from __future__ import annotations

import functools
import pprint
import sys
import traceback
from dataclasses import dataclass, field, replace

from optimem.estimators import get_spec, planner as P
from optimem.estimators.categories import Category
from optimem.estimators.errors import UserError
from optimem.estimators.setup import TrainingSetup
from optimem.estimators.step_memory import step_memory
from optimem.harness.commands.estimate import _phase_label, run_estimates
from optimem.harness.ui import chart
from optimem.harness.ui.form import Form, FormError, command_line, estimate_argv, field_error, parse, plan_argv
from optimem.harness.units import human_bytes
from importlib.metadata import version
from optimem.harness.distributed.schemes import model_class, training_arguments
from optimem.harness.commands.plan import build_plan

ESTIMATE_COLUMNS = ["optimizer", "weights", "gradients", "optimizer state", "activations", "peak", "peak (bytes)",
                    "at", "on device (CUDA)", "notes"]
PLAN_COLUMNS = ["optimizer", "GPU", "fits", "peak per GPU", "budget", "max batch", "max seq", "tokens/s", "notes"]
"""``fits``: at the form's micro-batch and sequence; ``max batch``: the largest micro-batch at that sequence;
``max seq``: the longest sequence at that micro-batch; ``budget``: usable memory less the planner's headroom."""
PARTS = (Category.WEIGHTS, Category.GRADIENTS, Category.OPTIMIZER_STATE, Category.ACTIVATIONS,
         Category.TEMPORARIES, Category.OTHER)
"""The estimate's per-phase split (``Estimate.phases``) the chart stacks."""


@dataclass
class Answer:
    """Everything the planning tab shows. ``error``: the inline message (empty when the form is good; the
    other fields then hold what the form gave)."""

    error: str = ""
    error_field: str | None = None
    estimate_rows: list[list] = field(default_factory=list)
    chart_svg: str = ""
    plan_rows: list[list] = field(default_factory=list)
    recommendation: str = ""
    commands: str = ""
    snippet: str = ""
    notes: list[str] = field(default_factory=list)
    estimates: list = field(default_factory=list)
    bars: list[chart.Bar] = field(default_factory=list)


def _estimate_row(est) -> list:
    b = est.bytes
    on_device = human_bytes(est.cuda["peak_device"]) if est.cuda else "-"
    notes = "; ".join(est.notes[-2:]) if est.notes else ""
    return [est.optim, human_bytes(b["weights"]), human_bytes(b["gradients"]), human_bytes(b["optimizer_state"]),
            human_bytes(b["activations"]), human_bytes(b["peak"]),
            "-" if b["peak"] is None else f"{b['peak']:,}", _phase_label(est.peak_phase), on_device, notes]


def bar_of(est, sharded: TrainingSetup | None, batch: int) -> chart.Bar | None:
    """One optimizer's bar: the estimate's peak phase split by category plus its CUDA terms (one GPU), or the
    planner's per-GPU split (``sharded``: the setup with its GPUs and scheme; CUDA terms left out)."""
    if sharded is not None:
        mem = step_memory(sharded, batch)
        return chart.Bar(est.optim, {k: int(v) for k, v in mem.breakdown.items()})
    if est.bytes["peak"] is None or not est.peak_phase:
        return None
    ph = est.phases[est.peak_phase]
    parts = {str(c): int(ph.get(str(c), 0)) for c in PARTS}
    if est.cuda:
        parts[chart.CUDA_TERMS] = int(est.cuda["peak_reserved"]) - int(est.bytes["peak"])
    return chart.Bar(est.optim, parts)


def _plan_rows(plan: P.Plan, seq_plan: P.Plan, batch: int) -> list[list]:
    by_seq = {(r.optim, r.gpu): r for r in seq_plan.rows}
    out = []
    for r in plan.rows:
        s = by_seq.get((r.optim, r.gpu))
        if r.status == "unsupported":
            out.append([r.optim, r.gpu_name, "n/a", "-", human_bytes(r.budget), "-", "-", "-", r.reason])
            continue
        fits = r.status == "fits" and r.max_micro_batch >= batch
        peak = _peak_at(plan, r, batch)
        max_seq = "-" if s is None or s.status != "fits" else \
            f"{s.max_seq_len}{'+' if s.seq_limit and s.max_seq_len >= s.seq_limit else ''}"
        tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f} (MFU {r.mfu:.2f} {r.mfu_source})"
        notes = r.reason or "; ".join(r.notes[:2])
        out.append([r.optim, r.gpu_name, "yes" if fits else "no", human_bytes(peak), human_bytes(r.budget),
                    str(r.max_micro_batch) + ("+" if r.at_cap else "") if r.status == "fits" else "0",
                    max_seq, tps, notes])
    return out


def _peak_at(plan: P.Plan, r, batch: int) -> int | None:
    """The per-GPU peak of a plan row's setup (the plan's base, the row's optimizer and checkpointing) at
    ``batch`` (None where the estimator has none)."""
    base = plan.base
    try:
        s = base.with_optimizer(r.optim, base.optim_args, base.optim_target_modules)
        return step_memory(replace(s, gradient_checkpointing=bool(r.gradient_checkpointing)), batch).peak
    except UserError:
        return None


def _recommendation(plan: P.Plan) -> str:
    rec = plan.recommendation
    if not rec:
        hints = {o: P.cheapest_to_fit(plan, o) for o in plan.optims}
        shown = "; ".join(f"{o}: {', '.join(h)}" for o, h in hints.items() if h)
        return ("**Nothing fits one of the chosen GPUs at micro-batch 1.**" +
                (f" Sharded, the fewest GPUs that fit: {shown}." if shown else ""))

    def line(r: dict) -> str:
        tps = f", {r['tokens_per_s']:,.0f} tokens/s" if r.get("tokens_per_s") else ""
        n = f"{r['num_gpus']}x " if r["num_gpus"] > 1 else ""
        return f"`{r['optim']}` on {n}{r['gpu_name']}, micro-batch up to {r['max_micro_batch']}{tps}"

    return (f"**Recommended:** {line(rec['cheapest'])} ({rec['cheapest_basis']}).  \n"
            f"**Fastest:** {line(rec['fastest'])}.")


def _checkpointing_name() -> str:
    """``activation_checkpointing`` from transformers 5 on (``gradient_checkpointing`` is its deprecated name)."""
    return "activation_checkpointing" if int(version("transformers").split(".")[0]) >= 5 else "gradient_checkpointing"


_CHECKPOINTING = _checkpointing_name()


@functools.lru_cache(maxsize=64)
def _model_class(model: str):
    return model_class(TrainingSetup(model=model))


def training_arguments_snippet(setup: TrainingSetup) -> str:
    """``TrainingArguments(...)`` for ``setup`` as Python source (what the Trainer needs for this memory; the
    model's own loading, LoRA and quantization stay comments)."""
    spec = get_spec(setup.optim)
    kw: dict = {"output_dir": "out", "per_device_train_batch_size": setup.batch_size,
                "gradient_accumulation_steps": setup.grad_accum}
    if setup.mixed_precision:
        kw[setup.mixed_precision] = True
    if setup.gradient_checkpointing:
        kw[_CHECKPOINTING] = True
    lines = []
    if spec.trainer_name:
        kw["optim"] = spec.name
        if setup.optim_args:
            kw["optim_args"] = setup.optim_args
        if setup.optim_target_modules:
            t = setup.optim_target_modules
            kw["optim_target_modules"] = list(t) if isinstance(t, tuple) else t
    else:
        lines.append(f"# {spec.name}: not a TrainingArguments optim name; give Trainer(optimizer_cls_and_kwargs="
                     f"({spec.cls}, {{...}})) as `bench run` does")
    if setup.num_processes > 1:
        kw.update(training_arguments(setup, _model_class(setup.model)))
        kw.pop("use_cpu", None)
        lines.append(f"# launched on {setup.num_processes} GPUs: torchrun --nproc-per-node {setup.num_processes} "
                     "train.py")
    if setup.lora or setup.quantize:
        lines.append(f"# the model: peft LoraConfig from --lora {setup.lora}" if setup.lora else "# the model:")
        if setup.quantize:
            lines.append(f"#   loaded with BitsAndBytesConfig ({setup.quantize}"
                         f"{', double quant' if setup.double_quant else ''})")
    args = ",\n    ".join(f"{k}=" + pprint.pformat(v, width=90, sort_dicts=False).replace("\n", "\n" + " " * (len(k) + 5))
                          for k, v in kw.items())
    return "\n".join(["from transformers import TrainingArguments", "", *lines,
                      f"args = TrainingArguments(\n    {args},\n)"])


def answer(form: Form) -> Answer:
    """The planning tab's answer for ``form`` (an :class:`Answer` with ``error`` set for bad input)."""
    try:
        return _answer(form)
    except FormError as exc:
        return Answer(error=str(exc), error_field=exc.field)
    except UserError as exc:
        err = field_error(exc)
        return Answer(error=str(err), error_field=getattr(err, "field", None))
    except Exception as exc:  # noqa: BLE001 - a bug is one line on the page (its traceback on the server's stderr)

        traceback.print_exc(file=sys.stderr)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Answer(error=f"internal error: {type(exc).__name__}: {first} (the server's log has the traceback)")


@functools.lru_cache(maxsize=256)
def _estimates(argv: tuple[str, ...]):
    """``bench estimate ARGV``'s estimates, kept per command line (an upload's path names its content)."""
    return run_estimates(parse("estimate", list(argv)))


@functools.lru_cache(maxsize=256)
def _plan(argv: tuple[str, ...]) -> P.Plan:
    """``bench plan ARGV``'s plan, kept per command line (``--no-calibrate``: nothing else feeds it). Moving the
    micro-batch leaves the largest-micro-batch plan as it was: only the sequence search runs again."""
    return build_plan(parse("plan", list(argv)))


def _answer(form: Form) -> Answer:
    try:
        base, _inv, results, skipped = _estimates(tuple(estimate_argv(form)))
        plan, seq_plan = _plan(tuple(plan_argv(form))), _plan(tuple(plan_argv(form, max_seq=True)))
    except UserError as exc:
        raise field_error(exc) from None
    ans = Answer(estimates=results)
    ans.estimate_rows = [_estimate_row(e) for e in results]
    n, scheme = plan.base.num_processes, plan.base.sharding
    for e in results:
        sharded = replace(e.setup, num_processes=n, sharding=scheme) if n > 1 else None
        try:
            bar = bar_of(e, sharded, base.batch_size)
        except UserError:
            bar = None
        if bar is not None:
            ans.bars.append(bar)
    lines = [chart.Line(f"{g.name}: {human_bytes(g.usable_bytes)} usable", g.usable_bytes) for g in plan.gpus]
    where = f"per GPU of {n}, {scheme}; CUDA terms not drawn" if n > 1 else "one GPU"
    ans.chart_svg = chart.svg(ans.bars, lines, f"{base.model}: memory at the peak, micro-batch {base.batch_size} x "
                                               f"{base.seq_len} tokens ({where})")
    ans.plan_rows = _plan_rows(plan, seq_plan, base.batch_size)
    ans.recommendation = _recommendation(plan)
    ans.notes = [f"{s['optim']}: {s['reason']}" for s in skipped + plan.skipped]
    ans.commands = "\n".join([command_line("estimate", estimate_argv(form, shown=True)),
                              command_line("plan", plan_argv(form, shown=True)),
                              command_line("plan", plan_argv(form, max_seq=True, shown=True))])
    first = results[0].setup if results else None
    if first is not None:
        ans.snippet = training_arguments_snippet(replace(first, num_processes=n, sharding=scheme))
    return ans


__all__ = ["Answer", "ESTIMATE_COLUMNS", "PLAN_COLUMNS", "answer", "bar_of", "training_arguments_snippet"]
