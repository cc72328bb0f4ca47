"""Starting a multi-process run (parent side): one torchrun in its own session with the per-run timeout; each
rank writes ``RESULT.rank<R>``; :func:`combine` makes one outcome of them: ``ok`` only when every rank is ``ok``,
else ``oom`` if any rank ran out of memory, else ``error``, with the reason of the rank that failed first."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimem.estimators.sharding import sharding_support
from optimem.harness.contract import (FAULT_ENV, TIMEOUT_ENV, WorkerOutcome, rank_result_path, read_result,
                                      write_job)
from optimem.harness.distributed.schemes import ZERO_STAGES, is_distributed
from optimem.harness.process import die_with_parent, last_line, spawn, wait, worker_env
from optimem.harness.process import tail as log_tail


def unsupported_reason(cfg) -> str | None:
    """Why the Trainer cannot run ``cfg``'s optimizer under its sharding scheme (None if it can; the
    planner's :func:`optimem.estimators.sharding.sharding_support`), or why this machine cannot launch it."""
    if not is_distributed(cfg):
        return None
    ok, why = sharding_support(cfg.optim, cfg.sharding, cfg.num_processes)
    if not ok:
        return why
    if cfg.sharding in ZERO_STAGES:
        if importlib.util.find_spec("deepspeed") is None:
            return (f"{cfg.sharding} needs DeepSpeed, which is not installed: pip install deepspeed "
                    "(or pip install 'optimem[distributed]')")
    return None


# ------------------------------------------------------------------------------------------ the launch
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (torchrun's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(cfg, job: str | os.PathLike, result: str | os.PathLike, port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N ... -m optimem.harness.worker JOB RESULT``: one node, no
    restarts (a failed rank fails the run), rendezvous on 127.0.0.1."""
    port = port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
            str(cfg.num_processes), "--max_restarts", "0", "--master_addr", "127.0.0.1", "--master_port", str(port),
            "--monitor_interval", "0.5", "-m", "optimem.harness.worker", str(job), str(result)]


def rank_faults(fault: str | None, world_size: int) -> dict[str, str]:
    """Test hook: ``KIND@PHASE`` for every rank, or ``R:KIND@PHASE`` for rank ``R`` only."""
    if not fault:
        return {}
    head, sep, rest = fault.partition(":")
    if sep and head.strip().isdigit():
        return {str(int(head)): rest.strip()}
    return {str(r): fault for r in range(world_size)}


def launch(cfg, *, timeout_s: float, fault: str | None = None, track_tensors: bool | None = None,
           on_start: Callable[[subprocess.Popen], None] | None = None, log_path: str | None = None,
           command: Callable[[Path, Path], list[str]] | None = None, workdir: str | os.PathLike | None = None,
           launcher: str = "torchrun"):
    """Run ``cfg`` on ``cfg.num_processes`` ranks and return one :class:`optimem.harness.launcher.WorkerOutcome`
    for the whole run (see :func:`combine`): its payload holds the worst rank's ``measured`` and a
    ``distributed`` section with every rank's result.

    ``command(job, result)``: the argv that starts every rank (default :func:`torchrun_command`: one torchrun on
    this machine; :mod:`optimem.harness.multinode`: ``srun`` starting a torchrun agent per node), named
    ``launcher`` in the record; ``workdir``: where the job and the ranks' result files go (a folder every node
    sees for a multi-node run; default the system's temporary folder)."""
    n = int(cfg.num_processes)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="optimem-dist-", dir=workdir) as tmp:
        tmpdir = Path(tmp)
        job, result = tmpdir / "job.json", tmpdir / "result.json"
        log = Path(log_path) if log_path else tmpdir / "ranks.log"
        write_job(job, cfg.to_dict(), track_tensors=track_tensors, rank_faults=rank_faults(fault, n),
                  parent_pid=os.getpid())
        env = worker_env()
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        env[TIMEOUT_ENV] = str(int(timeout_s))
        if fault:
            env.pop(FAULT_ENV, None)
        argv = (command or (lambda j, r: torchrun_command(cfg, j, r)))(job, result)
        start = time.perf_counter()
        timed_out = False
        with open(log, "wb") as logfh:
            proc = spawn(argv, logfh, env, preexec_fn=die_with_parent)  # torchrun dies with the launcher
            if on_start is not None:
                on_start(proc)
            timed_out = wait(proc, timeout_s, grace_s=10.0)  # torchrun's agent tears its ranks down on SIGTERM
        duration = time.perf_counter() - start
        tail = log_tail(log, 6000)
        ranks = [read_result(rank_result_path(result, r)) for r in range(n)]
        payload = combine(ranks, returncode=proc.returncode, timed_out=timed_out, timeout_s=timeout_s, log_tail=tail)
        shown = argv[:-2] if argv[0] != sys.executable else argv[1:-2]
        payload["distributed"].update(launcher=launcher, command=" ".join(shown + ["JOB", "RESULT"]))
        return WorkerOutcome(payload, proc.returncode, duration, tail)


def combine(ranks: list[dict | None], *, returncode: int | None, timed_out: bool, timeout_s: float,
            log_tail: str = "") -> dict[str, Any]:
    """One payload for the run from each rank's (None: the rank left no result).

    Status: ``ok`` when every rank is ``ok``; else ``oom`` when a rank ran out of memory (the kernel's
    SIGKILL of a rank counts), else ``error`` (a rank's error, a rank that died or hung, a timeout). The
    reason names the rank that failed first (its peers' collective errors follow from it). ``measured``: the ``ok`` rank with the highest peak (the one a
    memory limit would hit first), else the first that measured anything."""
    entries = []
    for r, p in enumerate(ranks):
        if p is None:
            entries.append({"rank": r, "status": "error", "reason": "no result (the rank died or was killed)",
                            "measured": None})
        else:
            entries.append({"rank": r, "status": p.get("status", "error"), "reason": p.get("reason") or "",
                            "measured": p.get("measured"), "device_facts": p.get("device_facts") or {},
                            "detail": p.get("detail"), **{k: p[k] for k in ("node", "node_facts") if p.get(k)}})
    # the root cause first: the rank that failed earliest (its peers then fail in a collective)
    ended = {r: float((p or {}).get("ended_at") or float("inf")) for r, p in enumerate(ranks)}
    failed = sorted((e for e in entries if e["status"] != "ok"), key=lambda e: ended[e["rank"]])
    detail = next((e.get("detail") for e in failed if e.get("detail")), None)
    if timed_out:
        status = "error"
        done = ", ".join(str(e["rank"]) for e in entries if e["status"] == "ok") or "none"
        reason = (f"timed out after {timeout_s:g} s (torchrun and every rank were killed; ranks that finished: "
                  f"{done})")
    elif not failed:
        status, reason = "ok", ""
    else:
        ooms = [e for e in failed if e["status"] == "oom"]
        own = [e for e in failed if ranks[e["rank"]] is not None]  # failed with a result of their own
        if ooms or own:
            first = (ooms or own)[0]
            status, reason = ("oom" if ooms else "error"), f"rank {first['rank']}: {first['reason']}"
            detail = first.get("detail") or detail
        else:  # killed before writing anything (the kernel's OOM killer sends SIGKILL)
            status = "oom" if returncode is not None and returncode in (-9, 137) else "error"
            last = last_line(log_tail)
            reason = (f"every failing rank died without a result (torchrun exited with {returncode})"
                      + (f": {last[:200]}" if last else ""))
        detail = detail or (log_tail or None)
    measured_ok = [e for e in entries if e["status"] == "ok" and e["measured"]]
    pool = measured_ok or [e for e in entries if e["measured"]]
    top = max(pool, key=lambda e: e["measured"].get("peak_bytes", 0)) if pool else None
    facts = next((e["device_facts"] for e in entries if e.get("device_facts")), {})
    return {"status": status, "reason": reason, "measured": top["measured"] if top else None,
            "device_facts": facts, "detail": detail,
            "distributed": {"world_size": len(ranks), "measured_rank": top["rank"] if top else None,
                            "ranks": [{k: v for k, v in e.items() if k not in ("device_facts", "detail")}
                                      for e in entries]}}
