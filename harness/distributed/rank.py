"""Inside one rank of a multi-process run (child side): accelerate's FSDP/DeepSpeed paths opened to CPU ranks,
and :class:`RankView`, which tells the trackers what the engine made of the parameters, gradients and optimizer
state (bytes)."""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from optimem.harness.contract import TIMEOUT_ENV, rank_info
from optimem.harness.distributed.schemes import ZERO_STAGES, is_distributed, training_arguments
from optimem.harness.state_walker import _plain_tensors, measure_optimizer_state

MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
"""Where DeepSpeed's ZeRO optimizers keep the fp32 master partitions (stage 1/2, stage 3)."""


def rank_training_arguments(cfg, model) -> dict[str, Any]:
    """What a rank's Trainer gets (:func:`training_arguments`), with accelerate's FSDP/DeepSpeed paths
    opened to CPU ranks first (:func:`enable_cpu_sharding`)."""
    if is_distributed(cfg) and cfg.sharding != "ddp" and cfg.resolved_device() == "cpu":
        enable_cpu_sharding()
        if cfg.sharding in ZERO_STAGES:
            skip_deepspeed_shm_op()
    return training_arguments(cfg, model, timeout_s=float(os.environ.get(TIMEOUT_ENV, 0)) or None)


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
    # (``import deepspeed.comm.torch as m`` would bind the torch package: deepspeed.comm re-exports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# ------------------------------------------------------------------------------------- inside a rank
def _storage_bytes(tensors, seen: set | None = None) -> int:
    """Unique storage bytes of the plain tensors behind ``tensors`` (DTensors opened; meta skipped)."""
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
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group  # lazy: FSDP runs only

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
