"""``bench estimate``: predicted bytes per component for one model and one or more optimizers."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from optimem.estimators import UserError, estimate, get_spec, names
from optimem.estimators.catalog import resolve
from optimem.estimators.cuda_overhead import alloc_config, calibrated_gpus
from optimem.estimators.inventory import build_inventory
from optimem.estimators.packing import packed_seq_len, padded_worst, samples, worst_micro_batch
from optimem.estimators.setup import DEFAULT_TARGETS, TrainingSetup
from optimem.estimators.vision import freeze_label
from optimem.harness.commands.argtypes import add_no_cache
from optimem.harness.commands.setup_args import add_setup_arguments, field_defaults, setup_kwargs
from optimem.harness.units import format_table, human_bytes, human_count




def register(sub) -> None:
    p = sub.add_parser("estimate", help="predict a training step's memory: state, weights, gradients, activations, "
                                        "peak (no GPU needed)",
                       description="Predict the bytes a Trainer run holds, per optimizer, from the model's real "
                                   "parameter shapes and architecture: optimizer state, weights, gradients, "
                                   "activations and the whole step's peak, phase by phase. No GPU, no download.")
    add_setup_arguments(p, defaults={**field_defaults(), "device": "cuda", "optim": None}, multi=("optim",),
                        required=("optim",),
                        help_suffix={"optim": "(repeatable, comma-separated, or 'all')",
                                     "device": "(cuda: foreach optimizer paths and CUDA overhead terms)"})
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="use this GPU's calibrated CUDA constants (torch.cuda.get_device_name(); see "
                        "'python -m optimem.harness.calibrate show')")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="with --padding-free or --group-by-length: the data file bench run --data would train on (.jsonl, one {\"text\": "
                        "...} per line, or text, one sample per line); the estimate is for the worst micro-batch its "
                        "samples can make, packed")
    p.add_argument("--cuda-alloc-conf", dest="alloc_conf", default=None, metavar="CONF",
                   help="PYTORCH_CUDA_ALLOC_CONF for the replayed caching allocator, e.g. expandable_segments:True "
                        "(default: the environment's)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per optimizer")
    add_no_cache(p)
    p.set_defaults(func=main)


def expand_optims(values: list[str] | None, *, all_includes_unavailable: bool = True) -> list[str]:
    """Names from ``--optim`` (repeated or comma-separated). 'all' means every registered name (or only those
    optimem can estimate); a name given explicitly must be known and estimable, else UserError."""
    if not values:
        raise UserError("no optimizer given: --optim NAME (repeatable, comma-separated, or 'all')")
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "all":
                batch = names(include_unavailable=all_includes_unavailable)
            else:
                try:
                    spec = get_spec(item)
                except UserError as exc:
                    raise UserError(f"--optim: {exc}") from None
                if spec.availability != "ok":
                    raise UserError(f"--optim {item}: {spec.reason}")
                batch = [spec.name]
            out.extend(n for n in batch if n not in out)
    if not out:
        raise UserError(f"--optim {' '.join(values)!r} names no optimizer: give NAME (repeatable), or 'all'")
    return out


def _check_gpu(name: str | None) -> None:
    """``--gpu`` names a GPU with calibrated CUDA constants (else the defaults would be used without a word)."""
    if name is None:
        return
    known = calibrated_gpus()
    if name not in known:
        have = ", ".join(known) if known else "none yet"
        raise UserError(f"--gpu {name!r}: no calibrated CUDA constants for that device name (calibrated: {have}); "
                        "leave --gpu out for the defaults, or fit them: python -m optimem.harness.calibrate cuda RUNS.jsonl "
                        "--write")


def run_estimates(args: argparse.Namespace):
    """The estimates ``bench estimate`` prints for parsed arguments: ``(base setup, inventory, estimates,
    skipped)``, ``skipped`` holding ``{"optim", "status", "reason"}`` per optimizer not estimated (``bench serve``
    answers its page with this too)."""
    optims = expand_optims(args.optim)
    _check_gpu(args.gpu)
    if args.alloc_conf is not None:
        try:
            alloc_config(args.alloc_conf)
        except UserError as exc:
            raise UserError(f"--cuda-alloc-conf: {str(exc).removeprefix('PYTORCH_CUDA_ALLOC_CONF: ')}") from None
    base = TrainingSetup(**setup_kwargs(args, exclude=("optim", "optim_args", "optim_target_modules")))
    packed_note = None
    if base.group_by_length and args.data is None:
        raise UserError("--group-by-length draws a data file's samples by length: give --data FILE too")
    if args.data is not None and base.group_by_length and not base.padding_free:
        lengths = [len(x) for x in samples(args.data, base.seq_len)]
        rows, seq = padded_worst(lengths, base.batch_size)
        base = replace(base, batch_size=rows, seq_len=seq)
        packed_note = (f"--data {args.data}: {len(lengths)} samples of {min(lengths)}-{max(lengths)} tokens (cut at "
                       f"--seq-len); padded to the longest of each micro-batch, the worst one is {rows} x {seq}")
    elif args.data is not None:
        if not base.padding_free:
            raise UserError("--data: without --padding-free or --group-by-length bench run cuts the file into "
                            "samples of --seq-len tokens, which the estimate already assumes; add --padding-free "
                            "(packing) or --group-by-length (padded to the longest) to estimate the file's lengths")


        lengths = [len(x) for x in samples(args.data, base.seq_len)]
        worst = worst_micro_batch(lengths, base.batch_size)
        base = replace(base, seq_len=packed_seq_len(worst, base.batch_size))
        packed_note = (f"--data {args.data}: {len(lengths)} samples of {min(lengths)}-{max(lengths)} tokens (cut at "
                       f"--seq-len); the worst micro-batch of {base.batch_size} packs {worst} tokens, estimated as "
                       f"{base.batch_size} x {base.seq_len}")
    base.check_trainable()  # the model config and the sequence length, once, before any optimizer
    targets = setup_kwargs(args).get("optim_target_modules")
    inv = build_inventory(base.model, task=base.task)
    results, skipped = [], []
    for name in optims:
        spec = get_spec(name)
        if spec.availability != "ok":
            skipped.append({"optim": name, "status": spec.availability, "reason": spec.reason})
            continue
        try:
            # optim_args apply only to the optimizers that read them when several are asked for.
            setup = base.with_optimizer(name, args.optim_args, targets, only_args_read=len(optims) > 1)
            est = estimate(setup, gpu=args.gpu, alloc_conf=args.alloc_conf)
        except UserError as exc:
            if len(optims) == 1:
                raise
            skipped.append({"optim": name, "status": "not_applicable", "reason": str(exc)})
            continue
        if spec.needs_target_modules and not args.optim_target_modules:
            est.notes.append(f"optim_target_modules not given: assumed '{DEFAULT_TARGETS}'")
        if packed_note:
            est.notes.append(packed_note)
        results.append(est)
    return base, inv, results, skipped


def main(args: argparse.Namespace) -> int:
    base, inv, results, skipped = run_estimates(args)
    if args.json:
        out = []
        for est in results:
            d = est.to_dict()
            out.append({"optim": d["optim"], "model": d["model"], "dtype": d["dtype"], "num_params": d["num_params"],
                        "trainable_params": d["trainable_params"], "status": "ok", **d})
        out.extend(skipped)
        print(json.dumps(out, indent=2))
        return 0
    print(_table(inv, results, skipped, base, bool(args.optim_target_modules)))
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


def _table(inv, results, skipped, setup: TrainingSetup, targets_given: bool) -> str:
    first = results[0] if results else None
    total = first.num_params if first is not None else inv.num_params  # a LoRA model's adapters included
    head = (f"{inv.model} ({inv.architecture}): {human_count(total)} parameters"
            + (f", {human_count(first.trainable_params)} trainable" if first and
               first.trainable_params != total else "")
            + f", stored as {setup.dtype}")
    if setup.peft:
        head += _adapter_text(setup, first)
    rows = []
    cuda = setup.estimate_device == "cuda" and all(e.cuda is not None for e in results)
    for e in sorted(results, key=lambda e: e.bytes["optimizer_state"]):
        b = e.bytes
        total = b["weights"] + b["gradients"] + b["optimizer_state"]
        row = [e.optim, human_bytes(b["optimizer_state"]), f"{e.state_bytes_per_param:.3f}",
               human_bytes(b["optimizer_state_host"]) if b["optimizer_state_host"] else "-",
               human_bytes(b["weights"]), human_bytes(b["gradients"]), human_bytes(total),
               human_bytes(b["activations"]), human_bytes(b["peak"]), _phase_label(e.peak_phase)]
        if cuda:
            row += [human_bytes(e.cuda["peak_reserved"]), human_bytes(e.cuda["peak_device"])]
        rows.append(row + [_flags(e)])
    cols = ["optimizer", "state", "B/param", "of it host", "weights", "gradients", "weights+grads+state",
            "activations", "peak", "at"] + (["reserved", "device total"] if cuda else []) + ["notes"]
    table = format_table(cols, rows, align="lrrrrrrrrl" + ("rr" if cuda else "") + "l")
    lines = [head, _settings_line(setup), "", table]
    source = resolve(inv.model)  # resolved once per process already: no second Hub request
    if source.origin == "hub":
        lines.insert(1, source.describe())
    if skipped:
        lines.append("")
        lines.append("not estimated:")
        lines.extend(f"  {s['optim']}: {s['reason']}" for s in skipped)
    lines.append("")
    if any(get_spec(e.optim).needs_target_modules for e in results) and not targets_given:
        lines.append(f"GaLore/APOLLO: optim_target_modules not given, assumed '{DEFAULT_TARGETS}'.")
    if setup.peft:
        lines.append(f"LoRA: weights = frozen base (as stored{', quantization state included' if setup.quantize else ''})"
                     " + trainable adapters; gradients and optimizer state cover the adapters only; the peak traces "
                     "the peft model itself (its adapters' dropout and low-rank activations"
                     + (", bitsandbytes' dequantization in forward and backward" if setup.quantize else "") + ").")
        limits = {e.notes[-1] for e in results if e.bytes["peak"] is None and e.notes}
        lines.extend(n[0].upper() + n[1:] + "." for n in sorted(limits))
    lines.extend(_offload_lines(results))
    lines.extend(n for n in (results[0].notes if results else [])
                 if n.startswith(("--data", "padding-free", "Liger kernels")))
    lines.append("Bytes in binary units (1 GiB = 2^30 B). peak: the whole training step's largest live tensor bytes "
                 "(weights, gradients, optimizer state, activations and logits, backward and optimizer-step "
                 "transients), at the phase named in 'at'; activations: what the forward leaves for the backward.")
    if cuda:
        first = results[0] if results else None
        cal = "calibrated" if first is not None and first.cuda["calibrated"] else "uncalibrated defaults"
        conf = first.cuda["alloc_conf"] if first is not None else ""
        lines.append("reserved: max_memory_reserved from the step's allocations replayed through the CUDA caching "
                     f"allocator's rules (PYTORCH_CUDA_ALLOC_CONF {conf or 'unset'}; cuBLAS workspace included; "
                     "estimators/allocator.py: a rule from its source, not a measurement); device total: reserved "
                     f"+ the CUDA context, what nvidia-smi shows ({cal} constants: see estimators/cuda_overhead.py).")
    return "\n".join(lines)


def _offload_lines(results) -> list[str]:
    """Per rank: device / host / NVMe bytes under CPU or NVMe offload, and the host RAM per node."""
    out = []
    for e in results:
        o = e.offload
        if not o:
            continue
        s = e.setup

        def terms(d: dict) -> str:
            return ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in d.items()) or "-"

        out.append(f"{e.optim} under {o['scheme']}, {s.num_processes} rank(s) on {s.num_nodes} node(s), per rank:")
        out.append(f"  on the GPU: {human_bytes(o['device_total'])} of model states ({terms(o['device'])}); no "
                   "optimizer state" if not any("optimizer_state" in k for k in o["device"]) else
                   f"  on the GPU: {human_bytes(o['device_total'])} of model states ({terms(o['device'])})")
        if o["device_peak"] is not None:
            out.append(f"  GPU peak with activations: {human_bytes(o['device_peak'])}")
        out.append(f"  host RAM: {human_bytes(o['host_per_rank'])} ({terms(o['host'])}), "
                   f"{human_bytes(o['pinned_per_rank'])} of it pinned")
        if o["nvme_per_rank"]:
            out.append(f"  NVMe: {human_bytes(o['nvme_per_rank'])} ({terms(o['nvme'])})")
        out.append(f"  host RAM per node ({o['ranks_per_node']} ranks): {human_bytes(o['host_per_node'])}"
                   + (f"; NVMe per node {human_bytes(o['nvme_per_node'])}" if o["nvme_per_node"] else "")
                   + " (model states and offload buffers; add the processes' own memory)")
    if out:
        out.append("Offload figures are rules from the engines' source (DeepSpeed stage_1_and_2.py / stage3.py, "
                   "torch fully_shard), not measured; the table above is one unsharded process.")
    return out


def _adapter_text(setup: TrainingSetup, est) -> str:
    """``; LoRA r=16,... over a nf4 base (double quant): base 4.5 GiB, adapters 160 MiB``."""
    text = f"; LoRA {setup.lora}" if setup.lora else ""
    if setup.quantize:
        text += f" over a {setup.quantize} base" + (" (double quant)" if setup.double_quant else "")
    if est is not None:
        b = est.bytes
        text += f": base {human_bytes(b['weights_frozen'])}, adapters {human_bytes(b['weights_trainable'])}"
    return text


def _phase_label(phase: str) -> str:
    """``steady.optimizer_step`` -> ``optimizer step``; step 0 is marked; '-' for none."""
    if not phase:
        return "-"
    step, kind = phase.split(".", 1)
    return kind.replace("_", " ") + (" (step 0)" if step == "step0" else "")


def _settings_line(setup: TrainingSetup) -> str:
    parts = [f"batch {setup.batch_size} x seq {setup.seq_len}"]
    if setup.task == "image-text-to-text":
        parts[0] += (f" text tokens + {setup.images_per_sample} image(s) of "
                     f"{f'{setup.image_size} px' if setup.image_size else 'the vision config size'} per sample")
    if setup.grad_accum > 1:
        parts.append(f"x accum {setup.grad_accum}")
    parts.append(f"{setup.mixed_precision} autocast" if setup.mixed_precision else "no autocast")
    parts.append("gradient checkpointing" if setup.gradient_checkpointing else "no checkpointing")
    parts.append(f"{setup.attn_implementation} attention")
    if setup.freeze:
        parts.append(f"frozen {freeze_label(setup.freeze)}")
    if setup.padding_free:
        parts.append(f"padding-free: {setup.batch_size * setup.seq_len} tokens packed per micro-batch")
    if setup.use_liger_kernel:
        parts.append("Liger kernels")
    if setup.prepare_kbit:
        parts.append("prepare_model_for_kbit_training")
    parts.append(f"on {setup.estimate_device}")
    return ", ".join(parts)
