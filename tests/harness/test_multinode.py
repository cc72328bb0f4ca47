"""Multi-node runs (optimem.harness.multinode): the commands they build, the batch script run by bash with
stand-ins for ``scontrol`` and ``srun`` (the endpoint every node is given is the allocation's first node), the
per-node figures, and ``bench run --nnodes 2`` on the real one-node Slurm (``../shared/slurm/up.sh``; skipped
saying why when no cluster can start): one job through submitit whose batch step runs srun, starting two torchrun
agents that meet through c10d as two nodes would (``OPTIMEM_SIMULATE_AGENTS_PER_NODE=2``: both on this host)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from optimem.harness.distributed.nodes import measured_nodes, predicted_per_node
from optimem.harness.distributed.report import rank_rows
from optimem.harness.multinode import AGENTS_ENV, batch_script, slurm_parameters, srun_command
from optimem.harness.record import validate
from optimem.harness.run_config import RunConfig

RUN = ["--optim", "adamw_torch", "--model", "tiny-llama", "--nproc", "2", "--sharding", "ddp", "--device", "cpu",
       "--steps", "2", "--warmup", "1", "--batch-size", "1", "--seq-len", "8"]
MATRIX_ENV = "OPTIMEM_DISTRIBUTED_MATRIX"


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


def test_agents_packed_on_a_node_simulate_nodes():
    argv = srun_command(2, 1, "J", "R", endpoint="vm:1", rdzv_id="9", python="py", agents_per_node=2, cpus_per_task=1)
    assert argv[:6] == ["srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
                        "--cpus-per-task=1"]
    assert "--nnodes=2" in argv and "--nproc-per-node=1" in argv


def test_ranks_group_by_agent_and_the_planner_gives_host_bytes_per_node():
    facts = [{"hostname": "vm", "node_rank": r // 2, "slurm_node_id": 0} for r in range(4)]
    ranks = [{"rank": r, "node": "vm", "node_facts": facts[r], "status": "ok",
              "measured": {"peak_bytes": 100 + r, "peaks": {"rss_peak_bytes": 1000}}} for r in range(4)]
    nodes = measured_nodes(ranks)
    assert [(n["node_rank"], n["ranks"], n["peak_bytes_sum"], n["rss_peak_bytes_sum"]) for n in nodes] == \
        [(0, [0, 1], 201, 2000), (1, [2, 3], 205, 2000)]
    cfg = RunConfig(model="tiny-llama", optim="sgd", device="cpu", num_processes=4, num_nodes=2, sharding="ddp")
    assert predicted_per_node(cfg, "cpu", {"supported": True, "peak_bytes": 50}, None)["host_bytes"] == 100
    off = {"offload": {"scheme": "DeepSpeed ZeRO-3", "host_per_node": 7, "nvme_per_node": 3, "pinned_per_rank": 1}}
    got = predicted_per_node(cfg, "cuda", {"supported": True, "peak_bytes": 50}, off)
    assert (got["host_bytes"], got["nvme_bytes"], got["pinned_bytes"]) == (7, 3, 2)
    assert predicted_per_node(cfg, "cuda", {"supported": True, "peak_bytes": 50}, None)["host_bytes"] is None
    assert predicted_per_node(cfg, "cuda", {"supported": True, "host_state_bytes": 5}, None)["host_bytes"] == 10


def _bench(args: list[str], cwd: Path, env: dict | None = None, prefix: list[str] | None = None):
    cmd = [*(prefix or []), sys.executable, "-c", "import sys; from optimem.harness.cli import main; sys.exit(main())",
           *args]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if not k.startswith("SLURM_")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def _check_record(out: Path, nodes: int) -> dict:
    rec = json.loads(out.read_text().splitlines()[-1])
    validate(rec)
    assert rec["status"] == "ok", rec["reason"]
    d = rec["distributed"]
    assert d["launcher"] == "srun + torchrun" and d["command"].startswith("srun ")
    assert [e["status"] for e in d["ranks"]] == ["ok", "ok"]
    for e in d["ranks"]:  # each rank names its host, its node rank in the rendezvous and its Slurm job
        f = e["node_facts"]
        assert e["node"] and f["hostname"] == e["node"] and f["slurm_job_id"] and f["slurm_node_id"] == 0
    assert {e["node_facts"]["node_rank"] for e in d["ranks"]} == set(range(nodes))
    for r in rank_rows(rec):  # the planner's per-rank figures, as on one node
        assert r["within"], r
    n = d["nodes"]
    assert n["requested"] == nodes and len(n["measured"]) == nodes
    assert n["predicted"]["ranks_per_node"] == 2 // nodes
    for node in n["measured"]:  # CPU ranks: the node's host holds its ranks' peaks
        assert abs(node["peak_bytes_sum"] - n["predicted"]["host_bytes"]) <= 0.03 * node["peak_bytes_sum"]
    return rec


def test_bench_run_over_two_nodes_submits_one_job_whose_srun_starts_two_c10d_agents(slurm, tmp_path):
    out = tmp_path / "runs.jsonl"
    done = _bench(["run", *RUN, "--nnodes", "2", "--out", str(out)], tmp_path, env={AGENTS_ENV: "2"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rec = _check_record(out, nodes=2)
    assert "--ntasks=2 --ntasks-per-node=2" in rec["distributed"]["command"]
    assert "--rdzv-backend=c10d" in rec["distributed"]["command"] and "--nnodes=2" in rec["distributed"]["command"]
    assert rec["env"]["slurm"]["job_id"] == rec["distributed"]["ranks"][0]["node_facts"]["slurm_job_id"]
    assert "per node" in done.stdout and "node rank 1" in done.stdout and "COMPLETED" in done.stderr


@pytest.mark.skipif(not os.environ.get(MATRIX_ENV), reason=(
    f"a second real 2-rank launch (~30 s): set {MATRIX_ENV}=1; the default run checks the 2-node one above"))
def test_bench_run_inside_an_allocation_runs_srun_itself(slurm, tmp_path):
    out = tmp_path / "runs.jsonl"
    salloc = ["salloc", "--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--time=10"]
    done = _bench(["run", *RUN, "--executor", "slurm", "--out", str(out)], tmp_path, prefix=salloc)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rec = _check_record(out, nodes=1)
    assert "env" in rec and "slurm" not in rec["env"]  # not submitted: srun ran from the allocation's shell


def test_srun_needs_an_allocation_and_the_rendezvous_port_follows_the_first_node(tmp_path, monkeypatch):
    from optimem.estimators.errors import UserError
    from optimem.harness.multinode import RDZV_PORT, SrunLauncher, rendezvous_port

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = RunConfig(model="tiny-llama", optim="sgd", device="cpu", num_processes=2, num_nodes=2, sharding="ddp")
    with pytest.raises(UserError, match="allocation"):
        SrunLauncher(tmp_path).launch(cfg, timeout_s=5)
    assert rendezvous_port("elsewhere-node", "123456") == RDZV_PORT + 3456  # another node: derived from the job
    import socket
    assert rendezvous_port(socket.gethostname(), "1") != RDZV_PORT + 1  # this node: a free port
