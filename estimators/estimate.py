"""``estimate()``: predicted bytes for one training setup, from the parameter inventory and the phase model."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .steps import build as build_step
from .cache import key as cache_key, memo
from .catalog import ModelSource
from .cuda_overhead import alloc_config, cuda_terms, reserve_within
from .errors import UserError
from .inventory import build_inventory
from .optimizers import OptimizerSpec, ParamCtx, get_spec, parse_optim_args
from .optimizers.spec import LAYERWISE_DUMMY_BYTES
from .params import Inventory
from .offload import split as offload_split
from .peak import PhaseModel, evaluate
from .peft_model import adapter_inventory, peak_limit, resident_bytes, trace_fields
from .setup import TrainingSetup
from .trace.setting import TraceSetting
from .vision import TASK as IMAGE_TASK, configured_image_size
from .user_objects import setup_for


@dataclass
class Estimate:
    """A prediction for one :class:`~optimem.estimators.setup.TrainingSetup`. Every figure in ``bytes`` is in bytes.

    ``setup``: what was estimated (the model name canonical, the device the prediction is for: ``cuda`` or
    ``cpu``); its fields read as attributes too (``est.optim``, ``est.batch_size``...).
    ``bytes`` keys: ``weights`` (parameters as stored; bitsandbytes-quantized weights with their quantization
    state), split into ``weights_trainable`` (a LoRA setup's adapters) and ``weights_frozen`` (its base
    model), ``gradients`` (gradient bytes held at once),
    ``optimizer_state`` (all optimizer-state bytes wherever they live), ``optimizer_state_host`` (the part
    kept in host memory when training on an accelerator) and ``optimizer_state_device`` (the rest),
    ``activations`` (bytes alive at the end of the forward that the forward created: saved activations,
    logits and loss buffers, the batch) and ``peak`` (the whole step's peak of live tensor bytes on the
    training device: the largest phase); ``activations`` and ``peak`` are None where the step cannot be traced
    (an LLM.int8 base on CUDA: :func:`optimem.estimators.peft_model.peak_limit`, the last note says why).
    ``optim_args``: the optimizer's resolved hyper-parameters (Trainer defaults overridden by the setup's).
    ``state_breakdown``: optimizer-state bytes summed per state tensor name (``exp_avg``, ``absmax1``...).
    ``phases``: per phase (``step0.forward`` ... ``steady.optimizer_step``), its ``peak`` and the bytes at
    that peak split into ``weights``, ``gradients``, ``optimizer_state``, ``activations``, ``temporaries``
    and ``other``. ``peak_phase``: the phase holding ``bytes["peak"]``.
    ``cuda``: on a CUDA device, the terms the tensor peak does not contain (allocation rounding, cuBLAS
    workspaces, the CUDA context, the caching allocator's reserved-but-unallocated bytes; see
    ``estimators/cuda_overhead.py``) and ``peak_reserved`` / ``peak_device``; ``None`` for the CPU.
    """

    setup: TrainingSetup
    num_params: int
    trainable_params: int
    bytes: dict[str, int]
    state_breakdown: dict[str, int]
    optim_args: dict[str, Any]
    targeted_params: int
    family: str
    notes: list[str] = field(default_factory=list)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_phase: str = ""
    cuda: dict[str, Any] | None = field(default_factory=lambda: None)  # no class attribute: see __getattr__
    offload: dict[str, Any] | None = None

    def __getattr__(self, name: str):
        if name == "cuda":  # computed when first read (the caching allocator's replay costs more than the rest)
            thunk = self.__dict__.pop("_cuda_thunk", None)
            self.__dict__["cuda"] = value = thunk() if thunk is not None else None
            return value
        # The setup's fields read as the estimate's own (est.optim, est.seq_len...).
        if name != "setup" and name in _SETUP_FIELDS:
            return getattr(self.setup, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def reserve_within(self, capacity: int) -> int | None:
        """The caching allocator's most reserved bytes when this CUDA step runs within ``capacity`` bytes of device
        memory (the GPU's less its context; its cache flushes and retries included), None when it cannot run
        there. Raises ValueError for an estimate that is not a CUDA one."""
        check = self.__dict__.get("_reserve_within")
        if check is None:
            raise ValueError("reserve_within: not a CUDA estimate (device='cuda', a traced step)")
        return check(capacity)

    @property
    def state_bytes_per_param(self) -> float:
        """Optimizer-state bytes per trainable parameter."""
        return self.bytes["optimizer_state"] / max(self.trainable_params, 1)

    def to_dict(self) -> dict[str, Any]:
        """The setup's fields flattened beside the prediction's (``optim_args`` resolved)."""
        d = {**self.setup.to_dict(), **{k: v for k, v in asdict(self).items() if k != "setup"}}
        d["state_bytes_per_param"] = self.state_bytes_per_param
        return json.loads(json.dumps(d, default=str))


_SETUP_FIELDS = frozenset(f.name for f in fields(TrainingSetup))


def _targets_key(target_modules) -> tuple[str, ...] | str | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        return target_modules
    return tuple(target_modules)


LAYERWISE_DUMMY_KEY = "layerwise_dummy"


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"


@functools.lru_cache(maxsize=1024)
def _matched(inv: Inventory, targets) -> frozenset[str]:
    """The ``nn.Linear`` module names of ``inv`` that ``transformers.trainer_utils.check_target_module_exists``
    accepts for ``targets`` (a string or a tuple); kept in the on-disk cache per config (that check imports
    transformers)."""
    if _is_all_linear(targets):
        return frozenset(inv.linear_modules)

    def build() -> list[str]:
        from transformers.trainer_utils import check_target_module_exists  # lazy: transformers only on a cache miss

        tm = list(targets) if isinstance(targets, tuple) else targets
        return [m for m in inv.linear_modules if check_target_module_exists(tm, m)]

    if not inv.config_hash:
        return frozenset(build())

    def decode(names) -> list[str]:
        if not isinstance(names, list) or not set(names) <= set(inv.linear_modules):
            raise ValueError("not module names of this model")
        return names

    k = cache_key("targets", 1, config=inv.config_hash, targets=targets)
    return frozenset(memo(k, build, decode=decode))


def matched_linear_modules(inv: Inventory, target_modules) -> list[str]:
    """``nn.Linear`` module names the Trainer's target search finds (before it deduplicates parameters)."""
    matched = _matched(inv, _targets_key(target_modules))
    return [m for m in inv.linear_modules if m in matched]


def targeted_names(inv: Inventory, target_modules) -> frozenset[str]:
    """Names of the parameters GaLore/APOLLO project, exactly as the Trainer selects them:
    ``nn.Linear`` modules whose name matches ``optim_target_modules`` (a regex string, a list of names or
    regexes, or ``all-linear``), their ``.weight``, deduplicated like ``named_parameters()``."""
    matched = _matched(inv, _targets_key(target_modules))
    return frozenset(row.name for row in inv.rows
                     if row.is_linear_module and row.name == f"{row.module_name}.weight" and len(row.shape) == 2
                     and row.module_name in matched)


@functools.lru_cache(maxsize=4096)
def _state(inv: Inventory, name: str, args_items: tuple, targets) -> tuple[dict[str, int], int, int]:
    """(state bytes per tensor name, total state bytes, number of trainable params GaLore/APOLLO project)."""
    spec = get_spec(name)
    args = dict(args_items)
    targeted = targeted_names(inv, targets) if spec.needs_target_modules else frozenset()
    if spec.needs_target_modules and not matched_linear_modules(inv, targets):
        # The Trainer raises 'No target modules found' when no nn.Linear module matches (a match whose weight
        # is tied to an embedding, like GPT-2's lm_head, is found but then projects nothing).
        if not inv.linear_modules:
            kinds = sorted({r.module_class for r in inv.rows if r.module_kind == "conv1d"}) or ["no nn.Linear"]
            raise UserError(f"{name} projects only nn.Linear weights and {inv.model} has none (its layers are "
                            f"{', '.join(kinds)}); the Trainer raises 'No target modules found' too")
        raise UserError(f"no nn.Linear module of {inv.model} matches optim_target_modules={targets!r} "
                        f"for {name}; try 'all-linear' or a regex like '.*(attn|mlp).*'")
    breakdown: dict[str, int] = {}
    for row in inv.rows:
        if not (row.trainable or spec.state_for_frozen):
            continue
        for key, nbytes in spec.param_state(ParamCtx(row, args, row.name in targeted)).items():
            breakdown[key] = breakdown.get(key, 0) + nbytes
    if spec.shared is not None:
        # Layer-wise: the Trainer builds one optimizer per named parameter, frozen ones included.
        copies = len(inv.rows) if spec.layerwise else 1
        for key, nbytes in spec.shared(inv, args).items():
            breakdown[key] = breakdown.get(key, 0) + nbytes * copies
    if spec.layerwise:
        breakdown[LAYERWISE_DUMMY_KEY] = LAYERWISE_DUMMY_BYTES
    projected = sum(1 for row in inv.rows if row.trainable and row.name in targeted)  # frozen ones get no update
    return breakdown, sum(breakdown.values()), projected


def _check_available(spec: OptimizerSpec) -> None:
    if spec.availability != "ok":
        raise UserError(spec.reason)


def estimate(model: Any, optim: Any = None, *, gpu: str | None = None, alloc_conf: str | None = None,
             **setup_fields: Any) -> Estimate:
    """Predict the bytes a Trainer run holds.

    ``model``: a :class:`~optimem.estimators.setup.TrainingSetup` (then ``setup_fields`` override its fields), or
    a model -- a catalog name, a config.json path (or its directory), a Hugging Face Hub id ``org/name[@rev]``,
    an :class:`Inventory`, or the user's own ``PretrainedConfig``, ``PreTrainedModel`` or PEFT model (meta or
    real: its own trainable set and dtypes count; see :mod:`optimem.estimators.user_objects`) -- with ``optim``: an
    optimizer name, or the ``transformers.TrainingArguments`` the run will use (its optim, optim_args,
    optim_target_modules, per-device batch, accumulation, bf16/fp16, gradient checkpointing, device, fsdp /
    deepspeed and world size), so ``estimate(model, args, seq_len=2048)`` answers for what is about to be
    trained. The setup's other fields go as keywords and win (``seq_len``, ``dtype``, ``optim_args``,
    ``batch_size``, ``freeze``, ``gradient_checkpointing``, ``mixed_precision``, ``grad_accum``, ``device``,
    ``attn_implementation``, ``lora`` (``"r=16,alpha=32,target=all-linear"``, a mapping or a
    ``peft.LoraConfig``: the adapter to add), ``quantize`` (``nf4``/``fp4``/``int8``: the base loaded by
    bitsandbytes), ``double_quant``, ``quant_compute_dtype``, ``quant_skip_modules``, ``prepare_kbit``...; see
    :class:`~optimem.estimators.setup.TrainingSetup` for their meaning). The
    estimator's defaults are the setup's (batch 1 x 512 tokens, fp32, no autocast, CUDA).
    ``gpu``: a ``torch.cuda.get_device_name()`` whose calibrated CUDA constants to use
    (``estimators/calibration/cuda.json``; the defaults otherwise); ``alloc_conf``: a ``PYTORCH_CUDA_ALLOC_CONF``
    string for the replayed caching allocator (default: the environment's).
    """
    inv = None
    if isinstance(model, TrainingSetup):
        setup = model.setup()
        if optim is not None:
            setup_fields["optim"] = optim
        if setup_fields:
            setup = replace(setup, **setup_fields)
    elif not isinstance(model, (str, Inventory)) or not isinstance(optim, (str, type(None))):
        setup = setup_for(model, optim, **setup_fields)
    else:
        if isinstance(model, Inventory):
            inv, model = model, model.model
        if optim is None:
            raise UserError("estimate() needs an optimizer name (optim=...), as TrainingArguments(optim=...) takes it")
        setup = TrainingSetup(model=model, optim=optim, **setup_fields)
    return estimate_setup(setup, gpu=gpu, inventory=inv, alloc_conf=alloc_conf)


def _trained_set(setup: TrainingSetup, source: ModelSource, inv: Inventory, idle: tuple = ()) -> dict[str, Any]:
    """The :class:`TraceSetting` fields that say which model is traced and what of it trains: a LoRA / QLoRA
    setup's ``peft`` fields (the traced model is then :func:`optimem.estimators.peft_model.build_training_model`'s, whose
    trainable set is the inventory's), else the ``frozen`` names of the inventory (a PEFT model object given by
    the user that is not quantized is traced with its own PEFT config, ``ModelSource.peft``)."""
    if setup.peft and not (setup.quantize is None and source.peft):
        return {"peft": trace_fields(setup)}
    # ``idle``: trainable parameters no gradient reaches -- counted as frozen, traced as trainable (autograd still
    # records their operations and keeps what the backward would need, as in the real step)
    return {"frozen": tuple(r.name for r in inv.rows if not r.trainable and r.name not in idle)}


def estimate_setup(setup: TrainingSetup, *, gpu: str | None = None, inventory: Inventory | None = None,
                   alloc_conf: str | None = None, states_only: bool = False, idle: tuple = ()) -> Estimate:
    """:func:`estimate` for a validated setup (``inventory``: the model's, when the caller has it;
    ``alloc_conf``: the ``PYTORCH_CUDA_ALLOC_CONF`` the caching allocator is replayed with, default the
    environment's). ``states_only``: weights, gradients and optimizer state only, without tracing the step
    (``activations`` and ``peak`` None): a lower bound of the peak, in milliseconds once the inventory is cached.
    ``idle``: names of trainable parameters the step gives no gradient (frozen in ``inventory``, trainable in the
    traced model)."""
    spec = get_spec(setup.optim)
    _check_available(spec)
    setup.check_trainable(inventory=inventory)
    device = setup.estimate_device
    source = setup.source
    notes = []
    if inventory is None and source.origin == "hub":
        notes.append(source.describe())
    if setup.peft:
        # The peft/bitsandbytes model itself (its dtypes are its own): the user's object when one was given,
        # else the one built from the config on the meta device.
        own = inventory if inventory is not None else source.inventory
        inv = own if own is not None else adapter_inventory(setup)
    else:
        inv = (inventory if inventory is not None else build_inventory(source, task=setup.task))
        inv = inv.with_dtype(setup.dtype).with_frozen(setup.freeze)
    setup = replace(setup, model=inv.model, device=device)
    offloaded = setup.offload_optimizer != "none" or setup.offload_param != "none"
    if setup.sharding != "none" and not offloaded:
        notes.append(f"one process, unsharded: for the per-GPU figures under {setup.sharding} on "
                     f"{setup.num_processes} process(es) see optimem.estimators.step_memory.step_memory(setup, batch) or bench plan")
    args = spec.resolve_args(parse_optim_args(setup.optim_args))
    targets = _targets_key(setup.optim_target_modules) if spec.needs_target_modules else None
    args_key = tuple(sorted(args.items(), key=str))
    breakdown, total, n_targeted = _state(inv, spec.name, args_key, targets)
    if not spec.keeps_gradients:
        # The update runs in each parameter's gradient hook, which then drops that gradient: one at a time.
        gradients = inv.largest_trainable_bytes
        notes.append("updates are fused into backward: gradients are held one at a time, never as a set")
    elif spec.layerwise:
        gradients = inv.largest_trainable_bytes
        notes.append("layer-wise: each gradient is consumed by its own optimizer as soon as it is accumulated")
    else:
        gradients = inv.trainable_bytes
    host = total if spec.state_location == "host" else \
        sum(breakdown.get(k, 0) for k in spec.host_keys) + breakdown.get(LAYERWISE_DUMMY_KEY, 0)
    if offloaded and setup.offload_optimizer != "none":
        host = total  # the optimizer state and step live on the host (or NVMe: see the offload split)
    if spec.cpu_note:
        notes.append(spec.cpu_note)
    model_bytes = {"weights": inv.weight_bytes, "weights_trainable": inv.trainable_bytes,
                   "weights_frozen": inv.weight_bytes - inv.trainable_bytes, "gradients": gradients,
                   "optimizer_state": total, "optimizer_state_host": host, "optimizer_state_device": total - host}
    if states_only:
        return Estimate(setup=setup, num_params=inv.num_params, trainable_params=inv.trainable_params,
                        bytes={**model_bytes, "activations": None, "peak": None},
                        state_breakdown=dict(sorted(breakdown.items())), optim_args=dict(args),
                        targeted_params=n_targeted, family=spec.family, notes=notes)
    setting = TraceSetting(dtype=setup.dtype, mixed=setup.mixed_precision, attn=setup.attn_implementation,
                           gc=setup.gradient_checkpointing, task=inv.task, device=device,
                           liger=(setup.liger_kernel_config or "{}") if setup.use_liger_kernel else None,
                           packed=setup.padding_free,
                           images=(setup.image_size, setup.images_per_sample) if setup.task == IMAGE_TASK else None,
                           **_trained_set(setup, source, inv, idle))
    resident = 0
    if setup.quantize:
        limit = peak_limit(setup, device)
        if limit is not None:
            notes.append(limit)
            return Estimate(
                setup=setup, num_params=inv.num_params, trainable_params=inv.trainable_params,
                bytes={**model_bytes, "activations": None, "peak": None},
                state_breakdown=dict(sorted(breakdown.items())), optim_args=dict(args), targeted_params=n_targeted,
                family=spec.family, notes=notes)
        resident = resident_bytes(setup)
    phase_model = _phase_model(inv, source, spec.name, args_key, targets, setting, setup.grad_accum, device, total, host,
                               resident)
    # padding-free packing: the micro-batch is one row of its batch x seq tokens
    b, s = (1, setup.batch_size * setup.seq_len) if setup.padding_free else (setup.batch_size, setup.seq_len)
    mem = evaluate(phase_model, b, s)
    idle = () if setup.peft or spec.state_for_frozen else phase_model.gradless(max(b, 1), max(s, 1))
    if idle:  # no gradient, so no optimizer state: estimated as the optimizer sees them, frozen
        gone = set(idle)
        inv2 = replace(inv, rows=tuple(replace(r, trainable=r.trainable and r.name not in gone) for r in inv.rows),
                       _cache={})
        est = estimate_setup(replace(setup, freeze=None), gpu=gpu, inventory=inv2, idle=tuple(idle))
        est.setup = replace(est.setup, freeze=setup.freeze)
        est.notes.insert(0, f"{len(idle)} trainable parameter(s) get no gradient in a training step (e.g. {idle[0]}): "
                            "no gradient and no optimizer state are counted for them")
        return est
    if setup.task == IMAGE_TASK and setup.image_size is None and not configured_image_size(source.load()):
        notes.append("the vision config names no image_size: each image is the smallest its patch merger takes (2 x 2 "
                     "merged patches); give --image-size for your images")
    if setup.padding_free:
        notes.append(f"padding-free packing: one row of {b * s} tokens per micro-batch (DataCollatorWithFlattening), "
                     "the model's own packed-sequence handling traced")
    notes.extend(n for n in (phase_model.step.note, *phase_model.notes(b, s)) if n)
    if setup.use_liger_kernel:
        notes.append("Liger kernels: the model patched as the Trainer patches it (_apply_liger_kernel_to_instance), "
                     "its Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) traced as rules from "
                     "liger-kernel's source, not measured (Triton does not run here)")
    off = None
    if offloaded:
        phases = mem.phases
        if setup.mixed_precision and setup.dtype != setup.mixed_precision and not setup.peft:
            # DeepSpeed's 16-bit engine and FSDP2's MixedPrecisionPolicy compute with 16-bit parameters, without
            # autocast's cached 16-bit copies: the activations are the 16-bit model's
            plain = estimate_setup(replace(setup, dtype=setup.mixed_precision, mixed_precision=None, sharding="none",
                                           num_processes=1, num_nodes=1, deepspeed=None, fsdp=None, fsdp_config=None,
                                           offload_optimizer="none", offload_param="none"), gpu=gpu)
            phases = plain.phases
        parts = offload_split(setup, inv, total, phases)
        notes.extend(parts.notes)
        off = parts.to_dict()
    est = Estimate(
        setup=setup, num_params=inv.num_params, trainable_params=inv.trainable_params,
        bytes={**model_bytes, "activations": mem.activations, "peak": mem.peak},
        state_breakdown=dict(sorted(breakdown.items())), optim_args=dict(args), targeted_params=n_targeted,
        family=spec.family, notes=notes, phases=mem.phases, peak_phase=mem.peak_phase, cuda=None,
        offload=off)
    if device == "cuda":  # est.cuda: the allocator's replay, run when first read
        alloc_config(alloc_conf)  # a malformed PYTORCH_CUDA_ALLOC_CONF is refused now, not on first read
        del est.__dict__["cuda"]
        est.__dict__["_cuda_thunk"] = functools.partial(cuda_terms, mem, phase_model, b, s, gpu, alloc_conf)
        est.__dict__["_reserve_within"] = functools.partial(reserve_within, mem, phase_model, b, s, gpu=gpu,
                                                            alloc_conf=alloc_conf)
    return est


@functools.lru_cache(maxsize=512)
def _phase_model(inv: Inventory, source: ModelSource, name: str, args_key: tuple, targets, setting: TraceSetting, grad_accum: int,
                 device: str, state_total: int, state_host: int, resident: int = 0) -> PhaseModel:
    """The phase model of one configuration (its regions of batch shapes are traced and simulated when first
    asked for; cached)."""
    spec = get_spec(name)
    args = dict(args_key)
    targeted = targeted_names(inv, targets) if spec.needs_target_modules else frozenset()
    shared = 0
    if spec.shared is not None:
        copies = len(inv.rows) if spec.layerwise else 1
        shared = sum(spec.shared(inv, args).values()) * copies
    if spec.layerwise:
        shared += LAYERWISE_DUMMY_BYTES
    if device != "cpu" and spec.state_location == "host":
        shared = 0
    step = build_step(spec, args, inv, targeted, device, shared)
    on_device = state_total - (state_host if device != "cpu" else 0)
    parts = {"optim": name, "args": repr(args_key), "targets": repr(targets), "device": device,
             "state": [state_total, state_host]}
    return PhaseModel(inv, source, setting, grad_accum, step, on_device, step.state_at_init, parts,
                      resident)
