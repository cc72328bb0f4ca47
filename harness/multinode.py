"""Several nodes: the commands a Slurm allocation of ``nnodes`` nodes runs to start torchrun on each of them.

One ``srun`` task per node (``--ntasks-per-node=1``) starts one torchrun agent there; the agents meet through
torch's c10d rendezvous (``--rdzv-backend=c10d``) on the allocation's first node (``scontrol show hostnames
$SLURM_JOB_NODELIST | head -n 1``, resolved once in the batch script, before ``srun``, so every node is given the
same endpoint), under the job's id as the rendezvous id; each agent starts ``nproc`` ranks of
``python -m optimem.harness.worker JOB RESULT`` (rank ``R`` writes ``RESULT.rank<R>``, as on one node:
:mod:`optimem.harness.distributed`). ``--kill-on-bad-exit=1``: one failed node ends the step on all of them.

This builds the commands (rules from torchrun's and Slurm's documented options); it has been run here only as
one node with two processes, never across real nodes.
"""
from __future__ import annotations

import shlex
import sys

RDZV_PORT = 29500
HEAD = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'


def torchrun_args(nnodes: int, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    """torchrun's options for ``nnodes`` agents of ``nproc`` ranks meeting at ``endpoint`` (``host:port``)."""
    return ["-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", "--max-restarts=0"]


def srun_command(nnodes: int, nproc: int, job: str, result: str, *, endpoint: str = "$HEAD:29500",
                 rdzv_id: str = "$SLURM_JOB_ID", python: str | None = None) -> list[str]:
    """``srun ... python -m torch.distributed.run ... -m optimem.harness.worker JOB RESULT`` as an argv."""
    if nnodes < 1 or nproc < 1:
        raise ValueError(f"nnodes and nproc must be positive, got {nnodes} and {nproc}")
    return (["srun", f"--nodes={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", python or sys.executable]
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


__all__ = ["RDZV_PORT", "batch_script", "slurm_parameters", "srun_command", "torchrun_args"]
