"""``bench plan``: which optimizer fits on which GPU, at what micro-batch, how fast; what sharding buys.

The arithmetic lives in :mod:`optimem.estimators.planner` (pure functions over the whole-step estimator and the GPU
catalog ``estimators/gpus.json``); this module parses arguments, runs the grid and prints it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from optimem.estimators import UserError, get_spec
from optimem.estimators import planner as P
from optimem.estimators.catalog import resolve
from optimem.estimators.setup import TrainingSetup
from optimem.harness.commands.argtypes import add_no_cache
from optimem.harness.commands.estimate import expand_optims as expand_estimate_optims
from optimem.harness.commands.setup_args import add_setup_arguments, field_defaults, setup_kwargs
from optimem.harness.units import format_table, human_count

GIB = 1 << 30


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="capacity planning: which GPU, how many, what micro-batch, for each optimizer (no GPU needed)",
        description="For each optimizer x GPU: does it fit, the largest micro-batch (bisection over the whole-step "
                    "estimator), the per-GPU memory breakdown, tokens/s from model FLOPs and an MFU (assumed, or "
                    "measured by recorded runs), and what sharding over N GPUs buys. No GPU, no download.")
    p.add_argument("--gpus", default="all", metavar="LIST|all",
                   help="GPU ids from the catalog, comma-separated (e.g. 'h100-sxm,l4'), or 'all' (default)")
    add_setup_arguments(p, defaults={**field_defaults(), **P.PLAN_DEFAULTS, "optim": None,
                                     "num_processes": 1, "sharding": None, "batch_size": None},
                        multi=("optim",), exclude=("gradient_checkpointing", "device"),
                        help_suffix={"optim": "(comma-separated or repeated) or 'all'; default: "
                                              + ", ".join(P.DEFAULT_OPTIMS),
                                     "sharding": "(default none for 1 GPU, ddp for several)",
                                     "optim_args": "(applied where read)",
                                     "batch_size": "(only with --max-seq, default 1: the micro-batch the sequence "
                                                   "search holds; otherwise the micro-batch is what is searched)",
                                     "seq_len": "(not read with --max-seq)"})
    p.add_argument("--max-seq", action="store_true",
                   help="search the longest sequence that fits at --batch-size instead of the largest micro-batch "
                        "at --seq-len (up to the model's position limit)")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto (default): off when micro-batch 1 fits without it, else on")
    p.add_argument("--headroom", type=float, default=P.DEFAULT_HEADROOM,
                   help=f"fraction of usable memory kept free for allocator fragmentation (default "
                        f"{P.DEFAULT_HEADROOM})")
    p.add_argument("--mfu", type=float, default=P.DEFAULT_MFU,
                   help=f"MFU assumed where no recorded run calibrates it (default {P.DEFAULT_MFU})")
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


def _setup_for(args, optim: str, base: TrainingSetup) -> TrainingSetup:
    return base.with_optimizer(optim, args.optim_args, setup_kwargs(args).get("optim_target_modules"))


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
        from optimem.harness.paths import check_output_file, check_output_suffix

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
    import sys

    from optimem.harness.record import read_records

    out: list[dict] = []
    for f in files:
        try:
            out.extend(r for r in read_records(f) if not r.get("kind"))
        except UserError as exc:
            if given:
                raise UserError(f"--results: {exc}") from None
            print(f"bench plan: warning: {exc} (not used to calibrate MFU)", file=sys.stderr)
    return out


def build_plan(args) -> dict:
    """Run the grid; everything the table, the JSON and the plots need."""
    _check_args(args)
    catalog = P.load_gpus(args.gpu_file)
    gpus = P.select_gpus(args.gpus, catalog)
    optims = expand_optims(args.optim)
    kw = setup_kwargs(args, exclude=("optim", "optim_args", "optim_target_modules", "gradient_checkpointing",
                                     "batch_size"))
    kw["sharding"] = args.sharding or ("none" if args.num_processes == 1 or kw.get("deepspeed") or kw.get("fsdp")
                                       else "ddp")
    if args.max_seq:
        kw["seq_len"] = 1  # the search sets it (up to the model's position limit)
    base = TrainingSetup(**kw)
    if base.offload_optimizer != "none" or base.offload_param != "none":
        raise UserError("bench plan does not search a given offload yet: bench estimate --deepspeed/--fsdp gives its "
                        "per-rank device and host figures, and bench plan offers offload itself when nothing fits")
    base.check_trainable()  # the model config and the sequence length, once, before any optimizer is planned
    base = replace(base, model=resolve(base.model).name)
    model, mp, sharding = base.model, base.mixed_precision, base.sharding
    batch = args.batch_size or 1
    if base.peft:
        _check_peak(_setup_for(args, optims[0], base))
    inv = P.setup_inventory(_setup_for(args, optims[0], base)) if base.peft else P._inventory(model, base.dtype)
    facts = P.model_facts(inv)
    files = [] if args.no_calibrate else (args.results or [str(p) for p in P.default_result_files()])
    calibration = P.calibrate(_result_records(files, given=bool(args.results)), catalog) if files else {}
    rows: list[P.PlanRow] = []
    skipped: list[dict] = []
    for optim in optims:
        setup = _setup_for(args, optim, base)
        per_optim = []
        for gpu in gpus:
            if mp == "bf16" and not gpu.tflops.get("bf16"):
                per_optim.append(P.PlanRow(optim=optim, gpu=gpu.id, gpu_name=gpu.name, status="unsupported",
                                           reason=f"{gpu.name} has no bf16: the Trainer refuses bf16=True there; "
                                                  "use --fp16", budget=gpu.budget(args.headroom),
                                           num_gpus=base.num_processes, sharding=sharding))
                continue
            try:
                if args.max_seq:
                    per_optim.append(P.plan_seq(setup, gpu, batch=batch, headroom=args.headroom,
                                                checkpointing=args.gradient_checkpointing, calibration=calibration,
                                                mfu=args.mfu))
                else:
                    per_optim.append(P.plan_one(setup, gpu, headroom=args.headroom,
                                                checkpointing=args.gradient_checkpointing, calibration=calibration,
                                                mfu=args.mfu))
            except UserError as exc:
                if len(optims) == 1 and args.optim and "all" not in ",".join(args.optim).lower():
                    raise
                skipped.append({"optim": optim, "reason": str(exc)})
                per_optim = []
                break
        rows.extend(per_optim)
    if not rows:
        raise UserError("nothing to plan: " + "; ".join(f"{s['optim']}: {s['reason']}" for s in skipped))
    planned = [o for o in optims if any(r.optim == o for r in rows)]
    hints = {} if args.max_seq else {o: _to_fit(args, base, o, gpus, rows) for o in planned}
    offers = {} if args.max_seq else _offload_offers(args, base, planned, gpus, rows)
    return {"model": model, "architecture": inv.architecture, "facts": facts, "gpus": gpus, "optims": planned,
            "search": "seq" if args.max_seq else "batch", "batch_size": batch,
            "rows": rows, "skipped": skipped, "hints": hints, "offload": offers, "dtype": base.dtype,
            "mixed_precision": mp,
            "sharding": sharding, "num_gpus": base.num_processes, "seq_len": base.seq_len,
            "checkpointing": args.gradient_checkpointing, "headroom": args.headroom, "mfu": args.mfu,
            "calibration": calibration, "calibration_files": [str(f) for f in files], "base": base,
            "recommendation": _recommend(rows, gpus, planned)}


def _check_peak(setup: TrainingSetup) -> None:
    """Planning fits the whole-step peak: refuse, in one line, a setup the estimator has no peak for."""
    from optimem.estimators import estimate

    est = estimate(setup, batch_size=1, device="cuda")
    if est.bytes["peak"] is None:
        raise UserError(f"bench plan fits the whole-step peak, and for this setup there is none: {est.notes[-1]}")


def _size_key(gpu: P.GPU, headroom: float = 0.0):
    """A price proxy with no prices: nominal memory, then compute (an A100 80GB before an H100)."""
    return (gpu.memory_gb, gpu.tflops.get("bf16") or gpu.tflops.get("fp16") or 0, gpu.budget(headroom))


def _to_fit(args, base: TrainingSetup, optim: str, gpus: list[P.GPU], rows: list[P.PlanRow]) -> dict:
    """For each GPU a planned optimizer does not fit: the fewest such GPUs on which micro-batch 1 fits under
    FSDP and under ZeRO-3 (None: not even 1024, or the optimizer cannot run so), and whether gradient
    checkpointing alone would do when it was turned off. ``{gpu id: {...}}``."""
    setup = _setup_for(args, optim, base)
    ckpt = args.gradient_checkpointing != "off"
    s = replace(setup, gradient_checkpointing=ckpt)
    out: dict = {}
    for g in gpus:
        r = next((r for r in rows if r.optim == optim and r.gpu == g.id), None)
        if r is None or r.status != "no_fit":
            continue
        hint: dict = {}
        if args.gradient_checkpointing == "off":
            hint["with_checkpointing"] = P.fits(replace(setup, gradient_checkpointing=True), 1,
                                                g.budget(args.headroom))
        for sh in ("fsdp", "zero3"):
            hint[sh] = P.min_gpus_to_fit(s, g, sharding=sh, headroom=args.headroom)
        out[g.id] = hint
    return out


def _offload_offers(args, base: TrainingSetup, optims: list[str], gpus: list[P.GPU], rows: list[P.PlanRow]) -> dict:
    """For each optimizer that fits no listed GPU: the least CPU offload (DeepSpeed ZeRO-3, one node of
    ``max(--nproc, 8)`` GPUs of the largest listed kind) under which micro-batch 1 fits, with the host RAM it needs
    (:func:`optimem.estimators.offload_plan.offload_offer`); ``{optim: offer dict}``."""
    from dataclasses import asdict

    from optimem.estimators.offload_plan import offload_offer

    out: dict = {}
    biggest = max(gpus, key=lambda g: g.budget(args.headroom))
    for o in optims:
        if any(r.optim == o and r.status == "fits" for r in rows) or not P.sharding_support(o, "zero3", 8)[0]:
            continue
        setup = replace(_setup_for(args, o, base), batch_size=1,
                        gradient_checkpointing=args.gradient_checkpointing != "off")
        offer = offload_offer(setup, biggest.budget(args.headroom))
        if offer is not None:
            out[o] = {**asdict(offer), "gpu": biggest.id, "gradient_checkpointing": setup.gradient_checkpointing,
                      "deepspeed": "{" + offer.config_hint() + "}"}
    return out


def _cheapest_hints(plan, optim: str, k: int = 3) -> list[str]:
    """The ``k`` multi-GPU options for an optimizer that fits no single listed GPU, least total memory first
    (a price proxy): '2x h200 (fsdp)'."""
    gpus = {g.id: g for g in plan["gpus"]}
    opts = []
    for gid, h in (plan["hints"].get(optim) or {}).items():
        for sh in ("fsdp", "zero3"):
            if h.get(sh):
                opts.append((h[sh] * gpus[gid].total_bytes, h[sh], gid, sh))
    opts.sort()
    seen, out = set(), []
    for _, n, gid, sh in opts:
        if gid in seen:
            continue
        seen.add(gid)
        out.append(f"{n}x {gid} ({sh})")
        if len(out) == k:
            break
    return out


def _recommend(rows: list[P.PlanRow], gpus: list[P.GPU], optims: list[str]) -> dict:
    """The cheapest fitting choice (lowest $/token where every fitting GPU has a price, else the smallest
    fitting GPU, then most tokens/s) and the fastest."""
    by_id = {g.id: g for g in gpus}
    fit = [r for r in rows if r.status == "fits"]
    if not fit:
        return {}
    priced = all(by_id[r.gpu].usd_per_hour is not None and r.tokens_per_s for r in fit)
    if priced:
        cheapest = min(fit, key=lambda r: by_id[r.gpu].usd_per_hour * r.num_gpus / r.tokens_per_s)
        basis = "lowest cost per token (usd_per_hour from the GPU file)"
    else:
        cheapest = min(fit, key=lambda r: (_size_key(by_id[r.gpu]), -(r.tokens_per_s or 0), -r.max_micro_batch))
        basis = "the smallest GPU that fits, then the most tokens/s: no prices in the catalog"
    fastest = max(fit, key=lambda r: r.tokens_per_s or 0)
    return {"cheapest": cheapest.to_dict(), "cheapest_basis": basis, "fastest": fastest.to_dict()}


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
    from optimem.harness.plan_plots import cell_text

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
    mp = plan["mixed_precision"]
    return f"{plan['dtype']} weights" + (f" + {mp} autocast" if mp else " (no autocast)")


def _header(plan) -> list[str]:
    f = plan["facts"]
    n, sh = plan["num_gpus"], plan["sharding"]
    gpus_txt = "1 GPU" if n == 1 and sh == "none" else f"{n} GPUs, {sh}"
    shape = (f"micro-batch {plan['batch_size']}, longest sequence searched" if plan.get("search") == "seq"
             else f"seq {plan['seq_len']}")
    adapter = ""
    base = plan.get("base")
    if base is not None and base.peft:
        adapter = (f"LoRA {base.lora}" if base.lora else "") + (f" over {base.quantize}" if base.quantize else "")
        adapter += f" ({human_count(f.trainable_params)} trainable), "
    lines = [f"{plan['model']} ({plan['architecture']}): {human_count(f.num_params)} parameters, {adapter}"
             f"{_precision(plan)}, {shape}, gradient checkpointing {plan['checkpointing']}, {gpus_txt}"]
    fpt = P.flops_per_token(f, plan["seq_len"])
    used = sorted({(r.gpu, r.mfu_source) for r in plan["rows"] if r.mfu_source.startswith("measured")})
    mfu_txt = (f"MFU {plan['mfu']:.2f} assumed" + (f", measured on {', '.join(g for g, _ in used)}" if used else
                                                  (" (no recorded run of this model on these GPUs)"
                                                   if plan["calibration_files"] else " (no recorded runs)")))
    lines.append(f"Fit: predicted per-GPU peak <= usable memory - {plan['headroom']:.0%} allocator headroom. "
                 f"Tokens/s = MFU x dense peak / {fpt / 1e9:.1f} GFLOP per token (6N + 12LdS), x3/4 with "
                 f"checkpointing; {mfu_txt}.")
    return lines


def render(plan) -> str:
    gpus, optims, rows = plan["gpus"], plan["optims"], plan["rows"]
    by = {(r.optim, r.gpu): r for r in rows}
    lines = _header(plan)
    if plan.get("search") == "seq":
        lines += ["", f"Longest sequence per GPU at micro-batch {plan['batch_size']} (tokens; a/bc: a without, b with "
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
                  + ("; shard+: gathered unit / DDP buckets" if plan["sharding"] != "none" else "")
                  + "; peak at: the phase)"]
    detail = []
    sharded = plan["sharding"] != "none"
    size = {g.id: _size_key(g) for g in gpus}
    for o in optims:
        fit = [by[(o, g.id)] for g in gpus if (o, g.id) in by and by[(o, g.id)].status == "fits"]
        if not fit:
            mine = [by[(o, g.id)] for g in gpus if (o, g.id) in by]
            opts = _cheapest_hints(plan, o)
            if opts:
                what = "fits no listed GPU; fewest: " + ", ".join(opts)
            elif mine and all(r.status == "unsupported" for r in mine):
                what = f"cannot run under {plan['sharding']} (see Notes)" if plan["sharding"] != "none" \
                    else "cannot run here (see Notes)"
            else:
                what = "fits no listed GPU, and no sharding of them fits micro-batch 1"
            detail.append([o] + ["-"] * (14 if sharded else 13) + [what])
            continue
        r = min(fit, key=lambda r: (size[r.gpu], -(r.tokens_per_s or 0)))
        b = r.breakdown
        note = []
        if r.host_state >= GIB // 20:
            note.append(f"+{_gib(r.host_state)} GiB state on host")
        fastest = max(fit, key=lambda r: r.tokens_per_s or 0)
        fast = f"{fastest.gpu} {_tps(fastest.tokens_per_s)}" if fastest.gpu != r.gpu and fastest.tokens_per_s else ""
        size_cell = r.max_seq_len if plan.get("search") == "seq" else r.max_micro_batch
        detail.append([o, r.gpu if r.num_gpus == 1 else f"{r.num_gpus}x {r.gpu}",
                       f"{size_cell}{'+' if r.at_cap else ''}",
                       "on" if r.gradient_checkpointing else "off", _gib(b["weights"]), _gib(b["gradients"]),
                       _gib(b["optimizer_state"]), _gib(b["activations"]),
                       _gib(b["temporaries"] + b["other"]), *([_gib(b["sharding_overhead"])] if sharded else []),
                       _phase(r.peak_phase),
                       f"{_gib(r.peak)}/{_gib(r.budget)}", _tps(r.tokens_per_s), f"{r.mfu:.2f}", fast,
                       "; ".join(note)])
    lines.append(format_table(["optimizer", "GPU", "seq" if plan.get("search") == "seq" else "batch", "ckpt",
                               "weights", "grads", "state", "activ", "temp",
                               *(["shard+"] if sharded else []), "peak at", "peak/budget", "tok/s", "MFU",
                               "fastest (tok/s)", "notes"],
                              detail, align="llrlrrrrr" + ("r" if sharded else "") + "lrrrll"))
    rec = plan["recommendation"]
    lines += ["", "Recommendation"]
    if rec:
        c, f = rec["cheapest"], rec["fastest"]
        n = plan["num_gpus"]
        def at(r: dict) -> str:
            if plan.get("search") == "seq":
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
        opts = _cheapest_hints(plan, o)
        if opts:
            cannot = [sh for sh in ("fsdp", "zero3") if not P.sharding_support(o, sh, 2)[0]]
            txt = f"  to fit {o}: " + ", or ".join(opts)
            if cannot:
                txt += f" ({'/'.join(cannot)}: {P.sharding_support(o, cannot[0], 2)[1]})"
            lines.append(txt)
    for o, off in (plan.get("offload") or {}).items():
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
            h = (plan["hints"].get(o) or {}).get(g.id) or {}
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
        ckpt = [o for o in optims if ((plan["hints"].get(o) or {}).get(g.id) or {}).get("with_checkpointing")]
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
    if plan["skipped"] or notes:
        lines += ["", "Notes"]
        lines += [f"  {s['optim']}: not planned: {s['reason']}" for s in plan["skipped"]]
        for n, who in notes.items():
            named = any(o in n for o in who)
            lines.append(f"  {n}" if named or len(who) == len(optims) else f"  {', '.join(who)}: {n}")
    lines += ["", "GiB = 2^30 bytes. '~' marks catalog figures recalled rather than read off a datasheet "
                  "(estimators/gpus.json). Multi-GPU tokens/s assume no communication cost (an upper bound)."]
    return "\n".join(lines)


def to_json(plan) -> dict:
    from dataclasses import asdict

    return {
        "model": plan["model"], "architecture": plan["architecture"], "facts": asdict(plan["facts"]),
        "search": plan.get("search", "batch"),
        "setup": {"dtype": plan["dtype"], "mixed_precision": plan["mixed_precision"], "seq_len": plan["seq_len"],
                  **({"batch_size": plan["batch_size"]} if plan.get("search") == "seq" else {}),
                  **{k: v for k, v in plan["base"].to_dict().items()
                     if k in ("lora", "quantize", "double_quant", "quant_compute_dtype", "prepare_kbit")},
                  "gradient_checkpointing": plan["checkpointing"], "num_gpus": plan["num_gpus"],
                  "sharding": plan["sharding"], "headroom": plan["headroom"], "assumed_mfu": plan["mfu"]},
        "flops_per_token": P.flops_per_token(plan["facts"], plan["seq_len"]),
        "gpus": [{**asdict(g), "usable_bytes": g.usable_bytes, "budget_bytes": g.budget(plan["headroom"])}
                 for g in plan["gpus"]],
        "rows": [r.to_dict() for r in plan["rows"]],
        "to_fit": plan["hints"], "offload": plan.get("offload") or {}, "recommendation": plan["recommendation"],
        "skipped": plan["skipped"],
        "calibration": [asdict(c) for c in plan["calibration"].values()],
        "calibration_files": plan["calibration_files"],
    }


def main(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(to_json(plan), indent=2, default=str))
    else:
        print(render(plan))
    if args.plot:  # after the plan is printed: a failing write loses nothing computed
        from optimem.harness.plan_plots import plot_plan

        plot_plan(plan, args.plot)
        if not args.json:
            print(f"\nplots written to {args.plot}")
    return 0
