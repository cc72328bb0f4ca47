"""``bench run``: one real, measured Trainer job for one optimizer, recorded as a JSONL line.

Exit status: 0 for ``ok`` and ``skipped`` (a recorded, deliberate outcome), 1 for ``error``, 3 for
``oom``, 2 for bad input (one line on stderr), 130 when interrupted (nothing is written).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from optimem.estimators import get_spec
from optimem.estimators.errors import UserError
from optimem.estimators.setup import DEFAULT_TARGETS
from optimem.harness.commands.argtypes import (DEFAULT_OUT, add_no_cache, non_negative_int, positive_int,
                                               positive_seconds)
from optimem.harness.commands.slurm_args import add_slurm_arguments, slurm_settings
from optimem.harness.commands.setup_args import add_setup_arguments, field_defaults, setup_kwargs
from optimem.harness.distributed.report import rank_rows
from optimem.harness.launcher import check_config, execute, resolve_device
from optimem.harness.multinode import SrunLauncher, in_allocation
from optimem.harness.record import append_record
from optimem.harness.paths import check_output_file, rescue_record
from optimem.harness.run_config import RunConfig
from optimem.harness.units import error_text, human_bytes, rel_error
from optimem.harness.fit import judge

DEFAULT_STEPS = 6
DEFAULT_WARMUP = 2
EXIT_CODES = {"ok": 0, "skipped": 0, "error": 1, "oom": 3}


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="measure a real Trainer run of one optimizer (memory by phase, optimizer state, throughput)",
        description="Train a model from the catalog (random init, seeded) on synthetic tokens with the real "
                    "transformers Trainer and TrainingArguments(optim=NAME), in a separate process, and measure "
                    "memory by phase, the optimizer's state and throughput; print it beside the estimate and "
                    "append one JSON record to the results file.",
        epilog="Exit status: 0 ok or skipped, 1 error, 3 out of memory, 2 bad input, 130 interrupted.")
    add_setup_arguments(p, defaults={**field_defaults(RunConfig), "optim": None},
                        required=("optim",),
                        help_suffix={"optim_target_modules": f"(default for those: {DEFAULT_TARGETS})"})
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                   help=f"optimizer steps (default {DEFAULT_STEPS}; at least 2 so the steady state shows)")
    p.add_argument("--warmup", type=non_negative_int, default=DEFAULT_WARMUP, metavar="W",
                   help=f"steps left out of the throughput figures (default {DEFAULT_WARMUP})")
    p.add_argument("--data", default=None, metavar="FILE", help="train on a local text or JSONL ('text') file "
                                                                "(byte tokens) instead of synthetic tokens")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N")
    p.add_argument("--timeout", type=positive_seconds, default=1200.0, metavar="SECONDS",
                   help="kill the run after this long (default 1200)")
    p.add_argument("--track-tensors", choices=["auto", "on", "off"], default="auto",
                   help="exact per-tensor accounting (auto: on for CPU runs, off on CUDA)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FILE.jsonl",
                   help=f"append the record to this JSONL file (default {DEFAULT_OUT})")
    p.add_argument("--no-save", action="store_true", help="do not write the record anywhere")
    p.add_argument("--force", action="store_true",
                   help="start the run even when the estimate says it cannot fit the device's free memory")
    p.add_argument("--json", action="store_true", help="print the record as JSON instead of the table")
    add_slurm_arguments(p, "local: this machine (default for one node); slurm: through Slurm (default for --nnodes "
                           "above 1): inside an allocation (salloc/sbatch) srun starts a torchrun agent per node, "
                           "else the run is submitted as one job through submitit")
    add_no_cache(p)
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace):
    """The :class:`RunConfig` the arguments describe (validated; UserError for bad values)."""
    if args.steps < 2:
        raise UserError(f"--steps must be at least 2 (got {args.steps}): step 0 has no optimizer state yet, the "
                        "steady state starts at step 1")
    kw = setup_kwargs(args)
    try:
        spec = get_spec(kw["optim"])
    except UserError as exc:
        raise UserError(f"--optim: {exc}") from None
    if spec.needs_target_modules and not kw.get("optim_target_modules"):
        kw["optim_target_modules"] = DEFAULT_TARGETS
    cfg = RunConfig(**kw, steps=args.steps, warmup=args.warmup, seed=args.seed, data=args.data)
    check_config(cfg)
    return cfg


def refuse_if_cannot_fit(cfg) -> None:
    """UserError (exit 2, one line with the figures) when the estimate says ``cfg`` cannot fit the memory its
    device has now (:func:`optimem.harness.fit.check`): the model states first (no trace), then the whole step."""
    refusal = judge(cfg, resolve_device(cfg))  # None too for a run recorded as skipped, with its reason
    if refusal is not None:
        raise UserError(f"{refusal.text()}; give --force to start it anyway")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the worker is killed and nothing is written."""


def executor_of(args: argparse.Namespace, cfg):
    """``(where, settings)``: ``local`` (this machine), ``srun`` (inside a Slurm allocation: srun from here) or
    ``submit`` (one job through submitit), and the Slurm settings (None locally). UserError for a run over
    several nodes given ``--executor local``."""
    nodes = int(cfg.num_nodes)
    executor = args.executor or ("slurm" if nodes > 1 else "local")
    if nodes > 1 and executor == "local":
        raise UserError(f"--nnodes {nodes}: a run over several nodes starts through Slurm (srun + a torchrun agent "
                        "per node): leave out --executor local (--executor slurm is the default above one node)")
    settings = slurm_settings(args, Path(args.out), executor=executor, need_sbatch=not in_allocation())
    if settings is None:
        return "local", None
    return ("srun" if in_allocation() else "submit"), settings


def run_record(cfg, args: argparse.Namespace, where: str, settings, track: bool | None) -> dict:
    """Run ``cfg`` where :func:`executor_of` said and return its record."""
    if where == "local":
        return execute(cfg, timeout_s=args.timeout, track_tensors=track)
    if where == "srun":
        launcher = SrunLauncher(settings.folder) if int(cfg.num_processes) > 1 else None
        return execute(cfg, timeout_s=args.timeout, track_tensors=track, launcher=launcher)
    from optimem.harness.slurm import SlurmExecutor  # lazy: pulls in submitit, which importing this module does not

    executor = SlurmExecutor(settings, timeout_s=args.timeout, force=args.force, srun=True,
                             on_state=lambda line: print(f"bench run: {line}", file=sys.stderr, flush=True))
    try:
        return executor.run(cfg, timeout_s=args.timeout, track_tensors=track)
    except KeyboardInterrupt:
        executor.cancel_all()  # the job does not outlive the command that submitted it
        raise


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not args.no_save:
        check_output_file(args.out, "--out", what="results file (.jsonl)")
    where, settings = executor_of(args, cfg)
    if not args.force and where != "submit":  # a submitted job checks the memory of the node it lands on
        refuse_if_cannot_fit(cfg)
    track = {"auto": None, "on": True, "off": False}[args.track_tensors]
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, _term)
    failed = None
    try:
        record = run_record(cfg, args, where, settings, track)
        saved = None
        if not args.no_save:
            try:
                saved = append_record(args.out, record)
            except OSError as exc:  # the measurement is done: keep it somewhere, say where
                failed = (exc, rescue_record(record, args.out, exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(render(record, saved=str(saved) if saved else None))
    if record["status"] in ("oom", "error"):
        print(f"bench run: {record['status']}: {record['reason']}", file=sys.stderr)
    if failed is not None:
        exc, rescued = failed
        where = f"it was written to {rescued} instead" if rescued else "it is printed above, and nowhere else"
        print(f"bench run: error: could not append the record to --out {args.out} ({exc.strerror or exc}): "
              f"{where}", file=sys.stderr)
        return EXIT_CODES["error"]
    return EXIT_CODES[record["status"]]


# --------------------------------------------------------------------------------------------- table
def _pct(measured: int | None, predicted: int | None) -> str:
    return error_text(rel_error(predicted, measured))


def _seconds_text(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _header(record: dict) -> list[str]:
    c, env, run = record["config"], record["env"], record.get("run", {})
    device = run.get("resolved_device") or env.get("device")
    precision = c["dtype"] + (f" + {c['mixed_precision']} autocast" if c["mixed_precision"] else "")
    shape = f"batch {c['batch_size']} x seq {c['seq_len']}" + (f" x accum {c['grad_accum']}" if c["grad_accum"] > 1
                                                               else "")
    extra = []
    if c.get("optim_args"):
        extra.append(f"optim_args {c['optim_args']}")
    if get_spec(c["optim"]).needs_target_modules:
        extra.append(f"targets {c['optim_target_modules']}")
    if c["gradient_checkpointing"]:
        extra.append("gradient checkpointing")
    if c.get("lora"):
        extra.append(f"LoRA {c['lora']}")
    if c.get("quantize"):
        extra.append(f"{c['quantize']} base" + (" (double quant)" if c.get("double_quant") else ""))
    status = {"ok": "ok", "skipped": "skipped", "oom": "OUT OF MEMORY", "error": "ERROR"}[record["status"]]
    took = f", {run['duration_s']:.1f} s" if run.get("duration_s") else ""
    if c.get("num_processes", 1) > 1:
        shape += f", {c['num_processes']} processes, {c.get('sharding')}"
        if c.get("num_nodes", 1) > 1:
            shape += f" on {c['num_nodes']} nodes"
    if (env.get("slurm") or {}).get("job_id"):
        shape += f", Slurm job {env['slurm']['job_id']}"
    return [f"bench run: {c['optim']} on {c['model']}: {status}",
            f"  {device} ({env.get('device_name') or 'unknown device'}), {precision}, {shape}, "
            f"{c['steps']} steps ({c['warmup']} warmup){took}" + (", " + ", ".join(extra) if extra else "")]


def render(record: dict, saved: str | None = None) -> str:
    """The short human summary of a record: measured vs predicted, phase peaks, throughput."""
    from rich.console import Console  # lazy: pulls in rich, which importing this module does not

    console = Console(width=100, force_terminal=False, color_system=None, highlight=False, soft_wrap=True)
    m, pred = record.get("measured"), record.get("predicted")
    pb = (pred or {}).get("bytes", {})
    with console.capture() as cap:
        for line in _header(record):
            console.print(line)
        if (record.get("run") or {}).get("estimate_error"):
            console.print(f"  no estimate: {record['run']['estimate_error']}")
        if record["status"] != "ok":
            console.print(f"  {record['reason']}")
            if record["status"] == "skipped" and pred:
                console.print(f"  predicted optimizer state: {human_bytes(pb.get('optimizer_state'))} "
                              f"(run 'bench estimate --optim {record['config']['optim']}' for the whole prediction)")
        if record.get("distributed"):
            console.print()
            console.print(_rank_table(record))
            if (record["distributed"].get("nodes") or {}).get("measured"):
                console.print()
                console.print(_node_table(record))
                console.print(f"  predicted per node: {record['distributed']['nodes']['predicted']['source']}")
        if m and record.get("distributed"):
            console.print()
            console.print(_phase_table(m))
        elif m:
            console.print()
            console.print(_memory_table(m, pb))
            console.print()
            console.print(_phase_table(m))
            console.print()
            for line in _summary(m):
                console.print(line)
    out = cap.get().rstrip("\n")
    if saved:
        out += f"\nrecord appended to {saved}"
    return out


def _table(*columns: str):
    from rich import box  # lazy: pulls in rich, which importing this module does not
    from rich.table import Table  # lazy: pulls in rich, which importing this module does not

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 2, 0, 0))
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    return t


def _memory_table(m: dict, pb: dict):
    t = _table("  memory", "measured", "predicted", "prediction error")
    rows = (("optimizer state", "optimizer_state_bytes", "optimizer_state"),
            ("weights", "parameters_bytes", "weights"),
            ("gradients (most held at once)", "gradients_bytes", "gradients"),
            ("whole-step peak", "peak_bytes", "peak"))
    for label, mk, pk in rows:
        t.add_row(f"  {label}", human_bytes(m.get(mk)), human_bytes(pb.get(pk)), _pct(m.get(mk), pb.get(pk)))
    return t


def _rank_table(record: dict):
    """Per rank: measured against the planner's per-rank prediction."""
    d = record["distributed"]
    t = _table(f"  per rank ({d.get('backend')})", "peak", "predicted", "error",
               "gradients", "predicted", "opt. state", "predicted")
    for r in rank_rows(record):
        err = _pct(r["peak"], r["peak_predicted"]) if r["status"] == "ok" else r["status"]
        t.add_row(f"  rank {r['rank']}", human_bytes(r["peak"]), human_bytes(r["peak_predicted"]), err,
                  human_bytes(r["gradients"]), human_bytes(r["gradients_predicted"]),
                  human_bytes(r["optimizer_state"]), human_bytes(r["optimizer_state_predicted"]))
    return t


def _node_table(record: dict):
    """Per node (torchrun agent): its ranks, the sums of their measured peaks and RSS peaks, and the planner's
    host bytes per node."""
    nodes = record["distributed"]["nodes"]
    pred = nodes["predicted"]
    t = _table("  per node", "ranks", "peaks (sum)", "RSS peaks (sum)", "predicted host", "error")
    for n in nodes["measured"]:
        label = n["node"] + (f" (node rank {n['node_rank']})" if n.get("node_rank") is not None else "")
        host = pred.get("host_bytes")
        err = _pct(n.get("peak_bytes_sum"), host) if record["distributed"]["backend"] == "gloo" else "-"
        t.add_row(f"  {label}", ",".join(str(r) for r in n["ranks"]), human_bytes(n.get("peak_bytes_sum")),
                  human_bytes(n.get("rss_peak_bytes_sum")), human_bytes(host) if host is not None else "-", err)
    return t


_PHASE_LABELS = (("model_load", "model load"), ("setup", "Trainer + optimizer built"),
                 ("forward", "forward"), ("backward", "backward"), ("optimizer_step", "optimizer step"))


def _phase_table(m: dict):
    phases = m.get("phases", {})
    primary = m.get("primary_tracker")
    what = {"tensors": "live tensors", "cuda": "CUDA allocated", "rss": "process RSS"}.get(primary, "memory")
    has_tensors = any("tensors" in v for v in phases.values())
    cols = [f"  peak {what}", "step 0", "steady"]
    if has_tensors:
        cols += ["of it opt. state: step 0", "steady"]
    t = _table(*cols)

    def state_at_peak(ph: dict | None) -> str:
        if not ph or "tensors" not in ph:
            return ""
        return human_bytes(ph["tensors"]["breakdown_at_peak"].get("optimizer_state", 0))

    for key, label in _PHASE_LABELS:
        if key in ("model_load", "setup"):
            ph = phases.get(key)
            if ph is None:
                continue
            row = [label, human_bytes(ph["peak_bytes"]), ""] + ([state_at_peak(ph), ""] if has_tensors else [])
            interrupted = ph.get("interrupted")
        else:
            p0, ps = phases.get(f"step0.{key}"), phases.get(f"steady.{key}")
            if p0 is None and ps is None:
                continue
            row = [label, human_bytes(p0["peak_bytes"]) if p0 else "-", human_bytes(ps["peak_bytes"]) if ps else "-"]
            if has_tensors:
                row += [state_at_peak(p0), state_at_peak(ps)]
            interrupted = any(ph and ph.get("interrupted") for ph in (p0, ps))
        if interrupted:
            row[0] += " (stopped here)"
        t.add_row("  " + row[0], *row[1:])
    return t


def _summary(m: dict) -> list[str]:
    peaks, tp = m.get("peaks", {}), m.get("throughput", {})
    lines = ["  step 0 runs before the optimizer's first step (no lazily created state yet); steady = steps 1+."]
    if "tensor_peak_bytes" in peaks:
        lines.append(f"  peak live tensors {human_bytes(peaks['tensor_peak_bytes'])}; process RSS peak "
                     f"{human_bytes(peaks.get('rss_peak_bytes'))} (at start {human_bytes(peaks.get('rss_baseline_bytes'))}:"
                     " Python, torch and libraries)")
    else:
        lines.append(f"  process RSS peak {human_bytes(peaks.get('rss_peak_bytes'))} (at start "
                     f"{human_bytes(peaks.get('rss_baseline_bytes'))})")
    if "max_memory_allocated" in peaks:
        lines.append(f"  CUDA: max allocated {human_bytes(peaks['max_memory_allocated'])}, max reserved "
                     f"{human_bytes(peaks['max_memory_reserved'])}, allocation retries {peaks.get('alloc_retries', 0)}")
    nv = peaks.get("nvml")
    if nv:
        lines.append(f"  NVML: device peak used {human_bytes(nv['peak_used_bytes'])} (idle baseline "
                     f"{human_bytes(nv['baseline_bytes'])}, CUDA context {human_bytes(nv.get('cuda_context_bytes'))})")
    if tp.get("samples_per_s"):
        st, ot = tp.get("step_time_s") or {}, tp.get("optimizer_step_time_s") or {}
        lines.append(f"  throughput over {tp['measured_steps']} steps after {tp['warmup_steps']} warmup: "
                     f"{tp['samples_per_s']:.1f} samples/s, {tp['tokens_per_s']:.0f} tokens/s"
                     + (f", MFU {tp['mfu']:.1%}" if tp.get("mfu") is not None else ""))
        lines.append(f"  step time p50 {_seconds_text(st.get('p50'))}, p90 {_seconds_text(st.get('p90'))}; "
                     f"optimizer step p50 {_seconds_text(ot.get('p50'))}")
    for note in m.get("notes", []):
        lines.append(f"  note: {note}")
    return lines


__all__ = ["DEFAULT_OUT", "EXIT_CODES", "config_from_args", "main", "refuse_if_cannot_fit", "register", "render"]
