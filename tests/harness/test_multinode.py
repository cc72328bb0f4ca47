"""Multi-node commands (optimem.harness.multinode): what they build, and the batch script run by bash with
stand-ins for ``scontrol`` and ``srun`` (the endpoint every node is given is the allocation's first node)."""
from __future__ import annotations

import os
import stat
import subprocess

from optimem.harness.multinode import batch_script, slurm_parameters, srun_command


def test_srun_starts_one_torchrun_agent_per_node_with_c10d():
    argv = srun_command(2, 4, "JOB", "RESULT", endpoint="node1:29500", rdzv_id="77", python="py")
    assert argv[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "py"]
    assert argv[5:7] == ["-m", "torch.distributed.run"]
    for opt in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29500",
                "--rdzv-id=77", "--max-restarts=0"):
        assert opt in argv
    assert argv[-4:] == ["-m", "optimem.harness.worker", "JOB", "RESULT"]
    assert slurm_parameters(2, 8) == {"nodes": 2, "ntasks_per_node": 1, "gpus_per_node": 8}


def test_the_batch_script_gives_every_node_the_first_node_as_endpoint(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in {"scontrol": 'printf "node7\\nnode8\\n"', "srun": 'printf "%s\\n" "$@"'}.items():
        p = bin_ / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    script = batch_script(2, 2, "/tmp/j son.json", "/tmp/r.json", python="python3")
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[7-8]",
           "SLURM_JOB_ID": "4242"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=True)
    args = out.stdout.splitlines()
    assert "--rdzv-endpoint=node7:29500" in args and "--rdzv-id=4242" in args
    assert args[-2:] == ["/tmp/j son.json", "/tmp/r.json"]


def test_each_rank_entry_names_its_node():
    from optimem.harness.distributed.launch import combine

    ranks = [{"status": "error", "reason": "x", "measured": None, "node": "node7"},
             {"status": "error", "reason": "y", "measured": None, "node": "node8"}]
    out = combine(ranks, returncode=1, timed_out=False, timeout_s=10)
    assert [r["node"] for r in out["distributed"]["ranks"]] == ["node7", "node8"]
