"""The launcher <-> worker contract, imported by both sides: environment names, the run folder, job and result files.

A launcher writes ``job.json`` (``{"config", "fault", "track_tensors", "parent_pid"}``; a torchrun launch adds
``"rank_faults"``) into a folder named ``optimem-run-*``, starts ``python -m optimem.harness.worker JOB RESULT``
and reads ``RESULT`` (JSON, written atomically); rank ``R`` of a torchrun launch writes ``RESULT.rank<R>``.
:class:`WorkerOutcome` is what every launcher returns (payload, exit code, seconds).
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULT_ENV = "OPTIMEM_FAULT"
"""Test hook read by the worker: ``KIND@PHASE`` (see :mod:`optimem.harness.worker`)."""
RUN_DIR_PREFIX = "optimem-run-"
"""The launcher's per-run temporary folder (job, result, log, the Trainer's output_dir): the worker removes it
when the launcher dies before it could."""
RUN_DIR_ENV = "OPTIMEM_RUN_DIR"
"""Set by the launcher for the worker: the run's temporary folder (the Trainer's output_dir goes inside)."""
TIMEOUT_ENV = "OPTIMEM_RUN_TIMEOUT"
"""The run's timeout (seconds), handed to torchrun's ranks so a collective never waits longer (``ddp_timeout``)."""
RESULT_SUFFIX = ".rank"


@dataclass
class WorkerOutcome:
    """What came back from a run: its payload (``status``, ``reason``, ``measured``, ``device_facts``,
    ``detail``), how it exited and how long it ran (seconds)."""

    payload: dict[str, Any]
    returncode: int | None
    duration_s: float
    log_tail: str = ""
    launch: str = "in_process"
    """How the worker started: ``subprocess`` (``python -m optimem.harness.worker``), ``zygote`` (forked from a
    :class:`optimem.harness.zygote.Zygote`) or ``in_process``."""


def write_job(path: str | os.PathLike, config: dict, **fields: Any) -> None:
    Path(path).write_text(json.dumps({"config": config, **fields}))


def read_job(path: str | os.PathLike) -> dict:
    with open(path) as fh:
        return json.load(fh)


def write_result(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a result)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_result(path: str | os.PathLike) -> dict | None:
    """The payload at ``path`` (None when there is none or it is not whole)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def rank_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's environment (``(0, 0, 1)`` outside it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def node_facts() -> dict[str, Any]:
    """Where this rank runs: the host, torchrun's node rank (``GROUP_RANK``: the agent's place in the rendezvous)
    and local rank, and under Slurm the job, the node's index in the allocation and the srun task (each None
    where the environment does not say)."""
    env = os.environ

    def num(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.isdigit() else None

    return {"hostname": socket.gethostname(), "node_rank": num("GROUP_RANK"), "local_rank": num("LOCAL_RANK"),
            "slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_node_id": num("SLURM_NODEID"),
            "slurm_task": num("SLURM_PROCID"), "slurm_node": env.get("SLURMD_NODENAME")}


def rank_result_path(result: str | os.PathLike, rank: int) -> str:
    return f"{result}{RESULT_SUFFIX}{rank}"
