"""The zoo run: every model type of the zoo (``estimators/configs/zoo``) traced and checked against a real CPU
Trainer step, each classified (:func:`classify`).

    python -m optimem.harness.validate --zoo [--task causal-lm] [--jobs 2] [--optim adamw_torch] [--gc both]
    python -m optimem.harness.validate --zoo --render      # only rewrite results/zoo_cpu.md/.json from the log

Resumable: every finished case is one line of ``results/zoo_cpu.jsonl`` (keyed by type, task, optimizer and
checkpointing); a run skips the cases the log holds. Each case runs in a process of its own forked from this one
(a model that crashes or hangs takes only its case down; :data:`CASE_TIMEOUT_S`), ``--jobs`` at a time.

Classes: ``exact`` (peak within :data:`EXACT_TOL`), ``within 1%``, ``outside 1%`` (a miss), ``refused`` (the
tracer's one-line reason; the real step runs: a tracer gap), ``model fails`` (the real step fails too: the model's
own error), ``no config`` (the zoo's rule gave no config transformers builds), ``failed`` (a bug: a crash, a
timeout, or an estimate that raised something other than its one-line refusal); ``unsupported`` (see
:data:`UNSUPPORTED`).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
import argparse
import signal
from pathlib import Path

from optimem.harness.validate import STEPS, Case, machine_facts, measure, predict, quiet_libraries
from optimem.estimators.catalog import resolve
from optimem.estimators.errors import TraceFailure, UserError
from optimem.estimators.zoo import load_index, zoo_config_path, zoo_types

EXACT_TOL = 0.001
WITHIN_TOL = 0.01
ZOO_SHAPE = (2, 64)
CASE_TIMEOUT_S = 600
LOG = Path("results/zoo_cpu.jsonl")
_ZOO_PATH = re.compile(r"\S*estimators/configs/zoo/")
"""A zoo config's path in a reason, from whichever checkout ran the case."""
CLASSES = ("exact", "within 1%", "outside 1%", "refused", "model fails", "no config", "failed")
UNSUPPORTED = "unsupported"
"""A case whose setting the model does not take (the Trainer and the estimate refuse it alike, e.g. gradient
checkpointing on a class without it): an agreement, not a class a type is judged by unless every case is one."""
TASKS = ("causal-lm", "masked-lm", "seq2seq-lm", "sequence-classification", "image-text-to-text")
SETUPS = {"full": {}, "frozen-vision": {"freeze": "vision,projector"}, "lora-lm": {"lora": "r=8,target=lm"}}
"""What a case trains (``--setup``): the whole model; a vision-language model with its vision tower and projector
frozen (``--freeze vision,projector``); a LoRA adapter on its language model's linear layers (``--lora target=lm``)."""


def case_key(model_type: str, task: str, optim: str, gc: bool, setup: str = "full") -> str:
    return f"{model_type}|{task}|{optim}|{'gc' if gc else 'nogc'}" + (f"|{setup}" if setup != "full" else "")


def classify(measured_status: str, measured_reason: str, pred_error: str | None, pred_kind: str | None,
             peak_error: float | None) -> str:
    """The class of one case from the real run's status, the estimate's failure (message, TraceFailure kind or
    ``"bug"``) and the peak error."""
    if measured_status != "ok":
        if pred_kind == "user" and " in setup: " in measured_reason:
            return UNSUPPORTED
        if pred_kind in (None, "model", "tracer", "unchecked"):
            return "model fails"
        return "failed"
    if pred_error is not None:
        return "refused" if pred_kind in ("tracer", "unchecked", "user") else "failed"
    if peak_error is None:
        return "failed"
    if abs(peak_error) <= EXACT_TOL:
        return "exact"
    return "within 1%" if abs(peak_error) <= WITHIN_TOL else "outside 1%"


def run_one(model_type: str, task: str, optim: str, gc: bool, setup: str = "full") -> dict:
    """One case, in this process: the real harness run (:func:`optimem.harness.validate.measure`) and the
    estimate; a plain-data row (``setup``: one of :data:`SETUPS`, recorded when not ``full``)."""
    row = {"type": model_type, "task": task, "optim": optim, "gc": gc, "shape": list(ZOO_SHAPE),
           **({"setup": setup} if setup != "full" else {})}
    entry = load_index()["types"].get(model_type) or {}
    path = zoo_config_path(model_type)
    build = (entry.get("build") or {}).get(task)
    if path is None or build:
        return {**row, "class": "no config", "reason": entry.get("error") or build or "no config"}
    if task == "image-text-to-text":  # the run and the estimate both need the model's image inputs
        # lazy: pulls in torch, transformers, which importing this module does not
        from optimem.estimators.trace.images import spec_for

        try:
            spec_for(resolve(str(path)), task, None, 1)
        except UserError as exc:
            return {**row, "class": "refused", "reason": f"optimem builds no image inputs for it: {exc}"}
    case = Case(str(path), optim, ZOO_SHAPE[0], ZOO_SHAPE[1], gc, task=task, **SETUPS[setup])
    t0 = time.perf_counter()
    try:
        payload = measure(case)
    except Exception as exc:  # noqa: BLE001 - the harness itself failed: a bug, kept as one line
        payload = {"status": "error", "reason": f"harness: {type(exc).__name__}: {exc}"}
    status = payload.get("status", "error")
    row["measured_status"], row["measured_reason"] = status, " ".join(str(payload.get("reason") or "").split())[:300]
    row["measured_seconds"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    pred_error = kind = None
    try:
        pred_peak, pred_phases, pred_notes = predict(case)
    except TraceFailure as exc:
        pred_error, kind = str(exc), exc.kind
    except UserError as exc:
        pred_error, kind = str(exc), "user"
    except Exception as exc:  # noqa: BLE001 - an estimate that crashes is a bug: its last frame says where
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        pred_error, kind = f"{type(exc).__name__}: {str(exc)[:200]} ({Path(tb.filename).name}:{tb.lineno})", "bug"
    row["estimate_seconds"] = round(time.perf_counter() - t1, 1)
    peak_error = None
    if status == "ok":
        measured = int(payload["measured"]["peaks"]["tensor_peak_bytes"])
        row["measured_peak"] = measured
        if pred_error is None:
            row["predicted_peak"] = pred_peak
            peak_error = (pred_peak - measured) / measured
            row["peak_error"] = peak_error
            phases = payload["measured"]["phases"]
            errs = {k: (pred_phases[k] - int(v["peak_bytes"])) / int(v["peak_bytes"])
                    for k, v in phases.items() if k in pred_phases and int(v.get("peak_bytes") or 0)}
            if errs:
                worst = max(errs, key=lambda k: abs(errs[k]))
                row["worst_phase"], row["worst_phase_error"] = worst, errs[worst]
            drop = next((n for n in pred_notes if n.startswith("LayerDrop (")), "")
            if drop and abs(peak_error) > EXACT_TOL:
                row["reason"] = drop  # the trace's own account of the model's LayerDrop
            at = max(phases, key=lambda k: int(phases[k].get("peak_bytes") or 0), default=None)
            if at is not None and at not in pred_phases and abs(peak_error) > EXACT_TOL:
                row["reason"] = (f"the run's peak is in its {at} phase ({int(phases[at]['peak_bytes']):,} B), which "
                                 "the estimate does not cover (it estimates the training step's phases"
                                 + (f"; the worst of them is off by {errs[worst] * 100:+.3f}%)" if errs else ")"))
    if pred_error is not None:
        row["estimate_error"], row["estimate_failure"] = " ".join(pred_error.split())[:400], kind
    row["class"] = classify(status, row["measured_reason"], pred_error, kind, peak_error)
    return row


def _setup_of(args: tuple) -> dict:
    return {"setup": args[4]} if len(args) > 4 else {}


def _child(args: tuple, wfd: int) -> None:
    try:
        quiet_libraries()
        row = run_one(*args)
    except BaseException as exc:  # noqa: BLE001
        row = {"type": args[0], "task": args[1], "optim": args[2], "gc": args[3], **_setup_of(args), "class": "failed",
               "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    with os.fdopen(wfd, "w") as f:
        f.write(json.dumps(row, default=str))
    os._exit(0)


def _start(args: tuple):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setsid()
        except OSError:
            pass
        _child(args, w)
    os.close(w)
    return pid, r, time.monotonic()


def _finish(pid: int, rfd: int, args: tuple, started: float, killed: bool) -> dict:
    with os.fdopen(rfd) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError:
        why = f"timed out after {CASE_TIMEOUT_S} s" if killed else "the case's process died (crash or out of memory)"
        return {"type": args[0], "task": args[1], "optim": args[2], "gc": args[3], **_setup_of(args), "class": "failed",
                "reason": why,
                "seconds": round(time.monotonic() - started, 1)}


def read_log(log: Path = LOG) -> dict[str, dict]:
    """The finished cases of the log, by :func:`case_key` (a torn last line is ignored)."""
    out: dict[str, dict] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            out[case_key(row["type"], row["task"], row["optim"], row["gc"], row.get("setup", "full"))] = row
    return out


def run_zoo(cases: list[tuple], jobs: int = 1, log: Path = LOG, again: bool = False) -> None:
    """Run every case not in ``log`` yet (``again``: every case; a later row of a case replaces the earlier one),
    ``jobs`` processes at a time, appending each row as it finishes."""
    # lazy: pulls in torch, which importing this module does not
    import optimem.estimators.trace.run  # noqa: F401 - imported once here, not in every forked case
    # lazy: pulls in psutil, which importing this module does not
    import optimem.harness.worker  # noqa: F401
    # lazy: pulls in torch, transformers, which importing this module does not
    import transformers.trainer  # noqa: F401

    done = read_log(log)
    todo = [c for c in cases if again or case_key(*c) not in done]
    print(f"zoo: {len(cases)} cases, {len(cases) - len(todo)} already in {log}, {len(todo)} to run", file=sys.stderr)
    log.parent.mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    while todo or running:
        while todo and len(running) < max(1, jobs):
            args = todo.pop(0)
            pid, rfd, t0 = _start(args)
            running[pid] = (rfd, args, t0, False)
        time.sleep(0.2)
        for pid, (rfd, args, t0, killed) in list(running.items()):
            if not killed and time.monotonic() - t0 > CASE_TIMEOUT_S:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                running[pid] = (rfd, args, t0, True)
            done_pid, _ = os.waitpid(pid, os.WNOHANG)
            if done_pid == 0:
                continue
            del running[pid]
            row = _finish(pid, rfd, args, t0, killed)
            with log.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            err = row.get("peak_error")
            print(f"{row['class']:12s} {args[0]:28s} {args[1]:24s} {args[2]} {'gc' if args[3] else ''}{' ' + args[4] if len(args) > 4 else ''} "
                  + (f"{err * 100:+.4f}%" if err is not None else (row.get("estimate_error") or row.get("reason")
                                                                   or row.get("measured_reason") or "")[:150]),
                  file=sys.stderr, flush=True)


def zoo_cases(tasks, optims, gcs, setups=("full",)) -> list[tuple]:
    return [(t, task, o, gc) + ((st,) if st != "full" else ()) for task in tasks for t in zoo_types(task)
            for o in optims for gc in gcs for st in setups]


def render(rows: dict[str, dict], facts: dict, command: str, tasks) -> tuple[str, dict]:
    """The Markdown table and JSON of the zoo log: per task, how many types in each class, then every type."""
    index = load_index()
    by_type: dict = {}
    for r in rows.values():
        by_type.setdefault((r["task"], r["type"]), []).append(r)
    lines = ["# The transformers zoo on CPU: traced estimate vs a real Trainer step", "",
             f"Regenerate: `{command}` (resumable; the log is `{LOG}`).", "",
             f"Zoo: `estimators/configs/zoo/` made by `python -m optimem.estimators.zoo` for transformers "
             f"{index['transformers']} (rule: {index['rule']}). Machine: {facts['cpu']} ({facts.get('cpu_count')} "
             f"cores; runs use 1 thread), torch {facts['torch']}, transformers {facts['transformers']}; rendered at "
             f"commit {facts['git_commit'] or 'unknown'}" + (" plus uncommitted changes" if facts.get("git_dirty") else "")
             + " (each case's row is its latest run in the log, made by the code of that day's branches; a fix "
             "re-runs the cases it touches).", "",
             f"Each case: the harness's real `transformers.Trainer` run on the CPU ({STEPS} steps, batch "
             f"{ZOO_SHAPE[0]} x sequence {ZOO_SHAPE[1]}, fp32, SDPA) measured by the exact tensor accountant, and "
             "`estimate()` for the same configuration plus the harness's dataset. Classes by the whole-run peak "
             f"error: exact (within {EXACT_TOL:.1%}), within 1%, outside 1%; refused (the tracer's one-line reason, "
             "the real step runs: a tracer gap); model fails (the real run fails too: the model's own error); no "
             "config (the zoo's rule gave no config this transformers builds); failed (a crash, a timeout or an "
             "estimate that raised something else: a bug). A case whose setting the model does not take (the Trainer "
             "and the estimate both refuse it in one line, e.g. gradient checkpointing on a class without it) is "
             "listed as unsupported and does not count against its type. Only the combinations listed were run; a type with no "
             "row for a task was not run.", ""]
    summary: dict = {}
    lines += ["| task | registered types | run | " + " | ".join(CLASSES) + " | within 1% (of registered) |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in CLASSES) + " | ---: |"]
    for task in tasks:
        types = index["tasks"].get(task, [])
        cls = {c: 0 for c in CLASSES}
        ran = 0
        for t in types:
            rs = by_type.get((task, t))
            if not rs:
                continue
            judged = [r for r in rs if r["class"] != UNSUPPORTED]
            if not judged:
                continue
            ran += 1
            worst = max(judged, key=lambda r: CLASSES.index(r["class"]))
            cls[worst["class"]] += 1
        good = cls["exact"] + cls["within 1%"]
        summary[task] = {"registered": len(types), "run": ran, **cls}
        lines.append(f"| {task} | {len(types)} | {ran} | " + " | ".join(str(cls[c]) for c in CLASSES)
                     + f" | {good / len(types):.1%} |" if ran else f"| {task} | {len(types)} | 0 | "
                     + " | ".join("-" for _ in CLASSES) + " | - |")
    lines += ["", "A type's class is its worst case's. Figures: peak error = (predicted - measured) / measured.", ""]
    for task in tasks:
        types = [t for t in index["tasks"].get(task, []) if (task, t) in by_type]
        if not types:
            continue
        lines += [f"## {task}", "", "| type | optimizer | gc | class | measured peak | peak error | worst phase | "
                  "reason |", "| --- | --- | --- | --- | ---: | ---: | --- | --- |"]
        for t in types:
            for r in sorted(by_type[(task, t)], key=lambda r: (r["optim"], r["gc"], r.get("setup", ""))):
                err = r.get("peak_error")
                why = r.get("estimate_error") or r.get("reason") or (
                    r.get("measured_reason") if r.get("measured_status") not in (None, "ok") else "") or ""
                why = _ZOO_PATH.sub("zoo/", why).replace("|", "/")[:220]
                wp = f"{r['worst_phase']} {r['worst_phase_error'] * 100:+.3f}%" if r.get("worst_phase") else ""
                lines.append(f"| {t} | {r['optim']}{' (' + r['setup'] + ')' if r.get('setup') else ''} | {'on' if r['gc'] else 'off'} | {r['class']} | "
                             f"{r.get('measured_peak', ''):{','}} | " if isinstance(r.get("measured_peak"), int) else
                             f"| {t} | {r['optim']}{' (' + r['setup'] + ')' if r.get('setup') else ''} | {'on' if r['gc'] else 'off'} | {r['class']} | | ")
                lines[-1] += (f"{err * 100:+.4f}% | " if err is not None else " | ") + f"{wp} | {why} |"
        lines.append("")
    not_run = {task: [t for t in index["tasks"].get(task, []) if (task, t) not in by_type] for task in tasks}
    data = {"facts": facts, "transformers_zoo": index["transformers"], "summary": summary, "not_run": not_run,
            "rows": sorted(rows.values(), key=lambda r: (r["task"], r["type"], r["optim"], r["gc"], r.get("setup", "")))}
    return "\n".join(lines) + "\n", data


def main(argv: list[str] | None = None) -> int:
    """``validate --zoo``: run (unless ``--render``) and write ``results/zoo_cpu.md`` and ``.json``."""
    global CASE_TIMEOUT_S

    p = argparse.ArgumentParser(prog="python -m optimem.harness.validate --zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", action="append", choices=TASKS, help="only these tasks (repeatable; default: all)")
    p.add_argument("--optim", action="append", help="optimizers (repeatable; default: adamw_torch)")
    p.add_argument("--gc", choices=("off", "on", "both"), default="off", help="gradient checkpointing")
    p.add_argument("--type", action="append", help="only these model types (repeatable)")
    p.add_argument("--setup", action="append", choices=tuple(SETUPS), help="what is trained (repeatable; default: "
                   "full); frozen-vision and lora-lm are vision-language setups")
    p.add_argument("--limit", type=int, default=0, help="at most this many cases (0: all)")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (one process each)")
    p.add_argument("--log", default=str(LOG), help="the resumable log (JSON lines)")
    p.add_argument("--render", action="store_true", help="only write the tables from the log")
    p.add_argument("--again", action="store_true", help="run the selected cases even if the log holds them")
    p.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds one case may take")
    p.add_argument("--out", default=None, help="Markdown table (default results/zoo_cpu.md; JSON beside it)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    quiet_libraries()
    tasks = tuple(args.task) if args.task else TASKS
    optims = tuple(args.optim) if args.optim else ("adamw_torch",)
    gcs = {"off": (False,), "on": (True,), "both": (False, True)}[args.gc]
    log = Path(args.log)
    CASE_TIMEOUT_S = args.timeout
    if not args.render:
        cases = zoo_cases(tasks, optims, gcs, tuple(args.setup or ("full",)))
        if args.type:
            cases = [c for c in cases if c[0] in args.type]
        if args.limit:
            cases = cases[: args.limit]
        run_zoo(cases, jobs=args.jobs, log=log, again=args.again)
    rows = read_log(log)
    command = "python -m optimem.harness.validate --zoo" + "".join(f" --task {t}" for t in (args.task or [])) + \
        "".join(f" --optim {o}" for o in (args.optim or [])) + (f" --gc {args.gc}" if args.gc != "off" else "")
    table, data = render(rows, machine_facts(), command, TASKS)
    out = Path(args.out or "results/zoo_cpu.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    Path(args.json or out.with_suffix(".json")).write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"wrote {out} and {args.json or out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CLASSES", "EXACT_TOL", "UNSUPPORTED", "ZOO_SHAPE", "case_key", "classify", "main", "read_log", "render", "run_one",
           "run_zoo", "zoo_cases"]
