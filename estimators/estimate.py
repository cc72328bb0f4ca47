"""``estimate()``: predicted bytes for one model x optimizer x dtype, from the parameter inventory."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UserError
from .inventory import Inventory, build_inventory, check_task, normalize_dtype
from .peak import ATTN_IMPLEMENTATIONS, PhaseModel, evaluate
from .optimizers import OptimizerSpec, ParamCtx, get_spec, parse_optim_args
from .optimizers.spec import LAYERWISE_DUMMY_BYTES
from .trace.run import TraceSetting


@dataclass
class Estimate:
    """A prediction. Every figure in ``bytes`` is in bytes.

    ``bytes`` keys: ``weights`` (parameters as stored), ``gradients`` (gradient bytes held at once),
    ``optimizer_state`` (all optimizer-state bytes wherever they live), ``optimizer_state_host`` (the part
    kept in host memory when training on an accelerator) and ``optimizer_state_device`` (the rest),
    ``activations`` (bytes alive at the end of the forward that the forward created: saved activations,
    logits and loss buffers, the batch) and ``peak`` (the whole step's peak of live tensor bytes on the
    training device: the largest phase).
    ``state_breakdown``: optimizer-state bytes summed per state tensor name (``exp_avg``, ``absmax1``...).
    ``phases``: per phase (``step0.forward`` ... ``steady.optimizer_step``), its ``peak`` and the bytes at
    that peak split into ``weights``, ``gradients``, ``optimizer_state``, ``activations``, ``temporaries``
    and ``other``. ``peak_phase``: the phase holding ``bytes["peak"]``.
    ``cuda``: on a CUDA device, the terms the tensor peak does not contain (allocation rounding, cuBLAS
    workspaces, the CUDA context, the caching allocator's reserved-but-unallocated bytes; see
    ``estimators/cuda_overhead.py``) and ``peak_reserved`` / ``peak_device``; ``None`` for the CPU.
    """

    model: str
    optim: str
    dtype: str
    num_params: int
    trainable_params: int
    bytes: dict[str, int]
    state_breakdown: dict[str, int]
    optim_args: dict[str, Any]
    optim_target_modules: list[str] | str | None
    targeted_params: int
    batch_size: int
    seq_len: int
    family: str
    notes: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None
    grad_accum: int = 1
    device: str = "cuda"
    attn_implementation: str = "sdpa"
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_phase: str = ""
    cuda: dict[str, Any] | None = None

    @property
    def state_bytes_per_param(self) -> float:
        """Optimizer-state bytes per trainable parameter."""
        return self.bytes["optimizer_state"] / max(self.trainable_params, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_bytes_per_param"] = self.state_bytes_per_param
        return json.loads(json.dumps(d, default=str))


def _targets_key(target_modules) -> tuple[str, ...] | str | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        return target_modules
    return tuple(target_modules)


LAYERWISE_DUMMY_KEY = "layerwise_dummy"


def _matches(target_modules, module_name: str) -> bool:
    from transformers.trainer_utils import check_target_module_exists

    if isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear":
        return True
    tm = list(target_modules) if isinstance(target_modules, tuple) else target_modules
    return bool(check_target_module_exists(tm, module_name))


def matched_linear_modules(inv: Inventory, target_modules) -> list[str]:
    """``nn.Linear`` module names the Trainer's target search finds (before it deduplicates parameters)."""
    return [m for m in inv.linear_modules if _matches(target_modules, m)]


def targeted_names(inv: Inventory, target_modules) -> frozenset[str]:
    """Names of the parameters GaLore/APOLLO project, exactly as the Trainer selects them:
    ``nn.Linear`` modules whose name matches ``optim_target_modules`` (a regex string, a list of names or
    regexes, or ``all-linear``), their ``.weight``, deduplicated like ``named_parameters()``."""
    out = set()
    for row in inv.rows:
        if not (row.is_linear_module and row.name == f"{row.module_name}.weight" and len(row.shape) == 2):
            continue
        if _matches(target_modules, row.module_name):
            out.add(row.name)
    return frozenset(out)


@functools.lru_cache(maxsize=4096)
def _state(inv: Inventory, name: str, args_items: tuple, targets) -> tuple[dict[str, int], int, int]:
    """(state bytes per tensor name, total state bytes, number of targeted params)."""
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
    return breakdown, sum(breakdown.values()), len(targeted)


def _check_available(spec: OptimizerSpec) -> None:
    if spec.availability != "ok":
        raise UserError(spec.reason)


DEVICES = ("cuda", "cpu")


def estimate(model: str | Inventory, optim: str, *, dtype: str = "fp32", optim_args: str | Mapping | None = None,
             optim_target_modules: str | Sequence[str] | None = None, batch_size: int = 1, seq_len: int = 512,
             freeze: str | None = None, gradient_checkpointing: bool = False, mixed_precision: str | None = None,
             grad_accum: int = 1, device: str = "cuda", attn_implementation: str = "sdpa",
             gpu: str | None = None, task: str | None = None) -> Estimate:
    """Predict the bytes a Trainer run of ``model`` with ``TrainingArguments(optim=optim)`` holds.

    ``model``: a catalog name, a config.json path (or its directory), or an :class:`Inventory`.
    ``dtype``: the dtype parameters are stored in (``fp32``, ``bf16``, ``fp16``).
    ``optim_args``: the Trainer's ``optim_args`` string ("k=v,k=v") or a mapping of the same.
    ``optim_target_modules``: as ``TrainingArguments.optim_target_modules`` (GaLore / APOLLO).
    ``freeze``: regex of parameter names to freeze (not trainable).
    ``batch_size`` / ``seq_len``: per-device batch and tokens per sample; ``grad_accum``: gradient
    accumulation steps; ``gradient_checkpointing``: the Trainer's (non-reentrant) checkpointing of every
    layer; ``mixed_precision``: ``None``, ``"bf16"`` or ``"fp16"`` (``TrainingArguments(bf16=True)``:
    autocast, parameters stay in ``dtype``); ``device``: ``"cuda"`` (torch's foreach optimizer paths, CUDA
    overhead terms) or ``"cpu"`` (single-tensor paths); ``attn_implementation``: ``"sdpa"`` (the
    default the Trainer gets) or ``"eager"``; ``gpu``: a ``torch.cuda.get_device_name()`` whose calibrated
    CUDA constants to use (``estimators/calibration/cuda.json``; the defaults otherwise); ``task``: the head
    the model is trained with (``causal-lm``, ``masked-lm``, ``sequence-classification``, ``seq2seq-lm``;
    default: the config's architecture).
    """
    spec = get_spec(optim)
    _check_available(spec)
    dtype = normalize_dtype(dtype)
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"batch_size and seq_len must be positive integers, got {batch_size!r} and {seq_len!r}")
    if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
        raise UserError(f"grad_accum must be a positive integer, got {grad_accum!r}")
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if mixed_precision is not None:
        mixed_precision = normalize_dtype(mixed_precision)
        if mixed_precision == "fp32":
            mixed_precision = None
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                        f"got {attn_implementation!r}")
    if spec.layerwise and grad_accum != 1:
        raise UserError(f"{spec.name} does not support gradient accumulation (the Trainer raises 'Layerwise "
                        "... does not support gradient accumulation!')")
    task = check_task(task)
    inv = (model if isinstance(model, Inventory) else build_inventory(model, task=task)).with_dtype(dtype) \
        .with_frozen(freeze)
    raw_args = parse_optim_args(optim_args) if isinstance(optim_args, (str, type(None))) else \
        {str(k): str(v) for k, v in optim_args.items()}
    args = spec.resolve_args(raw_args)
    if spec.needs_target_modules and not optim_target_modules:
        raise UserError(f"{spec.name} needs optim_target_modules (e.g. 'all-linear' or a regex such as "
                        "'.*(attn|mlp).*'), as TrainingArguments does")
    targets = _targets_key(optim_target_modules) if spec.needs_target_modules else None
    breakdown, total, n_targeted = _state(inv, spec.name, tuple(sorted(args.items(), key=str)), targets)
    trainable_bytes = inv.trainable_bytes
    notes = []
    if not spec.keeps_gradients:
        # The update runs in each parameter's gradient hook, which then drops that gradient: one at a time.
        gradients = inv.largest_trainable_bytes
        notes.append("updates are fused into backward: gradients are held one at a time, never as a set")
    elif spec.layerwise:
        gradients = inv.largest_trainable_bytes
        notes.append("layer-wise: each gradient is consumed by its own optimizer as soon as it is accumulated")
    else:
        gradients = trainable_bytes
    host = total if spec.state_location == "host" else \
        sum(breakdown.get(k, 0) for k in spec.host_keys) + breakdown.get(LAYERWISE_DUMMY_KEY, 0)
    if spec.cpu_note:
        notes.append(spec.cpu_note)
    args_key = tuple(sorted(args.items(), key=str))
    setting = TraceSetting(dtype=dtype, mixed=mixed_precision, attn=attn_implementation,
                           gc=bool(gradient_checkpointing), task=inv.task,
                           frozen=tuple(r.name for r in inv.rows if not r.trainable), device=device)
    phase_model = _phase_model(inv, spec.name, args_key, targets, setting, grad_accum, device, total, host)
    mem = evaluate(phase_model, batch_size, seq_len)
    notes.extend(n for n in (phase_model.step.note, *phase_model.notes()) if n)
    cuda = None
    if device == "cuda":
        from .cuda_overhead import cuda_terms

        cuda = cuda_terms(mem, inv, _state_sizes(inv, spec.name, args_key, targets), gpu)
    return Estimate(
        model=inv.model, optim=spec.name, dtype=dtype, num_params=inv.num_params,
        trainable_params=inv.trainable_params,
        bytes={"weights": inv.weight_bytes, "gradients": gradients,
               "optimizer_state": total, "optimizer_state_host": host, "optimizer_state_device": total - host,
               "activations": mem.activations, "peak": mem.peak},
        state_breakdown=dict(sorted(breakdown.items())), optim_args={k: v for k, v in args.items()},
        optim_target_modules=list(optim_target_modules) if isinstance(optim_target_modules, (list, tuple))
        else optim_target_modules,
        targeted_params=n_targeted, batch_size=batch_size, seq_len=seq_len, family=spec.family, notes=notes,
        gradient_checkpointing=bool(gradient_checkpointing), mixed_precision=mixed_precision, grad_accum=grad_accum,
        device=device, attn_implementation=attn_implementation, phases=mem.phases, peak_phase=mem.peak_phase,
        cuda=cuda)


@functools.lru_cache(maxsize=512)
def _state_sizes(inv: Inventory, name: str, args_key: tuple, targets) -> tuple:
    """Every optimizer-state tensor's bytes (for the CUDA allocator's rounding)."""
    spec = get_spec(name)
    args = dict(args_key)
    targeted = targeted_names(inv, targets) if spec.needs_target_modules else frozenset()
    out = []
    for row in inv.rows:
        if row.trainable or spec.state_for_frozen:
            out.extend(spec.param_state(ParamCtx(row, args, row.name in targeted)).values())
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _phase_model(inv: Inventory, name: str, args_key: tuple, targets, setting: TraceSetting, grad_accum: int,
                 device: str, state_total: int, state_host: int) -> PhaseModel:
    """The phase model of one configuration (its regions of batch shapes are simulated when first asked
    for; cached)."""
    from . import steps

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
    step = steps.build(spec, args, inv, targeted, device, shared)
    on_device = state_total - (state_host if device != "cpu" else 0)
    from .catalog import resolve

    return PhaseModel(inv, resolve(inv.model), setting, grad_accum, step, on_device, step.state_at_init)


def estimate_for_run(config: Mapping[str, Any], device: str | None = None) -> Estimate:
    """The estimate for one harness run configuration (``harness.scenario.RunConfig.to_dict()``): every field
    that shapes memory is passed on (dtype, mixed precision, batch, sequence, accumulation, checkpointing,
    optimizer arguments and targets). ``device``: the device the run resolved to (``cuda`` or ``cpu``; a
    config's ``auto`` counts as ``cuda`` when not given). Pure: nothing is run."""
    spec = get_spec(config["optim"])
    dev = device or config.get("device") or "cuda"
    targets = config.get("optim_target_modules") if spec.needs_target_modules else None
    extra = config.get("extra") or {}
    return estimate(config.get("model") or "tiny-llama", spec.name, dtype=config.get("dtype", "fp32"),
                    optim_args=config.get("optim_args"), optim_target_modules=targets,
                    batch_size=int(config.get("batch_size", 1)), seq_len=int(config.get("seq_len", 512)),
                    gradient_checkpointing=bool(config.get("gradient_checkpointing", False)),
                    mixed_precision=config.get("mixed_precision"), grad_accum=int(config.get("grad_accum", 1)),
                    device="cuda" if dev == "auto" else dev,
                    attn_implementation=extra.get("attn_implementation", "sdpa"), task=extra.get("task"))
