"""Multi-process runs: the Trainer's own data-parallel integrations, launched with torchrun.

``bench run --nproc N --sharding ddp|fsdp|zero1|zero2|zero3`` trains the same Trainer job as a single-process
run, on ``N`` processes started by ``torchrun`` (``python -m torch.distributed.run``), each a
``python -m optimem.harness.worker`` measuring itself with the same trackers. What each scheme hands the Trainer:

* ``ddp``: nothing but the launch: the Trainer (through accelerate) wraps the model in
  ``DistributedDataParallel`` with its defaults (``gradient_as_bucket_view`` off, 25 MiB buckets).
* ``fsdp``: ``TrainingArguments(fsdp="full_shard auto_wrap", fsdp_config={"version": 2, ...})``: FSDP2
  ``fully_shard`` on every decoder layer (the model's own ``_no_split_modules`` classes), accelerate's
  embedding and tail units, and the root.
* ``zero1`` / ``zero2`` / ``zero3``: ``TrainingArguments(deepspeed=CONFIG)`` with a generated DeepSpeed
  config (:func:`deepspeed_config`): the ZeRO stage, the Trainer's ``auto`` values (batch, accumulation,
  clipping, precision, the hidden-size-based bucket sizes) and ``zero_allow_untested_optimizer`` (the Trainer
  builds the optimizer; DeepSpeed wraps it).

The backend is what accelerate picks: NCCL on CUDA, gloo on CPU. accelerate takes its FSDP and DeepSpeed
paths only on accelerators; on CPU ranks :func:`enable_cpu_sharding` lets it take the same branches.

:func:`launch` runs the job: one torchrun in its own session with the per-run timeout; each rank writes
``RESULT.rank<R>`` (the worker's payload); when one rank fails, torchrun's agent tears the others down (and a
gloo/NCCL collective that waits on a dead peer times out after ``ddp_timeout``). The outcome is one status for
the whole run (:func:`combine`): ``ok`` only when every rank is ``ok``, else ``oom`` if any rank ran out of
memory, else ``error``, with the reason of the rank that failed first. Inside a rank, :class:`RankView` tells
the trackers what the engine made of the parameters, gradients and optimizer state. :func:`section` is the
record's ``distributed`` part (every rank beside the planner's per-rank prediction, :func:`predict_per_rank`);
``python -m optimem.harness.distributed RESULTS.jsonl`` prints the per-rank table (:func:`markdown`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from optimem.harness.contract import (FAULT_ENV, TIMEOUT_ENV, WorkerOutcome, rank_info, rank_result_path, read_result,
                                      write_job)
from optimem.harness.process import die_with_parent, last_line, spawn, wait, worker_env
from optimem.harness.process import tail as log_tail

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
SCHEMES = ("ddp", "fsdp", *ZERO_STAGES)
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
"""Where DeepSpeed's ZeRO optimizers keep the fp32 master partitions (stage 1/2, stage 3)."""


# ------------------------------------------------------------------------------------ the Trainer's side
def is_distributed(cfg) -> bool:
    """Whether ``cfg`` is a multi-process run (``num_processes > 1``)."""
    return int(getattr(cfg, "num_processes", 1) or 1) > 1


def deepspeed_config(cfg) -> dict[str, Any]:
    """The DeepSpeed config a ZeRO run hands the Trainer (``TrainingArguments(deepspeed=...)``).

    ``auto`` is what the Trainer fills from its own arguments and the model (``reduce_bucket_size`` =
    hidden², ZeRO-3's ``stage3_prefetch_bucket_size`` = 0.9 hidden² and ``stage3_param_persistence_threshold``
    = 10 hidden); everything else is DeepSpeed's default."""
    stage = ZERO_STAGES[cfg.sharding]
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


def fsdp_config(model) -> dict[str, Any]:
    """The ``fsdp_config`` of an FSDP2 run: full shard, wrapping each of the model's decoder-layer classes
    (``model._no_split_modules``, the classes transformers itself keeps whole)."""
    layers = sorted(set(getattr(model, "_no_split_modules", None) or []))
    out: dict[str, Any] = {"version": 2, "reshard_after_forward": True}
    if layers:
        out["transformer_layer_cls_to_wrap"] = layers
    return out


def rank_training_arguments(cfg, model) -> dict[str, Any]:
    """What a rank's Trainer gets (:func:`training_arguments`), with accelerate's FSDP/DeepSpeed paths
    opened to CPU ranks first (:func:`enable_cpu_sharding`)."""
    if is_distributed(cfg) and cfg.sharding != "ddp" and cfg.resolved_device() == "cpu":
        enable_cpu_sharding()
        if cfg.sharding in ZERO_STAGES:
            skip_deepspeed_shm_op()
    return training_arguments(cfg, model, timeout_s=float(os.environ.get(TIMEOUT_ENV, 0)) or None)


def model_class(cfg):
    """The transformers class ``cfg`` trains (for its ``_no_split_modules``), built on the meta device."""
    from optimem.estimators.catalog import resolve
    from optimem.estimators.inventory import instantiate

    return type(instantiate(resolve(cfg.model), device="meta"))


def training_arguments(cfg, model, timeout_s: float | None = None) -> dict[str, Any]:
    """The ``TrainingArguments`` keywords ``cfg``'s sharding scheme adds (empty for one process).
    ``model``: the model or its class; ``timeout_s``: the run's timeout, which bounds how long a collective
    waits for a dead peer (``ddp_timeout``)."""
    if not is_distributed(cfg) and cfg.sharding in ("none", "ddp"):
        return {}
    out: dict[str, Any] = {}
    if timeout_s:
        out["ddp_timeout"] = max(int(timeout_s), 1)
    if cfg.sharding == "fsdp":
        out.update(fsdp="full_shard auto_wrap", fsdp_config=fsdp_config(model))
    elif cfg.sharding in ZERO_STAGES:
        out["deepspeed"] = deepspeed_config(cfg)
        out["deepspeed"]["train_batch_size"] = cfg.batch_size * cfg.grad_accum * cfg.num_processes
        # accelerate takes the DeepSpeed path only when not told use_cpu; on a machine without CUDA,
        # DeepSpeed's CPU accelerator is then the device (gloo backend).
        out["use_cpu"] = False
    return out


# ------------------------------------------------------------------------------- sharding on CPU ranks
_CPU_SHARDING_ENABLED = False


def enable_cpu_sharding() -> None:
    """Let accelerate take its FSDP and DeepSpeed paths on CPU ranks (gloo), as it does on GPUs.

    accelerate 1.x sets up FSDP only for accelerator distributed types (``MULTI_GPU``, ``MULTI_XPU``, ...)
    and DeepSpeed only when not on ``cpu``: a CPU Trainer given ``fsdp`` silently trains plain DDP, and one
    given ``deepspeed`` (with ``use_cpu=False``) finds no backend and trains one process. Two patches make
    the same code run on CPU ranks: a multi-CPU state given an FSDP plugin becomes an FSDP state (the very
    assignments accelerate's accelerator branch makes), and a DeepSpeed launch on a machine without CUDA gets
    the gloo backend (DeepSpeed's CPU accelerator's own fallback when oneCCL is absent). Nothing else about
    the run changes; called in the worker before the Trainer exists, never on a CUDA machine."""
    global _CPU_SHARDING_ENABLED
    if _CPU_SHARDING_ENABLED:
        return
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        return
    prepare_backend = PartialState._prepare_backend
    state_init = AcceleratorState.__init__

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        name, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if (name is None and not cpu and deepspeed and int(os.environ.get("LOCAL_RANK", -1)) != -1):
            return "gloo", DistributedType.MULTI_CPU
        return name, kind

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    PartialState._prepare_backend = _prepare_backend
    AcceleratorState.__init__ = __init__
    _CPU_SHARDING_ENABLED = True


def skip_deepspeed_shm_op() -> None:
    """Do not JIT-compile DeepSpeed's CPU shared-memory all-reduce op. DeepSpeed builds it when its comm
    backend starts on CPU (a minute of compiler time on a fresh 2-core machine) but uses it only in
    ``inference_all_reduce``; training collectives go through torch.distributed (gloo) either way."""
    import importlib

    # (``import deepspeed.comm.torch as m`` would bind the torch package: deepspeed.comm re-exports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# ------------------------------------------------------------------------------------- inside a rank
def _storage_bytes(tensors, seen: set | None = None) -> int:
    """Unique storage bytes of the plain tensors behind ``tensors`` (DTensors opened; meta skipped)."""
    from optimem.harness.state_walker import _plain_tensors

    import torch

    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        for pt in _plain_tensors(t):
            if pt.device.type == "meta":
                continue
            st = pt.untyped_storage()
            key = (str(pt.device), st.data_ptr())
            if key in seen or st.nbytes() == 0:
                continue
            seen.add(key)
            total += st.nbytes()
    return total


class RankView:
    """What one rank of a sharded run holds, as the engine that shards it arranges it.

    ``attach(trainer)`` runs at ``train_begin`` (the Trainer has wrapped the model and built the engine):
    the model's parameters are read again (FSDP2 replaces them with DTensors; DeepSpeed points them into
    its flat buffers or empties them), and a DeepSpeed engine's ``step`` (which accelerate calls from
    inside ``backward``) is wrapped so that it is the run's optimizer-step phase, as ``optimizer.step()`` is
    for DDP and FSDP. Then :meth:`categories` tells the tensor accountant which storages are parameters
    (local shards, DeepSpeed's fp32 master partition), gradients (``.grad`` and the engine's gradient
    partitions and buckets) and optimizer state (the optimizer the Trainer built, inside the engine), and
    :meth:`model_states` measures them (bytes)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = rank_info()
        self.engine = None
        self.zero = None
        self.trainer = None
        self.params: list = []
        self.engine_step = False
        self.at_step: dict[str, int] = {}

    # ------------------------------------------------------------------------------- wiring
    def attach(self, trainer, model, on_step: Callable[[str], None],
               on_resize: Callable[[Any], None] | None = None) -> list:
        """Read the wrapped model's parameters; make a DeepSpeed engine's ``step`` call ``on_step("pre")`` and
        ``on_step("post")`` around itself; tell ``on_resize(tensor)`` each time FSDP2 allocates or frees an
        unsharded parameter's storage (``storage.resize_``, which no dispatch mode sees). Returns the
        parameters as the run now sees them."""
        self.trainer = trainer
        self.params = list(model.parameters())
        if on_resize is not None and self.cfg.sharding == "fsdp":
            watch_fsdp_storage(on_resize)
        engine = getattr(trainer, "model_wrapped", None)
        if engine is not None and type(engine).__name__ == "DeepSpeedEngine":
            self.engine = engine
            self.zero = engine.optimizer
            step = engine.step

            def wrapped_step(*args, **kwargs):
                on_step("pre")
                try:
                    return step(*args, **kwargs)
                finally:
                    on_step("post")

            engine.step = wrapped_step
            self.engine_step = True
        return self.params

    def optimizer(self, opt):
        """The optimizer whose state is measured: the Trainer's own (DeepSpeed wraps it in a ZeRO
        optimizer whose ``.optimizer`` it is)."""
        if self.zero is not None:
            return getattr(self.zero, "optimizer", opt)
        return opt

    # ------------------------------------------------------------------------------- what is what
    def _inner_params(self) -> list:
        inner = self.optimizer(None)
        if inner is None or self.zero is None:
            return []
        return [p for g in inner.param_groups for p in g["params"]]

    def weights(self) -> list:
        """Local parameter storage: the parameters (DTensor local shards), ZeRO-3's partitions
        (``ds_tensor``)."""
        out = list(self.params)
        out += [p.ds_tensor for p in self.params if getattr(p, "ds_tensor", None) is not None]
        return out

    def master_weights(self) -> list:
        """DeepSpeed's fp32 partitions, which the optimizer updates: ZeRO-1/2's
        ``single_partition_of_fp32_groups``, ZeRO-3's ``fp32_partitioned_groups_flat`` (a copy of the local
        weights even when training in fp32)."""
        if self.zero is None:
            return []
        out = []
        for name in MASTER_ATTRS:
            out += [t for t in getattr(self.zero, name, None) or [] if t is not None]
        return out + self._inner_params()

    def gradients(self) -> list:
        """Every gradient storage: ``.grad`` of the parameters and of the master partition, and the tensors
        the ZeRO optimizer keeps besides parameters and optimizer state (its reduced gradient partitions,
        reduction buckets, norms)."""
        out = [p.grad for p in self.params if p.grad is not None]
        out += [p.grad for p in self.master_weights() if p.grad is not None]
        if self.zero is not None:
            out += self._engine_buffers()[0]
        return out

    def _engine_buffers(self) -> tuple[list, dict[str, int]]:
        from optimem.harness.state_walker import measure_optimizer_state

        inner = self.optimizer(None)
        exclude = self.weights() + self.master_weights()
        inner_state: list = []
        measure_optimizer_state(inner, exclude=exclude, collect=inner_state)
        found: list = []
        shell = _Shell(self.zero, inner)
        m = measure_optimizer_state(shell, exclude=exclude + inner_state, collect=found)
        return found, m.by_key

    def parameter_bytes(self) -> int:
        """Local parameter storage and master partitions, bytes."""
        return _storage_bytes(self.weights() + self.master_weights())

    def categories(self) -> dict[str, list]:
        """For the tensor accountant: parameters (local shards and master partitions) and gradients."""
        return {"parameters": self.weights() + self.master_weights(), "gradients": self.gradients()}

    def model_states(self, optimizer_state: int | None) -> dict[str, int]:
        """Per-rank model-state bytes now: ``weights``, ``master_weights``, ``gradients`` (without the
        reduction buckets), ``gradient_buckets`` (DeepSpeed's ``ipg`` buckets), ``optimizer_state``."""
        seen: set = set()
        w = _storage_bytes(self.weights(), seen)
        master = _storage_bytes(self.master_weights(), seen)
        grads = _storage_bytes([p.grad for p in self.params] + [p.grad for p in self.master_weights()], seen)
        buckets = 0
        if self.zero is not None:
            _, by_key = self._engine_buffers()
            for key, nbytes in by_key.items():
                if "ipg" in key:
                    buckets += nbytes
                else:
                    grads += nbytes
        return {"weights": w, "master_weights": master, "gradients": grads, "gradient_buckets": buckets,
                "optimizer_state": int(optimizer_state or 0)}


def watch_fsdp_storage(on_resize: Callable[[Any], None]) -> None:
    """Call ``on_resize(tensor)`` after FSDP2's ``alloc_storage`` / ``free_storage`` (it all-gathers into
    parameter storages it grows and shrinks in place with ``untyped_storage().resize_``, a call below the
    dispatcher)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    def wrap(fn):
        if getattr(fn, "_optimem_watched", False):
            return fn

        def inner(tensor):
            fn(tensor)
            on_resize(tensor)

        inner._optimem_watched = True
        return inner

    _fsdp_param.alloc_storage = wrap(_fsdp_param.alloc_storage)
    _fsdp_param.free_storage = wrap(_fsdp_param.free_storage)
    _fsdp_param_group.alloc_storage = wrap(_fsdp_param_group.alloc_storage)


class _Shell:
    """The ZeRO optimizer's attributes without the wrapped optimizer (walked for the engine's buffers)."""

    def __init__(self, zero, inner):
        self.__dict__.update({k: v for k, v in vars(zero).items() if v is not inner})


def unsupported_reason(cfg) -> str | None:
    """Why the Trainer cannot run ``cfg``'s optimizer under its sharding scheme (None if it can; the
    planner's :func:`optimem.estimators.planner.sharding_support`), or why this machine cannot launch it."""
    if not is_distributed(cfg):
        return None
    from optimem.estimators.sharding import sharding_support

    ok, why = sharding_support(cfg.optim, cfg.sharding, cfg.num_processes)
    if not ok:
        return why
    if cfg.sharding in ZERO_STAGES:
        import importlib.util

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
           on_start: Callable[[subprocess.Popen], None] | None = None, log_path: str | None = None):
    """Run ``cfg`` on ``cfg.num_processes`` ranks under torchrun and return one
    :class:`optimem.harness.launcher.WorkerOutcome` for the whole run (see :func:`combine`): its payload holds the
    worst rank's ``measured`` and a ``distributed`` section with every rank's result."""
    import tempfile

    n = int(cfg.num_processes)
    with tempfile.TemporaryDirectory(prefix="optimem-dist-") as tmp:
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
        argv = torchrun_command(cfg, job, result)
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
        payload["distributed"].update(launcher="torchrun", command=" ".join(argv[1:-2] + ["JOB", "RESULT"]))
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
                            "detail": p.get("detail")})
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


# --------------------------------------------------------------------------------------- the record
def predict_per_rank(cfg, device: str) -> dict[str, Any]:
    """The planner's per-rank figures for ``cfg`` on ``device`` (bytes): its sharding terms
    (:func:`optimem.estimators.planner.shard_model_states`), the whole-step peak and its parts
    (:func:`optimem.estimators.planner.step_memory`), and the three figures a run is checked on: ``weights_bytes``
    (local weights and master partitions), ``gradients_bytes`` (the gradient storage at the optimizer step,
    buckets excluded) and ``optimizer_state_bytes``."""
    from dataclasses import replace

    from optimem.estimators.errors import UserError
    from optimem.estimators.sharding import sharding_support
    from optimem.estimators.step_memory import step_memory

    ok, why = sharding_support(cfg.optim, cfg.sharding, cfg.num_processes)
    if not ok:
        return {"supported": False, "reason": why}
    try:
        mem = step_memory(setup_for(cfg, device), cfg.batch_size)
    except UserError as exc:
        return {"supported": False, "reason": str(exc)}
    t = mem.terms
    per_rank = [int(g) for g in rank_gradients(setup_for(cfg, device))]
    return {"supported": True, "reason": why, "peak_bytes": int(mem.peak), "peak_phase": mem.peak_phase,
            "weights_bytes": int(t["weights"] + t["master_weights"]),
            "gradients_bytes": int(t["gradients"]), "gradients_bytes_per_rank": per_rank,
            "optimizer_state_bytes": int(t["optimizer_state"]),
            "terms": {k: int(v) for k, v in t.items()}, "breakdown": {k: int(v) for k, v in mem.breakdown.items()}}


def setup_for(cfg, device: str):
    from dataclasses import replace

    return replace(cfg.setup(), device=device)


def rank_gradients(setup) -> list[int]:
    """The planner's gradient storage at the optimizer step for each rank (bytes)."""
    from optimem.estimators.step_memory import model_state_terms

    return [model_state_terms(setup, rank=r)["gradients"] for r in range(setup.num_processes)]


def section(cfg, payload: Mapping[str, Any], *, timeout_s: float, device: str) -> dict[str, Any] | None:
    """The record's ``distributed`` section of a multi-process run (None for one process): the scheme, how
    it was launched and what the Trainer was given, every rank's status and measurement, and the planner's
    per-rank prediction beside them."""
    if not is_distributed(cfg):
        return None
    got = dict(payload.get("distributed") or {})
    try:
        trainer_args = training_arguments(cfg, model_class(cfg), timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the record is still written
        trainer_args = {"error": f"{type(exc).__name__}: {exc}"}
    return {"scheme": cfg.sharding, "world_size": int(cfg.num_processes),
            "backend": "nccl" if device == "cuda" else "gloo", "launcher": got.get("launcher", "torchrun"),
            "command": got.get("command"), "training_arguments": trainer_args,
            "measured_rank": got.get("measured_rank"), "ranks": got.get("ranks") or [],
            "predicted": predict_per_rank(cfg, device)}


# --------------------------------------------------------------------------------------- the report
PEAK_TOLERANCE = 0.03
STATE_TOLERANCE = 0.01
"""What the per-rank prediction is held to (tests, the report): the peak within 3%, the optimizer state and
the gradients within 1%."""


def _err(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or measured is None:
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


def rank_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per rank of a multi-process record: measured against predicted peak, gradients and optimizer
    state (bytes) and the relative errors (``(predicted - measured) / measured``)."""
    d = record.get("distributed") or {}
    pred = d.get("predicted") or {}
    c = record.get("config") or {}
    out = []
    for e in d.get("ranks") or []:
        m = e.get("measured") or {}
        ms = m.get("model_states") or {}
        r = int(e.get("rank", 0))
        per = pred.get("gradients_bytes_per_rank") or []
        row = {"optim": c.get("optim"), "model": c.get("model"), "scheme": d.get("scheme"),
               "world_size": d.get("world_size"), "rank": r, "status": e.get("status"), "reason": e.get("reason"),
               "supported": bool(pred.get("supported")),
               "peak": m.get("peak_bytes"), "peak_predicted": pred.get("peak_bytes"),
               "gradients": ms.get("gradients"),
               "gradients_predicted": per[r] if r < len(per) else pred.get("gradients_bytes"),
               "optimizer_state": ms.get("optimizer_state", m.get("optimizer_state_bytes")),
               "optimizer_state_predicted": pred.get("optimizer_state_bytes"),
               "weights": (ms.get("weights") or 0) + (ms.get("master_weights") or 0) if ms else None,
               "weights_predicted": pred.get("weights_bytes")}
        for k in ("peak", "gradients", "optimizer_state", "weights"):
            row[f"{k}_error"] = _err(row[f"{k}_predicted"], row[k]) if e.get("status") == "ok" else None
        row["within"] = (e.get("status") == "ok" and row["peak_error"] is not None
                         and abs(row["peak_error"]) <= PEAK_TOLERANCE
                         and abs(row["gradients_error"]) <= STATE_TOLERANCE
                         and abs(row["optimizer_state_error"]) <= STATE_TOLERANCE)
        out.append(row)
    return out


def markdown(records) -> str:
    """A Markdown table of every rank of every multi-process record (skipped and failed runs listed with
    their reason)."""
    from optimem.harness.units import human_bytes

    def pct(x):
        return "" if x is None else ("exact" if x == 0 else f"{x:+.2%}")

    head = ("| optimizer | model | scheme | rank | peak measured | predicted | error | gradients | error "
            "| optimizer state | error | within |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | --- |")
    lines, notes = [head], []
    for rec in records:
        if not rec.get("distributed"):
            if (rec.get("config") or {}).get("num_processes", 1) > 1:
                c = rec["config"]
                notes.append(f"- {c['optim']} {c['model']} {c.get('sharding')}: {rec['status']}: {rec['reason']}")
            continue
        rows = rank_rows(rec)
        if rec.get("status") != "ok":
            c = rec["config"]
            notes.append(f"- {c['optim']} {c['model']} {c.get('sharding')}: {rec['status']}: {rec['reason']}")
            continue
        for r in rows:
            lines.append(f"| {r['optim']} | {r['model']} | {r['scheme']} | {r['rank']} | {human_bytes(r['peak'])} "
                         f"| {human_bytes(r['peak_predicted'])} | {pct(r['peak_error'])} | {human_bytes(r['gradients'])} "
                         f"| {pct(r['gradients_error'])} | {human_bytes(r['optimizer_state'])} "
                         f"| {pct(r['optimizer_state_error'])} | {'yes' if r['within'] else 'NO'} |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def summary_markdown(records) -> str:
    """Per scheme: how many runs and ranks were checked, the optimizers and models, and the worst per-rank
    errors of the peak, the gradients and the optimizer state."""
    by: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("status") == "ok" and rec.get("distributed"):
            by.setdefault(rec["distributed"]["scheme"], []).append(rec)
    lines = ["| scheme | runs | ranks | optimizers | models | worst peak error | worst gradients error "
             "| worst optimizer-state error | all within |", "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for scheme in SCHEMES:
        recs = by.get(scheme)
        if not recs:
            continue
        rows = [r for rec in recs for r in rank_rows(rec)]

        def worst(key):
            return max((r[key] for r in rows if r[key] is not None), key=abs, default=None)

        optims = sorted({r["optim"] for r in rows})
        models = sorted({r["model"] for r in rows})
        lines.append(f"| {scheme} | {len(recs)} | {len(rows)} | {', '.join(optims)} | {', '.join(models)} "
                     f"| {worst('peak_error'):+.2%} | {worst('gradients_error'):+.3%} "
                     f"| {worst('optimizer_state_error'):+.3%} | {'yes' if all(r['within'] for r in rows) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m optimem.harness.distributed RESULTS.jsonl [--markdown OUT.md]``: the per-rank table."""
    import argparse

    from optimem.harness.results import load_records

    p = argparse.ArgumentParser(prog="python -m optimem.harness.distributed",
                                description="per-rank measured vs predicted table of multi-process records")
    p.add_argument("results", nargs="+")
    p.add_argument("--markdown", metavar="OUT.md")
    args = p.parse_args(argv)
    recs = [r for r in load_records(args.results) if (r.get("config") or {}).get("num_processes", 1) > 1]
    text = summary_markdown(recs) + "\n" + markdown(recs)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text, end="")
    bad = [r for rec in recs if rec.get("status") == "ok" for r in rank_rows(rec) if not r["within"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
