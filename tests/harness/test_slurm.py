"""``bench sweep --executor slurm`` against a real one-node Slurm (``../shared/slurm/up.sh``, which .ci/run
starts; these tests start it too when they may, and skip saying why when no cluster can start), and submitit's
local executor for what one node cannot show (a preempted job requeued). Runs are tiny-llama, 2 steps."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install 'optimem[slurm]')")
import cloudpickle  # noqa: E402 - submitit's own dependency

from optimem.harness.cli import main
from optimem.harness.record import validate
from optimem.harness.run_config import RunConfig
from optimem.harness.slurm import SlurmExecutor, SlurmSettings, parse_extra

# the stand-in runners below travel to submitit's job process by value (that process cannot import this file)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GRID = ["--optim", "adamw_torch", "sgd", "--model", "tiny-llama", "--shape", "1x8", "2x8", "--steps", "2",
        "--warmup", "1", "--device", "cpu", "--progress", "lines"]


def _state(job: str) -> str | None:
    """squeue's state of ``job`` (an array task: ``ARRAY_TASK``), None once it has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    return out.split()[0] if out.split() else None


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _job_named(fragment: str) -> tuple[str, str] | None:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%j"], capture_output=True, text=True, timeout=20).stdout
    for line in out.splitlines():
        job, state, name = line.split("|", 2)
        if fragment in name:
            return job, state
    return None


def test_slurm_sweep_writes_the_local_records_a_cancelled_job_one_record_and_resume_finishes(slurm, tmp_path):
    out = tmp_path / "slurm.jsonl"
    cmd = [sys.executable, "-c", "import sys; from optimem.harness.cli import main; sys.exit(main())", "sweep",
           *GRID, "--executor", "slurm", "--out", str(out), "--fault", "sgd:2x8=hang@step0.forward"]
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(_records(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert len(_records(out)) == 3, (tmp_path / "sweep.log").read_text()
        hung = _job_named("sgd tiny-llama b2xs8")
        assert hung is not None and hung[1] == "RUNNING", hung  # cancelled mid-run
        subprocess.run(["scancel", hung[0]], check=True, timeout=20)
        assert proc.wait(timeout=120) == 1  # a run ended in an error: the cancelled job
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    recs = _records(out)
    assert len(recs) == 4
    failed = [r for r in recs if r["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["status"] == "error"
    assert failed[0]["config"]["optim"] == "sgd" and failed[0]["config"]["batch_size"] == 2
    assert f"Slurm job {hung[0]} ended CANCELLED" in failed[0]["reason"]
    assert failed[0]["measured"] is None
    for r in recs:
        validate(r)
        assert r["env"]["slurm"]["job_id"] and r["env"]["slurm"]["node"]
    # a sweep that died after a job returned but before it appended the record: --resume appends it from the
    # job's result file instead of running it again
    lost = next(r for r in recs if r["status"] == "ok")
    out.write_text("".join(json.dumps(r) + "\n" for r in recs if r is not lost))
    # --resume (with --retry-failed: the cancelled one is recorded as an error) runs only what is left
    assert main(["sweep", *GRID, "--executor", "slurm", "--out", str(out), "--resume", "--retry-failed"]) == 0
    recs = _records(out)
    assert len(recs) == 5 and recs[-1]["status"] == "ok" and recs[-1]["config"] == failed[0]["config"]
    recovered = [r for r in recs if "recovered_from" in r["run"].get("slurm", {})]
    assert [r["run_id"] for r in recovered] == [lost["run_id"]]  # the very record, not a new run
    slurm_ok = {r["run"]["config_key"]: r for r in recs if r["status"] == "ok"}
    assert len(slurm_ok) == 4 and len({r["env"]["slurm"]["job_id"] for r in slurm_ok.values()}) == 4
    # the same grid on the local executor: the same records, less the Slurm facts
    local = tmp_path / "local.jsonl"
    assert main(["sweep", *GRID, "--out", str(local), "--jobs", "2"]) == 0
    local_ok = {r["run"]["config_key"]: r for r in _records(local)}
    assert set(local_ok) == set(slurm_ok)
    for key, lr in local_ok.items():
        sr = slurm_ok[key]
        assert sr["status"] == lr["status"] == "ok" and sr["config"] == lr["config"]
        assert sr["predicted"] == lr["predicted"]
        assert sorted(sr["measured"]) == sorted(lr["measured"])
        for field in ("optimizer_state_bytes", "peak_bytes", "parameters_bytes", "gradients_bytes"):
            assert sr["measured"][field] == lr["measured"][field], field
        assert set(sr["env"]) - set(lr["env"]) == {"slurm"}
        assert "slurm" in sr["run"] and "slurm" not in lr["run"]


def test_ctrl_c_cancels_the_jobs_the_sweep_submitted(slurm, tmp_path):
    # a shape no other test submits: its job is found by name in squeue while other tests' jobs run
    out = tmp_path / "int.jsonl"
    cmd = [sys.executable, "-c", "import sys; from optimem.harness.cli import main; sys.exit(main())", "sweep",
           "--optim", "sgd", "--model", "tiny-llama", "--shape", "1x4", "--steps", "2", "--warmup", "1",
           "--device", "cpu", "--executor", "slurm", "--out", str(out), "--fault", "sgd=hang@step0.forward"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        job = None
        while job is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            job = _job_named("sgd tiny-llama b1xs4 fp32")
        assert job is not None, proc.stderr.read() if proc.poll() is not None else "no job in squeue"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while _job_named("sgd tiny-llama b1xs4 fp32") is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _job_named("sgd tiny-llama b1xs4 fp32") is None  # cancelled, not left running
    assert _records(out) == []  # an interrupted job is no outcome: nothing recorded


MATRIX_ENV = "OPTIMEM_SLURM_MATRIX"


@pytest.mark.parametrize("cancel", [False, pytest.param(True, marks=pytest.mark.skipif(
    not os.environ.get(MATRIX_ENV), reason=f"cancelling a task mid-run waits out Slurm's KillWait (~75 s in all): set "
                                          f"{MATRIX_ENV}=1; the first test cancels a job of a sweep without arrays"))])
def test_an_array_sweep_submits_one_array_and_resume_recovers_what_its_tasks_returned(slurm, tmp_path, cancel):
    out = tmp_path / "array.jsonl"
    grid = ["--optim", "sgd", "--model", "tiny-llama", "--shape", "1x6", "2x6", "--steps", "2", "--warmup", "1",
            "--device", "cpu", "--progress", "lines", "--executor", "slurm", "--slurm-array", "--out", str(out)]
    cmd = [sys.executable, "-c", "import sys; from optimem.harness.cli import main; sys.exit(main())", "sweep",
           *grid, *(["--fault", "sgd:2x6=hang@step0.forward"] if cancel else [])]
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not _records(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        first = _records(out)[0]["run"]["slurm"]["job_id"]  # ARRAY_TASK
        array_id, task = first.split("_")
        other = f"{array_id}_{1 - int(task)}"
        if cancel:
            while _state(other) != "RUNNING" and time.monotonic() < deadline:  # the hung task, mid-run
                time.sleep(0.5)
            assert _state(other) == "RUNNING"
            subprocess.run(["scancel", other], check=True, timeout=20)
        assert proc.wait(timeout=240) == (1 if cancel else 0), (tmp_path / "sweep.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        subprocess.run(["scancel", "--name", "optimem sweep (2 runs)"], timeout=20)  # nothing left behind
    recs = _records(out)
    by_task = {r["run"]["slurm"]["job_id"]: r for r in recs}
    assert sorted(by_task) == sorted([first, other])  # one array, a task per configuration
    assert {r["config"]["batch_size"] for r in recs} == {1, 2}
    assert all(r["env"]["slurm"]["array_job_id"] == array_id for r in recs if r["status"] == "ok")
    if cancel:
        failed = by_task[other]
        assert failed["status"] == "error" and failed["measured"] is None
        assert f"Slurm job {other} ended CANCELLED" in failed["reason"]
    else:
        assert [r["status"] for r in recs] == ["ok", "ok"]
        assert {r["env"]["slurm"]["array_task_id"] for r in recs} == {"0", "1"}
    # a sweep that died before appending a task's record: --resume appends it from the task's result file
    # (nothing runs again)
    kept, lost = by_task[other], by_task[first]
    out.write_text(json.dumps(kept) + "\n")
    main(["sweep", *grid, "--resume"])
    recs = _records(out)
    assert [r["run_id"] for r in recs] == [kept["run_id"], lost["run_id"]]
    assert recs[1]["run"]["slurm"]["recovered_from"].endswith(f"{first}_0_result.pkl")
    for r in recs:
        validate(r)


def test_an_unknown_partition_is_refused_before_anything_is_submitted(slurm, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["sweep", "--optim", "sgd", "--executor", "slurm", "--slurm-partition", "nosuch",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--slurm-partition: no partition 'nosuch'" in err[0] and "sinfo lists" in err[0]
    assert not out.exists()


def _slow_record(cfg, *, mark: str, **_kw) -> dict:
    """Stands in for a real run inside the job: the first attempt says it started (``mark``) and takes long,
    a later one returns at once."""
    first = not Path(mark).exists()
    Path(mark).write_text("started")
    time.sleep(30 if first else 0.1)
    return {"status": "ok", "config": cfg.to_dict(), "env": {}, "run": {}}


def _task(job):
    """The process running the job's function (a child of submitit's local controller process)."""
    import psutil

    (child,) = psutil.Process(job._process.pid).children()
    return child


def _started(mark: Path, deadline: float) -> None:
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.exists()


def _local_run(tmp_path, **params):
    """A run through submitit's local executor, started in a thread and inside its runner: ``(job, finish)``,
    ``finish(timeout)`` joins the thread and returns the record."""
    engine = submitit.LocalExecutor(folder=str(tmp_path / "jobs"))
    if params:
        engine.update_parameters(**params)
    mark = tmp_path / "started"
    ex = SlurmExecutor(SlurmSettings(folder=tmp_path), timeout_s=60, engine=engine,
                       runner=functools.partial(_slow_record, mark=str(mark)))
    cfg = RunConfig(model="tiny-llama", optim="sgd", device="cpu")
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(record=ex.run(cfg)))
    t.start()
    _started(mark, time.monotonic() + 60)  # inside the run: submitit's signal handlers are set before it

    def finish(timeout: float) -> dict:
        t.join(timeout=timeout)
        return got["record"]

    return next(iter(ex._jobs.values())), finish


def test_a_preempted_job_is_requeued_and_returns_one_whole_record(tmp_path):
    job, finish = _local_run(tmp_path, timeout_min=5)
    _task(job).send_signal(signal.SIGUSR2)  # what Slurm sends a job it preempts (submitit's --signal=USR2@90)
    rec = finish(90)
    assert rec["status"] == "ok" and rec["env"]["slurm"]["attempt"] == 2  # run again, from the start
    assert rec["env"]["slurm"]["executor"] == "submitit-local"


def test_a_job_killed_without_a_record_leaves_one_error_record(tmp_path):
    job, finish = _local_run(tmp_path)
    _task(job).kill()  # the node's OOM killer, a node failure
    rec = finish(60)
    validate(rec)
    assert rec["status"] == "error" and rec["measured"] is None
    assert f"Slurm job {job.job_id} ended" in rec["reason"] and "before it returned a record" in rec["reason"]


def test_settings_become_submitit_parameters():
    s = SlurmSettings(folder=Path("x"), partition="gpu", gpus_per_node=8, account="team", qos="high",
                      extra=parse_extra(["mem=64G", "--constraint=h100"]))
    assert s.parameters(timeout_s=1200) == {"time": 25, "partition": "gpu", "gpus_per_node": 8, "account": "team",
                                            "qos": "high", "additional_parameters": {"mem": "64G",
                                                                                      "constraint": "h100"}}
    assert SlurmSettings(folder=Path("x"), time_min=7).parameters(60)["time"] == 7
    ex = SlurmExecutor(s, timeout_s=60, engine=object())
    two = RunConfig(model="tiny-llama", optim="sgd", device="cuda", num_processes=2, sharding="ddp")
    one_node = {"nodes": 1, "ntasks_per_node": 1, "use_srun": True}
    assert ex.per_job(two) == {**one_node, "cpus_per_task": 2,  # --slurm-gpus-per-node 8 given: kept
                               "additional_parameters": {"mem": "64G", "constraint": "h100"}}
    mine = SlurmExecutor(SlurmSettings(folder=Path("x")), timeout_s=60, engine=object())
    assert mine.per_job(two) == {**one_node, "cpus_per_task": 2, "gpus_per_node": 2, "additional_parameters": {}}
    # over 2 nodes: the batch step runs srun (a torchrun agent per node); sbatch gets the nodes, submitit one task
    four = RunConfig(model="tiny-llama", optim="sgd", device="cuda", num_processes=8, num_nodes=2, sharding="ddp")
    assert mine.per_job(four) == {"nodes": 1, "ntasks_per_node": 1, "use_srun": False, "cpus_per_task": 4,
                                  "gpus_per_node": 4, "additional_parameters": {"nodes": 2}}
