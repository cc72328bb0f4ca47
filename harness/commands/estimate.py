"""``bench estimate``: predicted bytes per component for one model and one or more optimizers."""
from __future__ import annotations

import argparse
import json

from estimators import DEFAULT_MODEL, UserError, estimate, get_spec, names
from estimators.inventory import TASKS, build_inventory
from harness.units import format_table, human_bytes, human_count

DEFAULT_TARGETS = "all-linear"


def register(sub) -> None:
    p = sub.add_parser("estimate", help="predict a training step's memory: state, weights, gradients, activations, "
                                        "peak (no GPU needed)",
                       description="Predict the bytes a Trainer run holds, per optimizer, from the model's real "
                                   "parameter shapes and architecture: optimizer state, weights, gradients, "
                                   "activations and the whole step's peak, phase by phase. No GPU, no download.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or path to a config.json "
                                                          f"(default {DEFAULT_MODEL})")
    p.add_argument("--optim", action="append", required=True, metavar="NAME",
                   help="optimizer name as TrainingArguments(optim=...) takes it; repeat it, or 'all'")
    p.add_argument("--dtype", default="fp32", help="dtype the parameters are stored in: fp32, bf16, fp16")
    p.add_argument("--optim-args", default=None, help="the Trainer's optim_args string, e.g. 'rank=16'")
    p.add_argument("--optim-target-modules", nargs="+", default=None, metavar="REGEX",
                   help="GaLore/APOLLO targets (default for those: all-linear)")
    p.add_argument("--freeze", default=None, metavar="REGEX", help="freeze parameters whose name matches")
    p.add_argument("--batch-size", type=int, default=1, help="per-device batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K", help="gradient accumulation steps")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="the Trainer's gradient checkpointing (non-reentrant, every layer)")
    mp = p.add_mutually_exclusive_group()
    mp.add_argument("--bf16", action="store_const", const="bf16", dest="mixed_precision",
                    help="bf16 mixed precision (TrainingArguments(bf16=True): autocast; --dtype stays the storage)")
    mp.add_argument("--fp16", action="store_const", const="fp16", dest="mixed_precision",
                    help="fp16 mixed precision (TrainingArguments(fp16=True))")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="training device: cuda (foreach optimizer paths, CUDA overhead terms) or cpu (default cuda)")
    p.add_argument("--task", default=None, choices=sorted(TASKS), help="the head to train (default: the config's "
                   "architecture, else causal LM)")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                   help="attention implementation (default sdpa, what the Trainer gets)")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="use this GPU's calibrated CUDA constants (torch.cuda.get_device_name(); see "
                        "'python -m estimators.cuda_overhead show')")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per optimizer")
    p.set_defaults(mixed_precision=None)
    p.set_defaults(func=main)


def expand_optims(values: list[str], *, all_includes_unavailable: bool = True) -> list[str]:
    """Names from ``--optim`` (repeated or comma-separated). 'all' means every registered name (or only those
    optimem can estimate); a name given explicitly must be known and estimable, else UserError."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "all":
                batch = names(include_unavailable=all_includes_unavailable)
            else:
                spec = get_spec(item)
                if spec.availability != "ok":
                    raise UserError(spec.reason)
                batch = [spec.name]
            out.extend(n for n in batch if n not in out)
    return out


def _targets(args, spec):
    if not spec.needs_target_modules:
        return None
    if not args.optim_target_modules:
        return DEFAULT_TARGETS
    tm = args.optim_target_modules
    return tm[0] if len(tm) == 1 else tm


def main(args: argparse.Namespace) -> int:
    optims = expand_optims(args.optim)
    inv = build_inventory(args.model, task=args.task)
    results, skipped = [], []
    for name in optims:
        spec = get_spec(name)
        if spec.availability != "ok":
            skipped.append({"optim": name, "status": spec.availability, "reason": spec.reason})
            continue
        # optim_args apply only to the optimizers that read them when several are asked for.
        optim_args = args.optim_args
        if optim_args and len(optims) > 1:
            from estimators.optimizers import parse_optim_args

            parsed = parse_optim_args(optim_args)
            optim_args = {k: v for k, v in parsed.items() if k in spec.arg_types}
        try:
            est = estimate(inv, name, dtype=args.dtype, optim_args=optim_args,
                           optim_target_modules=_targets(args, spec), batch_size=args.batch_size,
                           seq_len=args.seq_len, freeze=args.freeze, grad_accum=args.grad_accum,
                           gradient_checkpointing=args.gradient_checkpointing,
                           mixed_precision=args.mixed_precision, device=args.device,
                           attn_implementation=args.attn_implementation, gpu=args.gpu, task=args.task)
        except UserError as exc:
            if len(optims) == 1:
                raise
            skipped.append({"optim": name, "status": "not_applicable", "reason": str(exc)})
            continue
        if spec.needs_target_modules and not args.optim_target_modules:
            est.notes.append(f"optim_target_modules not given: assumed '{DEFAULT_TARGETS}'")
        results.append(est)
    if args.json:
        out = []
        for est in results:
            d = est.to_dict()
            out.append({"optim": d["optim"], "model": d["model"], "dtype": d["dtype"], "num_params": d["num_params"],
                        "trainable_params": d["trainable_params"], "status": "ok", **d})
        out.extend(skipped)
        print(json.dumps(out, indent=2))
        return 0
    print(_table(inv, results, skipped, args))
    return 0


def _flags(e) -> str:
    """Short notes for the table (the full notes are in --json)."""
    spec = get_spec(e.optim)
    flags = []
    if not spec.runs_on_cpu:
        flags.append("GPU only")
    if spec.state_location == "host":
        flags.append("state on host")
    if not spec.keeps_gradients:
        flags.append("no stored grads")
    if spec.layerwise:
        flags.append("layer-wise: one grad at a time")
    if spec.needs_target_modules:
        flags.append(f"{e.targeted_params} params projected")
    return ", ".join(flags)


def _table(inv, results, skipped, args) -> str:
    first = results[0] if results else None
    head = (f"{inv.model} ({inv.architecture}): {human_count(inv.num_params)} parameters"
            + (f", {human_count(first.trainable_params)} trainable" if first and
               first.trainable_params != inv.num_params else "")
            + f", stored as {args.dtype}")
    rows = []
    cuda = args.device == "cuda"
    for e in sorted(results, key=lambda e: e.bytes["optimizer_state"]):
        b = e.bytes
        total = b["weights"] + b["gradients"] + b["optimizer_state"]
        row = [e.optim, human_bytes(b["optimizer_state"]), f"{e.state_bytes_per_param:.3f}",
               human_bytes(b["optimizer_state_host"]) if b["optimizer_state_host"] else "-",
               human_bytes(b["weights"]), human_bytes(b["gradients"]), human_bytes(total),
               human_bytes(b["activations"]), human_bytes(b["peak"]), _phase_label(e.peak_phase)]
        if cuda:
            row.append(human_bytes(e.cuda["peak_device"]))
        rows.append(row + [_flags(e)])
    cols = ["optimizer", "state", "B/param", "of it host", "weights", "gradients", "weights+grads+state",
            "activations", "peak", "at"] + (["on device"] if cuda else []) + ["notes"]
    table = format_table(cols, rows, align="lrrrrrrrrl" + ("r" if cuda else "") + "l")
    lines = [head, _settings_line(args), "", table]
    if skipped:
        lines.append("")
        lines.append("not estimated:")
        lines.extend(f"  {s['optim']}: {s['reason']}" for s in skipped)
    lines.append("")
    if any(get_spec(e.optim).needs_target_modules for e in results) and not args.optim_target_modules:
        lines.append(f"GaLore/APOLLO: optim_target_modules not given, assumed '{DEFAULT_TARGETS}'.")
    lines.append("Bytes in binary units (1 GiB = 2^30 B). peak: the whole training step's largest live tensor bytes "
                 "(weights, gradients, optimizer state, activations and logits, backward and optimizer-step "
                 "transients), at the phase named in 'at'; activations: what the forward leaves for the backward.")
    if cuda:
        first = results[0] if results else None
        cal = "calibrated" if first is not None and first.cuda["calibrated"] else "uncalibrated defaults"
        lines.append("on device: peak + CUDA-only terms (512 B block rounding, cuBLAS workspace, caching-allocator "
                     f"reserve, CUDA context; {cal}: see estimators/cuda_overhead.py).")
    return "\n".join(lines)


def _phase_label(phase: str) -> str:
    """``steady.optimizer_step`` -> ``optimizer step``; step 0 is marked."""
    step, kind = phase.split(".", 1)
    return kind.replace("_", " ") + (" (step 0)" if step == "step0" else "")


def _settings_line(args) -> str:
    parts = [f"batch {args.batch_size} x seq {args.seq_len}"]
    if args.grad_accum > 1:
        parts.append(f"x accum {args.grad_accum}")
    parts.append(f"{args.mixed_precision} autocast" if args.mixed_precision else "no autocast")
    parts.append("gradient checkpointing" if args.gradient_checkpointing else "no checkpointing")
    parts.append(f"{args.attn_implementation} attention")
    if args.task:
        parts.append(f"{args.task} head")
    parts.append(f"on {args.device}")
    return ", ".join(parts)
