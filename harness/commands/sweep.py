"""``bench sweep``: run a grid of configurations (optimizers x models x shapes x precision x checkpointing),
one worker process per run, into one JSONL results file; resumable; optional max-batch search.

Exit status: 0 when every run ended ok, out of memory or skipped (all recorded), 1 when some run ended in
an error (crash, timeout), 2 for bad input, 130 when interrupted (what finished is kept; ``--resume``
finishes the sweep).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from optimem.estimators.errors import UserError
from optimem.estimators.setup import CLI
from optimem.harness.commands.argtypes import DEFAULT_OUT, add_no_cache, positive_int, positive_seconds
from optimem.harness.commands.setup_args import add_setup_arguments, flagged
from optimem.harness.commands.slurm_args import add_slurm_arguments, slurm_settings
from optimem.harness.grid import AXES, config_key, config_label, grid_from_mapping, load_yaml, parse_size
from optimem.harness.launcher import check_config, resolve_device
from optimem.harness.max_batch import DEFAULT_MAX_BATCH_CAP, group_key, max_batch_path
from optimem.harness.paths import check_output_file
from optimem.harness.record import lock_results
from optimem.harness.results import predicted_peak, rank_prediction
from optimem.harness.units import format_table, human_bytes, pct_error


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of optimizers x models x shapes x precision into one results file",
        description="Run every configuration of a grid as its own measured Trainer job (a worker process per "
                    "run, like 'bench run'), appending one record per run to a JSONL file. Lists may be given "
                    "on the command line or in a YAML file (--config); command-line values win. A failed or "
                    "out-of-memory run is recorded and the sweep goes on; --resume skips configurations the "
                    "file already holds. --find-max-batch searches, per optimizer, for the largest batch size "
                    "that fits (on CUDA by real out-of-memory, on CPU under --memory-limit).",
        epilog="Optimizers: names, families (e.g. adam-8bit, galore, lion; 'family:NAME' where a family shares "
               "an optimizer's name), or 'all'; see 'bench optims'. Exit status: 0 every run recorded ok, oom "
               "or skipped; 1 some run ended in an error; 2 bad input; 130 interrupted (use --resume).")
    g = p.add_argument_group("grid (each takes one or more values; YAML keys use the same names)")
    g.add_argument("--config", metavar="FILE.yaml", help="read the grid and settings from a YAML file")
    add_setup_arguments(g, defaults={"mixed_precision": "none", "gradient_checkpointing": False},
                        multi=AXES + ("optim", "batch_size", "seq_len"), exclude=("optim_args",),
                        help_suffix={"optim": "optimizers, families or 'all'", "model": "(default tiny-llama)",
                                     "batch_size": "(default 2)", "seq_len": "(default 64)",
                                     "optim_target_modules": "(default all-linear)", "device": "(default auto)"})
    g.add_argument("--shape", nargs="+", action="extend", metavar="BxS",
                   help="explicit (batch x sequence length) pairs instead of the batch x seq-len product")
    g.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps per run (default 6)")
    g.add_argument("--warmup", type=int, metavar="W", help="steps left out of throughput figures (default 2)")
    g.add_argument("--seed", type=int)
    g.add_argument("--data", metavar="FILE", help="train on a local text/JSONL file instead of synthetic tokens")
    g.add_argument("--optim-args", action="append", metavar="[NAME:]ARGS",
                   help="optim_args for every optimizer ('rank=16') or one optimizer or family "
                        "('galore_adamw:rank=16'); repeatable")
    r = p.add_argument_group("running")
    r.add_argument("--out", metavar="FILE.jsonl", help=f"results file to append to (default {DEFAULT_OUT})")
    r.add_argument("--resume", action="store_true", help="skip configurations the results file already holds")
    r.add_argument("--retry-failed", action="store_true", help="with --resume: run again those recorded as error")
    r.add_argument("--repeat", type=positive_int, metavar="N",
                   help="runs per configuration (default 1); 'bench compare' tests throughput across repeated runs")
    r.add_argument("--timeout", type=positive_seconds, metavar="SECONDS", help="kill a run after this long (default 1200)")
    r.add_argument("--jobs", type=positive_int, metavar="N",
                   help="runs at once (default 1; memory figures are unaffected, timings are not)")
    r.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads per run (OMP_NUM_THREADS; default: torch's, or cores/jobs with --jobs)")
    r.add_argument("--track-tensors", choices=["auto", "on", "off"], help="exact tensor accounting (auto: on CPU)")
    r.add_argument("--no-fork", action="store_true",
                   help="start every run as a fresh 'python -m optimem.harness.worker' (as bench run) instead of forking "
                        "it from a process that imported torch, transformers and the optimizer packages once")
    r.add_argument("--force", action="store_true",
                   help="run configurations the estimate says cannot fit the device's free memory (by default "
                        "each is recorded oom-predicted without running)")
    r.add_argument("--find-max-batch", action="store_true",
                   help="search each optimizer's largest batch size that fits, instead of running the batch sizes")
    r.add_argument("--memory-limit", metavar="SIZE",
                   help="e.g. 64MiB, 8GB: a run whose measured peak exceeds it is recorded as oom "
                        "(required for --find-max-batch on CPU)")
    r.add_argument("--max-batch-cap", type=positive_int, metavar="N", help="largest batch a search tries (default 4096)")
    add_slurm_arguments(p, "local: worker processes on this machine (default); slurm: one Slurm job per "
                           "configuration through submitit (same records, lock, --resume and results file)",
                        array=True)
    o = p.add_argument_group("output")
    o.add_argument("--dry-run", action="store_true", help="list the configurations (and what --resume skips); run "
                                                          "nothing")
    o.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (progress stays on "
                                                       "stderr)")
    o.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="progress on stderr: a bar with ETA (terminal), a line per run, or none")
    add_no_cache(o)
    p.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)  # test hook: OPTIM=KIND@PHASE
    p.set_defaults(func=main)


# ------------------------------------------------------------------------------------------ setup
def _mapping(args: argparse.Namespace) -> dict:
    data = load_yaml(args.config) if args.config else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    cli = {field: getattr(args, field, None) for field in CLI if field != "optim_args"}
    cli.update({"shape": args.shape, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                "data": args.data, "out": args.out, "timeout": args.timeout, "jobs": args.jobs,
                "threads": args.threads, "track_tensors": args.track_tensors, "memory_limit": args.memory_limit,
                "max_batch_cap": args.max_batch_cap, "repeat": args.repeat})
    if args.optim_args:
        cli["optim_args"] = args.optim_args
    for k, v in cli.items():
        if v is None:
            continue
        if k == "shape":
            data.pop("batch_size", None)
            data.pop("seq_len", None)
        if k in ("batch_size", "seq_len"):
            data.pop("shape", None)
        data[k] = v
    for flag in ("resume", "retry_failed", "find_max_batch"):
        if getattr(args, flag):
            data[flag] = True
    return data


def _settings(data: dict, args: argparse.Namespace):
    from optimem.harness.sweep import SweepOptions  # lazy: pulls in rich, which importing this module does not

    def where(name: str) -> str:
        """The flag, or the sweep file's key, that gave a setting."""
        return f"--{name.replace('_', '-')}" if getattr(args, name, None) not in (None, False) or not args.config \
            else f"{args.config}: {name}"

    def num(name, kind, default):
        raw = data.get(name, default)
        what = "a positive integer" if kind is int else "a positive number"
        if raw is None:
            return None
        try:
            value = kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{where(name)} must be {what}, got {raw!r}") from None
        if isinstance(raw, bool) or not 0 < value < float("inf") or (kind is int and float(raw) != value):
            raise UserError(f"{where(name)} must be {what}, got {raw!r}")
        return value

    track = data.get("track_tensors", "auto")
    track = {"auto": None, "on": True, "off": False, True: True, False: False, None: None}.get(track, "bad") \
        if isinstance(track, (str, bool, type(None))) else "bad"
    for name in ("resume", "retry_failed", "find_max_batch"):
        if not isinstance(data.get(name, False), bool):
            raise UserError(f"{where(name)} must be true or false, got {data[name]!r}")
    out = data.get("out")
    out = DEFAULT_OUT if out is None else out
    if not isinstance(out, str) or not out.strip():
        raise UserError(f"{where('out')} must be a results file path, got {out!r}")
    if track == "bad":
        raise UserError(f"{where('track_tensors')} must be auto, on or off, got {data.get('track_tensors')!r}")
    faults = {}
    for item in args.fault:
        name, _, fault = item.partition("=")
        faults[name.strip()] = fault.strip()
    return SweepOptions(
        out=Path(out), resume=bool(data.get("resume")),
        retry_failed=bool(data.get("retry_failed")), timeout_s=num("timeout", float, 1200.0),
        jobs=num("jobs", int, 1), threads=num("threads", int, None), track_tensors=track,
        memory_limit=_memory_limit(data.get("memory_limit"), where("memory_limit")),
        find_max_batch=bool(data.get("find_max_batch")), max_batch_cap=num("max_batch_cap", int, DEFAULT_MAX_BATCH_CAP),
        repeat=num("repeat", int, 1), faults=faults, progress=args.progress, fork=not args.no_fork,
        force=bool(getattr(args, "force", False)))


def _memory_limit(value, where: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: running workers are killed, what finished is kept."""


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    data = _mapping(args)
    if not data.get("optim"):
        raise UserError("no optimizers: give --optim NAME (repeatable; a family; or all), or a --config file")
    if data.get("retry_failed") and not data.get("resume"):
        raise UserError("--retry-failed reruns the configurations a results file holds as errors: it needs --resume")
    grid = grid_from_mapping(data, source=args.config or "command line")
    opts = _settings(data, args)
    extra = {"memory_limit_bytes": opts.memory_limit} if opts.memory_limit is not None else {}
    configs = _runnable(grid, grid.configs(extra=extra, source=args.config or "command line"), check_config)
    devices = {resolve_device(c) for c in configs}
    slurm = _slurm_settings(args, opts, len(configs))
    if slurm is None and any(int(c.num_nodes) > 1 for c in configs):
        raise UserError("--nnodes above 1: a run over several nodes starts through Slurm (srun + a torchrun agent per "
                        "node): add --executor slurm")
    if opts.jobs > 1 and "cuda" in devices and slurm is None:
        raise UserError("--jobs above 1 would share the GPU between runs (their out-of-memory points and timings "
                        "would be each other's): use --jobs 1 on a GPU")
    bases: list = []
    starts: list[int] = []
    if opts.find_max_batch:
        if "cpu" in devices and opts.memory_limit is None:
            raise UserError("--find-max-batch on CPU needs --memory-limit SIZE (e.g. 64MiB): a CPU has no "
                            "out-of-memory point of its own short of swapping")
        seen: set[str] = set()
        for cfg in configs:
            g = group_key(cfg, resolve_device(cfg))
            if g not in seen:
                seen.add(g)
                bases.append(cfg)
                starts.append(cfg.batch_size)

    if opts.find_max_batch and opts.repeat > 1:
        raise UserError("--repeat does not apply to --find-max-batch (each probe runs once)")
    if args.dry_run:
        return _dry_run(args, opts, configs, bases, config_key, config_label, resolve_device)

    check_output_file(opts.out, "--out", what="results file (.jsonl)")
    if opts.find_max_batch:
        check_output_file(max_batch_path(opts.out), "--out (its max-batch file)", what="results file (.jsonl)")
    with lock_results(opts.out, "bench sweep"):
        return _run(args, opts, configs, bases, starts, slurm)


def _slurm_settings(args: argparse.Namespace, opts, runs: int):
    """None for the local executor; else the :class:`optimem.harness.slurm.SlurmSettings` of the Slurm one
    (checked: UserError), with every job submitted at once unless --jobs says otherwise."""
    settings = slurm_settings(args, opts.out, executor=args.executor, dry_run=args.dry_run)
    if settings is None:
        return None
    if args.jobs is None:  # every job submitted at once: the cluster's queue decides what runs when
        opts.jobs = max(1, min(runs * opts.repeat, 512))
    elif settings.array:
        settings.array_parallelism = opts.jobs
    opts.fork = False
    return settings


def _run(args: argparse.Namespace, opts, configs: list, bases: list, starts: list[int], settings=None) -> int:
    """The sweep proper (the results file locked for this sweep)."""
    from optimem.harness.sweep import Sweep  # lazy: pulls in rich, which importing this module does not
    from optimem.harness.sweep_progress import Reporter  # lazy: pulls in rich, which importing this module does not

    total = len(bases) if opts.find_max_batch else len(configs) * opts.repeat
    threads_env = _thread_env(opts, local=settings is None)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, _term)
    t0 = time.perf_counter()
    what = "max-batch searches" if opts.find_max_batch else "runs"
    reporter = Reporter(total, opts.progress, title=f"bench sweep ({total} {what})")
    executor = None
    if settings is not None:
        from optimem.harness.slurm import SlurmExecutor  # lazy: pulls in submitit, which importing this module does not

        executor = SlurmExecutor(settings, timeout_s=opts.timeout_s, force=opts.force, on_state=reporter.note)
    sweep = Sweep(opts, reporter, executor=executor)
    interrupted = False
    try:
        with reporter:
            if opts.resume:
                reporter.note(f"bench sweep: resuming {opts.out} ({len(sweep.existing)} configurations recorded)")
            if opts.resume and settings is not None:
                # lazy: pulls in submitit, which importing this module does not
                from optimem.harness.slurm import recover_records

                found = recover_records(sweep, settings.folder)
                if found:
                    reporter.note(f"bench sweep: {found} record(s) that Slurm jobs returned after the last sweep "
                                  f"stopped were appended from {settings.folder}")
            if opts.jobs > 1 and settings is None:
                n = opts.threads or os.environ.get("OMP_NUM_THREADS")
                reporter.note(f"bench sweep: {opts.jobs} runs at once, {n} thread{'' if str(n) == '1' else 's'} "
                              "each: timings are not comparable with --jobs 1 runs")
            if opts.find_max_batch:
                sweep.run_max_batch(bases, starts)
            else:
                sweep.run_configs(configs)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _restore_env(threads_env)
    outcome = sweep.outcome
    outcome.interrupted = interrupted
    outcome.wall_s = time.perf_counter() - t0
    if args.json:
        print(json.dumps(_json_summary(outcome), indent=2))
    else:
        print(render_summary(outcome))
    if interrupted:
        done = sum(1 for r in outcome.results if r.record is not None)
        print(f"bench sweep: interrupted; {done} of {len(outcome.results) or total} recorded in {opts.out}: run the "
              "same command with --resume to finish", file=sys.stderr)
        return 130
    if sweep.write_failures:
        where = f"they were written to {sweep.rescued} instead" if sweep.rescued else \
            "no fallback file could be written either: the summary above is all there is"
        print(f"bench sweep: error: {sweep.write_failures} record(s) could not be appended to {opts.out} "
              f"({sweep.write_error}): {where}", file=sys.stderr)
        return 1
    counts = outcome.counts()
    return 1 if counts.get("error") else 0


def _runnable(grid, configs: list, check_config) -> list:
    """The configurations the Trainer would take, checked before anything is listed or run. One it refuses
    is an error when its optimizer was named; one of a family or of ``all`` is left out, with a note per
    optimizer on stderr (a family's member that cannot train this setup is not a failed run)."""
    out, left_out = [], {}
    for cfg in configs:
        try:
            check_config(cfg)
        except UserError as exc:
            if cfg.optim in grid.named:
                raise
            left_out.setdefault(cfg.optim, exc)
            continue
        out.append(cfg)
    for optim, exc in left_out.items():
        print(f"bench sweep: note: leaving out {optim} (from a family or 'all'): {flagged(exc)}", file=sys.stderr)
    if not out:
        raise UserError("nothing to run: every configuration was left out (see the notes above)")
    return out


def _thread_env(opts, local: bool = True) -> dict:
    """Set OMP/MKL thread counts for the workers (they inherit the environment); returns what to restore."""
    threads = opts.threads
    if threads is None and opts.jobs > 1 and "OMP_NUM_THREADS" not in os.environ and local:
        threads = max(1, (os.cpu_count() or 1) // opts.jobs)
    if threads is None:
        return {}
    opts.threads = threads
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for k in saved:
        os.environ[k] = str(threads)
    return saved


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _dry_run(args, opts, configs, bases, config_key, config_label, resolve_device) -> int:
    # lazy: pulls in rich, which importing this module does not
    from optimem.harness.sweep import existing_counts, read_existing

    existing = read_existing(opts.out) if opts.resume else {}
    counts = existing_counts(opts.out, skip_errors=opts.retry_failed) if opts.resume else {}
    rows = []
    if opts.find_max_batch:
        for b in bases:
            rows.append({"key": group_key(b, resolve_device(b)), "label": config_label({**b.to_dict(),
                                                                                       "batch_size": "?"}),
                         "action": f"search max batch from {b.batch_size}", "runs": None})
    else:
        for c in configs:
            key = config_key(c.to_dict(), resolve_device(c))
            remaining = max(opts.repeat - counts.get(key, 0), 0)
            rec = existing.get(key)
            action = (f"skip (recorded: {rec['status']})" if remaining == 0 and rec else
                      "run" if remaining == 1 else f"run {remaining}x")
            rows.append({"key": key, "label": config_label(c.to_dict()), "action": action, "runs": remaining})
    if args.json:
        print(json.dumps({"out": str(opts.out), "configurations": rows}, indent=2))
    else:
        print(format_table(["key", "configuration", "action"], [[r["key"], r["label"], r["action"]] for r in rows],
                           align="lll"))
        print(f"{len(rows)} {'searches' if opts.find_max_batch else 'configurations'}; results file {opts.out}")
    return 0


# ---------------------------------------------------------------------------------------- output
def _run_summary(result) -> dict:
    rec = result.record
    c = result.config.to_dict()
    if rec is None:
        return {"key": config_key(c), "label": config_label(c), "status": None, "reused": False}
    m = rec.get("measured") or {}
    pred, complete = predicted_peak(rec)
    tp = (m.get("throughput") or {})
    return {"key": (rec.get("run") or {}).get("config_key") or config_key(rec["config"]),
            "label": config_label(rec["config"]), "optim": rec["config"]["optim"], "status": rec["status"],
            "reason": rec.get("reason"), "reused": result.reused, "run_id": rec.get("run_id"),
            "measured_peak_bytes": m.get("peak_bytes"), "predicted_peak_bytes": pred,
            "predicted_peak_complete": complete, "optimizer_state_bytes": m.get("optimizer_state_bytes"),
            "predicted_optimizer_state_bytes": (rank_prediction(rec) or {}).get(
                "optimizer_state_bytes", ((rec.get("predicted") or {}).get("bytes") or {}).get("optimizer_state")),
            "tokens_per_s": tp.get("tokens_per_s"), "duration_s": (rec.get("run") or {}).get("duration_s")}


def _json_summary(outcome) -> dict:
    return {"out": str(outcome.out), "max_batch_out": str(outcome.max_batch_out) if outcome.max_batch_out else None,
            "interrupted": outcome.interrupted, "counts": outcome.counts(), "wall_s": round(outcome.wall_s, 2),
            "runs": [_run_summary(r) for r in outcome.results], "max_batch": outcome.max_batch}


def render_summary(outcome) -> str:
    """The end-of-sweep table: one row per configuration (or per max-batch search)."""
    lines = []
    if outcome.max_batch:
        rows = []
        for s in outcome.max_batch:
            c = s["config"]
            mb = s.get("max_batch_size")
            rows.append([c["optim"], c["model"], str(c["seq_len"]), c["dtype"] + (f"+{c['mixed_precision']}"
                                                                                   if c.get("mixed_precision") else ""),
                         human_bytes(s.get("memory_limit_bytes")) if s.get("memory_limit_bytes") else s["device"],
                         "-" if mb is None else (f">={mb}" if s.get("capped") else str(mb)),
                         human_bytes(s.get("peak_bytes_at_max")), str(s.get("first_failing_batch") or "-"),
                         str(s.get("runs", 0)), "" if s.get("complete", True) else s.get("reason", "")[:60]])
        lines.append(format_table(["optimizer", "model", "seq", "precision", "limit", "max batch", "peak at max",
                                   "first too big", "runs", "note"], rows, align="llrlrrrrrl"))
    elif outcome.results:
        rows = []
        for r in outcome.results:
            s = _run_summary(r)
            if s["status"] is None:
                rows.append(["not run", s["label"], "", "", "", "", "", ""])
                continue
            err = pct_error(s["predicted_peak_bytes"], s["measured_peak_bytes"])
            serr = pct_error(s["predicted_optimizer_state_bytes"], s["optimizer_state_bytes"])
            ok = s["status"] == "ok"
            rows.append([s["status"] + (" (earlier)" if s["reused"] else ""), s["label"],
                         human_bytes(s["measured_peak_bytes"]) if s["measured_peak_bytes"] is not None
                         and s["status"] in ("ok", "oom") else "-",
                         (human_bytes(s["predicted_peak_bytes"]) + ("" if s["predicted_peak_complete"] else "*"))
                         if s["predicted_peak_bytes"] is not None else "-",
                         f"{err:+.1f}%" if err is not None and ok else "-",
                         f"{serr:+.2f}%" if serr is not None and ok else
                         ("exact" if ok and s["optimizer_state_bytes"] == s["predicted_optimizer_state_bytes"] == 0
                          else "-"),
                         f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") and ok else "-",
                         f"{s['duration_s']:.1f} s" if s.get("duration_s") else "-"])
        lines.append(format_table(["status", "configuration", "peak", "predicted", "error", "opt. state error",
                                   "tokens/s", "time"], rows, align="llrrrrrr"))
        if any(r.record and not _run_summary(r)["predicted_peak_complete"] for r in outcome.results):
            lines.append("* model states only (weights + gradients + optimizer state): the estimate has no "
                         "activation figure")
    counts = outcome.counts()
    parts = [f"{n} {k}" for k, n in sorted(counts.items())]
    n = sum(counts.values())
    where = f"records in {outcome.out}"
    if outcome.max_batch_out:
        where += f", max-batch results in {outcome.max_batch_out}"
    text = f"{n} record{'s' if n != 1 else ''} ({', '.join(parts)})" if n else "nothing recorded"
    lines.append(f"{text}; {where}; {outcome.wall_s:.0f} s")
    return "\n".join(lines)


__all__ = ["DEFAULT_OUT", "main", "register", "render_summary"]
