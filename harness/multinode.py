"""Several nodes: the commands a Slurm allocation of ``nnodes`` nodes runs to start torchrun on each of them.

One ``srun`` task per node (``--ntasks-per-node=1``) starts one torchrun agent there; the agents meet through
torch's c10d rendezvous (``--rdzv-backend=c10d``) on the allocation's first node (``scontrol show hostnames
$SLURM_JOB_NODELIST | head -n 1``, resolved once in the batch script, before ``srun``, so every node is given the
same endpoint), under the job's id as the rendezvous id; each agent starts ``nproc`` ranks of
``python -m optimem.harness.worker JOB RESULT`` (rank ``R`` writes ``RESULT.rank<R>``, as on one node:
:mod:`optimem.harness.distributed`). ``--kill-on-bad-exit=1``: one failed node ends the step on all of them.

:class:`SrunLauncher` runs them from inside an allocation (``SLURM_JOB_ID`` set: ``salloc``, ``sbatch``, or the job
``bench run --executor slurm`` submits through submitit): one ``srun`` in this process's session, the job and
the ranks' result files in a folder every node sees, the ranks gathered by
:func:`optimem.harness.distributed.launch.combine` as on one node. Checked on a real one-node Slurm (one agent
of two ranks; two agents of one rank each meeting through c10d as two nodes would, ``agents_per_node=2``);
never across real nodes.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from optimem.estimators.errors import UserError
from optimem.harness.distributed.launch import free_port, launch

RDZV_PORT = 29500
AGENTS_ENV = "OPTIMEM_SIMULATE_AGENTS_PER_NODE"
"""Test hook: that many torchrun agents per node (several nodes simulated on one host; default 1)."""
HEAD = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'


def torchrun_args(nnodes: int, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    """torchrun's options for ``nnodes`` agents of ``nproc`` ranks meeting at ``endpoint`` (``host:port``)."""
    return ["-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", "--max-restarts=0"]


def srun_command(nnodes: int, nproc: int, job: str, result: str, *, endpoint: str = "$HEAD:29500",
                 rdzv_id: str = "$SLURM_JOB_ID", python: str | None = None, agents_per_node: int = 1,
                 cpus_per_task: int | None = None) -> list[str]:
    """``srun ... python -m torch.distributed.run ... -m optimem.harness.worker JOB RESULT`` as an argv: one task
    (a torchrun agent of ``nproc`` ranks) per node. ``agents_per_node`` > 1 packs that many agents on each
    node (``nnodes`` agents on ``nnodes / agents_per_node`` nodes: several nodes simulated on one host);
    ``cpus_per_task``: the cores each agent's step asks for."""
    if nnodes < 1 or nproc < 1 or agents_per_node < 1 or nnodes % agents_per_node:
        raise ValueError(f"nnodes and nproc must be positive and nnodes a multiple of agents_per_node, got "
                         f"{nnodes}, {nproc} and {agents_per_node}")
    tasks = ["--ntasks-per-node=1"] if agents_per_node == 1 else \
        [f"--ntasks={nnodes}", f"--ntasks-per-node={agents_per_node}"]
    return (["srun", f"--nodes={nnodes // agents_per_node}", *tasks, "--kill-on-bad-exit=1"]
            + ([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []) + [python or sys.executable]
            + torchrun_args(nnodes, nproc, endpoint, rdzv_id) + ["-m", "optimem.harness.worker", job, result])


def batch_script(nnodes: int, nproc: int, job: str, result: str, *, port: int = RDZV_PORT,
                 python: str | None = None) -> str:
    """The body of a batch script (inside an allocation of ``nnodes`` nodes) that runs one multi-node run."""
    argv = srun_command(nnodes, nproc, job, result, endpoint="${HEAD}:" + str(port), python=python)
    quoted = " ".join(a if "$" in a else shlex.quote(a) for a in argv)
    return "\n".join(["set -euo pipefail", f"HEAD={HEAD}", quoted.replace("--rdzv-endpoint=${HEAD}",
                                                                          '--rdzv-endpoint="${HEAD}"'), ""])


def slurm_parameters(nnodes: int, gpus_per_node: int | None) -> dict:
    """submitit ``SlurmExecutor`` keywords for the allocation: ``nnodes`` nodes, one task (agent) on each."""
    params = {"nodes": nnodes, "ntasks_per_node": 1}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    return params


def agents_per_node() -> int:
    """Torchrun agents started on each node: 1, unless the test hook ``OPTIMEM_SIMULATE_AGENTS_PER_NODE`` packs
    several (several nodes simulated on one host)."""
    value = os.environ.get(AGENTS_ENV) or "1"
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{AGENTS_ENV} must be a positive whole number of agents per node, got {value!r}")
    return int(value)


def in_allocation() -> bool:
    """Whether this process runs inside a Slurm allocation (``salloc``, ``sbatch``, a submitted job)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def first_node() -> str:
    """The allocation's first node (``scontrol show hostnames $SLURM_JOB_NODELIST``): the rendezvous host."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("a multi-node run needs a Slurm allocation: SLURM_JOB_NODELIST is not set")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"cannot list the allocation's nodes (scontrol show hostnames {nodelist}): {exc}") from None
    if not out:
        raise UserError(f"scontrol lists no nodes in the allocation {nodelist!r}")
    return out[0]


def rendezvous_port(head: str, job_id: str) -> int:
    """The c10d port: a free one when the rendezvous host is this machine (the batch step runs on the
    allocation's first node), else ``RDZV_PORT`` plus the job id modulo 10000 (another node's ports cannot be
    probed from here)."""
    if head.split(".")[0] == socket.gethostname().split(".")[0]:
        return free_port()
    return RDZV_PORT + (int(job_id) % 10000 if job_id.isdigit() else 0)


@dataclass
class SrunLauncher:
    """A multi-node run from inside a Slurm allocation: ``srun`` starts one torchrun agent per node
    (:func:`srun_command`; ``cfg.num_processes / cfg.num_nodes`` ranks each, c10d rendezvous on the allocation's
    first node) and every rank's result is gathered into one outcome as on one node
    (:func:`optimem.harness.distributed.launch.launch`). ``folder``: where the job and the result files go, a
    folder every node of the allocation sees (the results file's ``.slurm`` folder); ``agents_per_node`` > 1
    simulates several nodes on one host (tests on a one-node cluster; default from ``OPTIMEM_SIMULATE_AGENTS_PER_NODE``)."""

    folder: Path
    agents_per_node: int = field(default_factory=agents_per_node)

    def launch(self, cfg, *, timeout_s: float, fault=None, track_tensors=None, on_start=None):
        if not in_allocation():
            raise UserError("srun needs a Slurm allocation (SLURM_JOB_ID is not set): run inside salloc/sbatch, "
                            "or let bench run submit the job (--executor slurm)")
        nnodes = int(cfg.num_nodes)
        per_node = int(cfg.num_processes) // nnodes
        head = first_node()
        job_id = os.environ["SLURM_JOB_ID"]
        endpoint = f"{head}:{rendezvous_port(head, job_id)}"
        rdzv_id = f"optimem-{job_id}-{uuid.uuid4().hex[:8]}"

        def command(job: Path, result: Path) -> list[str]:
            return srun_command(nnodes, per_node, str(job), str(result), endpoint=endpoint, rdzv_id=rdzv_id,
                                agents_per_node=min(self.agents_per_node, nnodes), cpus_per_task=per_node)

        return launch(cfg, timeout_s=timeout_s, fault=fault, track_tensors=track_tensors, on_start=on_start,
                      command=command, workdir=Path(self.folder).resolve() / "runs", launcher="srun + torchrun")


__all__ = ["AGENTS_ENV", "RDZV_PORT", "SrunLauncher", "agents_per_node", "batch_script", "first_node", "in_allocation", "rendezvous_port",
           "slurm_parameters", "srun_command", "torchrun_args"]
