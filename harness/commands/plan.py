"""``bench plan``: which optimizer fits on which GPU, at what micro-batch, how fast; what sharding buys.

The plan itself is :func:`optimem.estimators.planner.plan`; this module turns the flags into its arguments (and
finds the default results files that calibrate MFU) and prints the :class:`~optimem.estimators.planner.Plan`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from optimem.estimators import UserError, get_spec, planner as P
from optimem.estimators.gpus import DEFAULT_HEADROOM, GIB
from optimem.estimators.packing import samples
from optimem.estimators.setup import TrainingSetup
from optimem.estimators.sharding import sharding_support
from optimem.estimators.step_memory import PLAN_DEFAULTS
from optimem.estimators.throughput import DEFAULT_MFU
from optimem.harness.commands.argtypes import add_no_cache
from optimem.harness.commands.estimate import expand_optims as expand_estimate_optims
from optimem.harness.commands.setup_args import add_setup_arguments, field_defaults, setup_kwargs
from optimem.harness.units import format_table, human_count

from optimem.harness.paths import check_output_file, check_output_suffix
from optimem.harness.record import read_records
from optimem.harness.plan_plots import cell_text, plot_plan


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="capacity planning: which GPU, how many, what micro-batch, for each optimizer (no GPU needed)",
        description="For each optimizer x GPU: does it fit, the largest micro-batch (bisection over the whole-step "
                    "estimator), the per-GPU memory breakdown, tokens/s from model FLOPs and an MFU (assumed, or "
                    "measured by recorded runs), and what sharding over N GPUs buys. No GPU, no download.")
    p.add_argument("--gpus", default="all", metavar="LIST|all",
                   help="GPU ids from the catalog, comma-separated (e.g. 'h100-sxm,l4'), or 'all' (default)")
    add_setup_arguments(p, defaults={**field_defaults(), **PLAN_DEFAULTS, "optim": None,
                                     "num_processes": 1, "sharding": None, "batch_size": None},
                        multi=("optim",), exclude=("gradient_checkpointing", "device"),
                        help_suffix={"optim": "(comma-separated or repeated) or 'all'; default: "
                                              + ", ".join(P.DEFAULT_OPTIMS),
                                     "sharding": "(default none for 1 GPU, ddp for several)",
                                     "optim_args": "(applied where read)",
                                     "batch_size": "(only with --max-seq, default 1: the micro-batch the sequence "
                                                   "search holds; otherwise the micro-batch is what is searched)",
                                     "seq_len": "(not read with --max-seq)"})
    p.add_argument("--data", default=None, metavar="FILE",
                   help="with --group-by-length: the data file bench run --data would train on; the micro-batch is "
                        "searched at the file's longest sample (cut at --seq-len), each micro-batch padded to it")
    p.add_argument("--max-seq", action="store_true",
                   help="search the longest sequence that fits at --batch-size instead of the largest micro-batch "
                        "at --seq-len (up to the model's position limit)")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto (default): off when micro-batch 1 fits without it, else on")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"fraction of usable memory kept free for allocator fragmentation (default "
                        f"{DEFAULT_HEADROOM})")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"MFU assumed where no recorded run calibrates it (default {DEFAULT_MFU})")
    p.add_argument("--results", action="append", metavar="FILE.jsonl",
                   help="recorded runs to calibrate MFU from (default: results/*.jsonl)")
    p.add_argument("--no-calibrate", action="store_true", help="ignore recorded runs; use --mfu everywhere")
    p.add_argument("--gpu-file", action="append", default=[], metavar="FILE",
                   help="extra GPUs (JSON or YAML, same fields as estimators/gpus.json); same id replaces")
    p.add_argument("--plot", metavar="FILE.png", help="also write the plots (max micro-batch heatmap, memory vs GPUs)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    add_no_cache(p)
    p.set_defaults(func=main)


def expand_optims(values: list[str] | None) -> list[str]:
    """Names from ``--optim`` ('all' = every optimizer optimem can estimate); default :data:`DEFAULT_OPTIMS`."""
    if not values:
        return list(P.DEFAULT_OPTIMS)
    return expand_estimate_optims(values, all_includes_unavailable=False)


def _check_args(args) -> None:
    if args.batch_size is not None and not args.max_seq:
        raise UserError("--batch-size is the micro-batch a --max-seq search holds; without --max-seq the largest "
                        "micro-batch is what bench plan searches (give --max-seq, or drop --batch-size)")
    if args.max_seq and args.plot:
        raise UserError("--plot draws the micro-batch search; it cannot be combined with --max-seq")
    if not 0 <= args.headroom < 1:
        raise UserError(f"--headroom is a fraction in [0, 1), got {args.headroom}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
    if args.plot is not None:
        check_output_suffix(check_output_file(args.plot, "--plot", what="image file", text=False,
                                              example="plan.png"), "--plot", PLOT_SUFFIXES)
    for f in args.results or []:
        if not Path(f).is_file():
            raise UserError(f"--results {f}: no such results file (give JSONL files written by 'bench run' or "
                            "'bench sweep', or leave --results out for results/*.jsonl)")


PLOT_SUFFIXES = (".png", ".pdf", ".svg")
"""What ``--plot`` can write (matplotlib picks the format from the name)."""


def _result_records(files: list[str], *, given: bool) -> list[dict]:
    """The run records of the calibration files (read by the harness's reader, which says what it skipped; a
    default results/*.jsonl file that cannot be read is passed over with a word)."""

    out: list[dict] = []
    for f in files:
        try:
            out.extend(r for r in read_records(f) if not r.get("kind"))
        except UserError as exc:
            if given:
                raise UserError(f"--results: {exc}") from None
            print(f"bench plan: warning: {exc} (not used to calibrate MFU)", file=sys.stderr)
    return out


def default_result_files(root: str | Path = "results") -> list[Path]:
    """``results/*.jsonl`` under ``root`` (relative to the working directory): what calibrates MFU by default."""
    root = Path(root)
    return sorted(root.glob("*.jsonl")) if root.is_dir() else []


def build_plan(args) -> P.Plan:
    """The plan of the command line's setup: its flags resolved once into a setup, then :func:`P.plan`."""
    _check_args(args)
    kw = setup_kwargs(args, exclude=("optim", "optim_args", "optim_target_modules", "gradient_checkpointing",
                                     "batch_size"))
    kw["sharding"] = args.sharding or ("none" if args.num_processes == 1 or kw.get("deepspeed") or kw.get("fsdp")
                                       else "ddp")
    base = TrainingSetup(**kw)
    if base.group_by_length != (args.data is not None) or (args.data is not None and args.max_seq):
        raise UserError("bench plan --data FILE searches the micro-batch at the file's longest sample: give it with "
                        "--group-by-length (each micro-batch padded to its longest), without --max-seq; --padding-free "
                        "--data is estimated by bench estimate, not searched yet")
    if args.data is not None:
        base = replace(base, seq_len=max(len(x) for x in samples(args.data, base.seq_len)))
    if base.offload_optimizer != "none" or base.offload_param != "none":
        raise UserError("bench plan does not search a given offload yet: bench estimate --deepspeed/--fsdp gives its "
                        "per-rank device and host figures, and bench plan offers offload itself when nothing fits")
    targets = setup_kwargs(args).get("optim_target_modules")
    files = [] if args.no_calibrate else (args.results or [str(p) for p in default_result_files()])
    records = _result_records(files, given=bool(args.results)) if files else []
    single = len(args.optim or []) == 1 and "all" not in ",".join(args.optim).lower()
    return P.plan(base, expand_optims(args.optim), args.gpus, gpu_files=args.gpu_file,
                  search="seq" if args.max_seq else "batch", batch_size=args.batch_size or 1,
                  checkpointing=args.gradient_checkpointing, headroom=args.headroom, mfu=args.mfu,
                  records=records, calibration_files=[str(f) for f in files], strict=single,
                  optim_args=args.optim_args, optim_target_modules=targets)


# ---------------------------------------------------------------------------------------------- output
def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"


def _tps(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    return f"{x / 1000:.1f}k" if x >= 10000 else f"{x:,.0f}"


def _phase(name: str | None) -> str:
    """'steady.optimizer_step' -> 'step'; 'step0.backward' -> 'bwd (1st)'."""
    if not name:
        return "-"
    kind = name.rsplit(".", 1)[-1]
    short = {"forward": "fwd", "backward": "bwd", "optimizer_step": "step"}.get(kind, kind)
    return short + (" (1st)" if name.startswith("step0") else "")


def _cell(r: P.PlanRow) -> str:
    if r.max_seq_len is not None or r.max_seq_len_by_checkpointing:
        return _seq_cell(r)
    return cell_text(r)


def _seq_cell(r: P.PlanRow) -> str:
    """'3709/18801c' (tokens without / with checkpointing), '18801c' (only with it), '131072+' (the model's
    position limit), '-' (not even one token), 'n/a'."""
    if r.status == "unsupported":
        return "n/a"
    if r.status != "fits":
        return "-"
    by = r.max_seq_len_by_checkpointing

    def cap(n: int) -> str:
        return "+" if r.seq_limit and n >= r.seq_limit else ""

    if len(by) == 2 and by["off"] and by["on"] > by["off"]:
        return f"{by['off']}{cap(by['off'])}/{by['on']}{cap(by['on'])}c"
    return f"{r.max_seq_len}{cap(r.max_seq_len)}{'c' if r.gradient_checkpointing else ''}"


def _precision(plan) -> str:
    mp = plan.base.mixed_precision
    return f"{plan.base.dtype} weights" + (f" + {mp} autocast" if mp else " (no autocast)")


def _header(plan) -> list[str]:
    f = plan.sizes
    n, sh = plan.base.num_processes, plan.base.sharding
    gpus_txt = "1 GPU" if n == 1 and sh == "none" else f"{n} GPUs, {sh}"
    shape = (f"micro-batch {plan.batch_size}, longest sequence searched" if plan.search == "seq"
             else f"seq {plan.base.seq_len}")
    adapter = ""
    base = plan.base
    if base is not None and base.peft:
        adapter = (f"LoRA {base.lora}" if base.lora else "") + (f" over {base.quantize}" if base.quantize else "")
        adapter += f" ({human_count(f.trainable_params)} trainable), "
    lines = [f"{plan.model} ({plan.architecture}): {human_count(f.num_params)} parameters, {adapter}"
             f"{_precision(plan)}, {shape}, gradient checkpointing {plan.checkpointing}, {gpus_txt}"]
    fpt = plan.flops_per_token
    used = sorted({(r.gpu, r.mfu_source) for r in plan.rows if r.mfu_source.startswith("measured")})
    mfu_txt = (f"MFU {plan.mfu:.2f} assumed" + (f", measured on {', '.join(g for g, _ in used)}" if used else
                                                  (" (no recorded run of this model on these GPUs)"
                                                   if plan.calibration_files else " (no recorded runs)")))
    fit = (f"predicted per-GPU peak <= usable memory - {plan.headroom:.0%} allocator headroom"
           if plan.base is not None and plan.base.sharding != "none" else
           "the step's allocations replayed through the CUDA caching allocator's rules (estimators/allocator.py; "
           "a rule from its source, not a measurement): reserved <= usable memory (reported - CUDA context)")
    lines.append(f"Fit: {fit}. "
                 f"Tokens/s = MFU x dense peak / {fpt / 1e9:.1f} GFLOP per token (6N + 12LdS), x3/4 with "
                 f"checkpointing; {mfu_txt}.")
    return lines


def render(plan) -> str:
    gpus, optims, rows = plan.gpus, plan.optims, plan.rows
    by = {(r.optim, r.gpu): r for r in rows}
    lines = _header(plan)
    if plan.search == "seq":
        lines += ["", f"Longest sequence per GPU at micro-batch {plan.batch_size} (tokens; a/bc: a without, b with "
                      "gradient checkpointing; bc: only with it; +: the model's position limit; -: not even one "
                      "token fits; n/a: cannot run so)"]
    else:
        lines += ["", "Largest micro-batch per GPU (a/bc: a without, b with gradient checkpointing; bc: only with it; "
                      "-: micro-batch 1 does not fit; n/a: cannot run so)"]
    headers = ["optimizer"] + [g.id for g in gpus]
    table = [[o] + [_cell(by[(o, g.id)]) if (o, g.id) in by else "?" for g in gpus] for o in optims]
    lines.append(format_table(headers, table))
    lines.append("usable GiB  " + "  ".join(f"{g.id}={_gib(g.usable_bytes)}{'~' if 'reported_gib' in g.unsure else ''}"
                                            for g in gpus))
    # Per optimizer: the smallest GPU that fits, with the breakdown at its largest micro-batch.
    lines += ["", "Smallest GPU that fits, per optimizer: memory per GPU in GiB at the peak of a step at that "
                  "micro-batch (activ: activations; temp: backward/step temporaries"
                  + ("; shard+: gathered unit / DDP buckets" if plan.base.sharding != "none" else "")
                  + "; peak at: the phase)"]
    detail = []
    sharded = plan.base.sharding != "none"
    size = {g.id: P.size_key(g) for g in gpus}
    for o in optims:
        fit = [by[(o, g.id)] for g in gpus if (o, g.id) in by and by[(o, g.id)].status == "fits"]
        if not fit:
            mine = [by[(o, g.id)] for g in gpus if (o, g.id) in by]
            opts = P.cheapest_to_fit(plan, o)
            if opts:
                what = "fits no listed GPU; fewest: " + ", ".join(opts)
            elif mine and all(r.status == "unsupported" for r in mine):
                what = f"cannot run under {plan.base.sharding} (see Notes)" if plan.base.sharding != "none" \
                    else "cannot run here (see Notes)"
            else:
                what = "fits no listed GPU, and no sharding of them fits micro-batch 1"
            detail.append([o] + ["-"] * (16 if sharded else 15) + [what])
            continue
        r = min(fit, key=lambda r: (size[r.gpu], -(r.tokens_per_s or 0)))
        b = r.breakdown
        note = []
        if r.host_state >= GIB // 20:
            note.append(f"+{_gib(r.host_state)} GiB state on host")
        fastest = max(fit, key=lambda r: r.tokens_per_s or 0)
        fast = f"{fastest.gpu} {_tps(fastest.tokens_per_s)}" if fastest.gpu != r.gpu and fastest.tokens_per_s else ""
        size_cell = r.max_seq_len if plan.search == "seq" else r.max_micro_batch
        detail.append([o, r.gpu if r.num_gpus == 1 else f"{r.num_gpus}x {r.gpu}",
                       f"{size_cell}{'+' if r.at_cap else ''}",
                       "on" if r.gradient_checkpointing else "off", _gib(b["weights"]), _gib(b["gradients"]),
                       _gib(b["optimizer_state"]), _gib(b["activations"]),
                       _gib(b["temporaries"] + b["other"]), *([_gib(b["sharding_overhead"])] if sharded else []),
                       _phase(r.peak_phase),
                       f"{_gib(r.peak)}/{_gib(r.budget)}",
                       _gib(r.reserved) if r.reserved is not None else "-",
                       _gib(r.device_total) if r.device_total is not None else "-",
                       _tps(r.tokens_per_s), f"{r.mfu:.2f}", fast,
                       "; ".join(note)])
    lines.append(format_table(["optimizer", "GPU", "seq" if plan.search == "seq" else "batch", "ckpt",
                               "weights", "grads", "state", "activ", "temp",
                               *(["shard+"] if sharded else []), "peak at", "peak/budget", "reserved",
                               "device total", "tok/s", "MFU", "fastest (tok/s)", "notes"],
                              detail, align="llrlrrrrr" + ("r" if sharded else "") + "lrrrrrll"))
    rec = plan.recommendation
    lines += ["", "Recommendation"]
    if rec:
        c, f = rec["cheapest"], rec["fastest"]
        n = plan.base.num_processes
        def at(r: dict) -> str:
            if plan.search == "seq":
                return f"sequence {r['max_seq_len']} (micro-batch {r['max_micro_batch']})"
            return f"micro-batch {r['max_micro_batch']}"

        lines.append(f"  cheapest fit: {c['optim']} on {n}x {c['gpu']} at {at(c)}"
                     f"{' with gradient checkpointing' if c['gradient_checkpointing'] else ''}, "
                     f"~{_tps(c['tokens_per_s'])} tokens/s ({rec['cheapest_basis']})")
        lines.append(f"  fastest: {f['optim']} on {n}x {f['gpu']} at {at(f)}"
                     f"{' with gradient checkpointing' if f['gradient_checkpointing'] else ''}, "
                     f"~{_tps(f['tokens_per_s'])} tokens/s")
    else:
        lines.append("  nothing fits on the GPUs listed at this setting")
    for o in optims:
        if any(by.get((o, g.id)) and by[(o, g.id)].status == "fits" for g in gpus):
            continue
        opts = P.cheapest_to_fit(plan, o)
        if opts:
            cannot = [sh for sh in ("fsdp", "zero3") if not sharding_support(o, sh, 2)[0]]
            txt = f"  to fit {o}: " + ", or ".join(opts)
            if cannot:
                txt += f" ({'/'.join(cannot)}: {sharding_support(o, cannot[0], 2)[1]})"
            lines.append(txt)
    for o, off in plan.offload.items():
        lines.append(f"  with CPU offload: {o} fits {off['num_gpus']}x {off['gpu']} at micro-batch 1"
                     f"{' with gradient checkpointing' if off['gradient_checkpointing'] else ''} under "
                     f"{off['scheme']}: {_gib(off['device_peak'])} GiB per GPU, host RAM "
                     f"{_gib(off['host_per_node'])} GiB per node (--deepspeed with {off['deepspeed']}; rule from "
                     "DeepSpeed's source, not measured)")
    for g in gpus:
        if any(by.get((o, g.id)) and by[(o, g.id)].status == "fits" for o in optims):
            continue
        opts = []
        for o in optims:
            h = (plan.to_fit.get(o) or {}).get(g.id) or {}
            for sh in ("fsdp", "zero3"):
                if h.get(sh):
                    opts.append((h[sh], optims.index(o), o, sh))
        opts.sort()
        best, seen = [], set()
        for n, _, o, sh in opts:
            fam = get_spec(o).family
            if fam not in seen:
                seen.add(fam)
                best.append(f"{n}x with {o} ({sh})")
            if len(best) == 2:
                break
        ckpt = [o for o in optims if ((plan.to_fit.get(o) or {}).get(g.id) or {}).get("with_checkpointing")]
        if ckpt:
            best.insert(0, f"1 GPU with --gradient-checkpointing on for {', '.join(ckpt[:3])}"
                           + ("..." if len(ckpt) > 3 else ""))
        why = next((by[(o, g.id)].reason for o in optims if by.get((o, g.id)) and
                    by[(o, g.id)].status == "unsupported" and "no bf16" in by[(o, g.id)].reason), "")
        lines.append(f"  on {g.id}: nothing planned fits one GPU" + (f"; fewest: {', '.join(best)}" if best else "")
                     + (f" ({why.split(':')[0]})" if why and not best else ""))
    notes: dict[str, list[str]] = {}
    for r in rows:
        for n in ([r.reason] if r.status == "unsupported" else []) + r.notes:
            who = notes.setdefault(n, [])
            if r.optim not in who:
                who.append(r.optim)
    if plan.skipped or notes:
        lines += ["", "Notes"]
        lines += [f"  {s['optim']}: not planned: {s['reason']}" for s in plan.skipped]
        for n, who in notes.items():
            named = any(o in n for o in who)
            lines.append(f"  {n}" if named or len(who) == len(optims) else f"  {', '.join(who)}: {n}")
    lines += ["", "GiB = 2^30 bytes. '~' marks catalog figures recalled rather than read off a datasheet "
                  "(estimators/gpus.json). Multi-GPU tokens/s assume no communication cost (an upper bound)."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(render(plan))
    if args.plot:  # after the plan is printed: a failing write loses nothing computed

        plot_plan(plan, args.plot)
        if not args.json:
            print(f"\nplots written to {args.plot}")
    return 0
