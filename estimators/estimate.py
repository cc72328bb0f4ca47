"""``estimate()``: predicted bytes for one model x optimizer x dtype, from the parameter inventory."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UserError
from .inventory import Inventory, build_inventory, normalize_dtype
from .optimizers import OptimizerSpec, ParamCtx, get_spec, parse_optim_args
from .optimizers.spec import LAYERWISE_DUMMY_BYTES


@dataclass
class Estimate:
    """A prediction. Every figure in ``bytes`` is in bytes.

    ``bytes`` keys: ``weights`` (parameters as stored), ``gradients`` (gradient bytes held at once),
    ``optimizer_state`` (all optimizer-state bytes wherever they live), ``optimizer_state_host`` (the part
    kept in host memory when training on an accelerator) and ``optimizer_state_device`` (the rest).
    ``state_breakdown``: optimizer-state bytes summed per state tensor name (``exp_avg``, ``absmax1``...).
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


def estimate(model: str | Inventory, optim: str, *, dtype: str = "fp32", optim_args: str | Mapping | None = None,
             optim_target_modules: str | Sequence[str] | None = None, batch_size: int = 1, seq_len: int = 512,
             freeze: str | None = None) -> Estimate:
    """Predict the bytes a Trainer run of ``model`` with ``TrainingArguments(optim=optim)`` holds.

    ``model``: a catalog name, a config.json path (or its directory), or an :class:`Inventory`.
    ``dtype``: the dtype parameters are stored in (``fp32``, ``bf16``, ``fp16``).
    ``optim_args``: the Trainer's ``optim_args`` string ("k=v,k=v") or a mapping of the same.
    ``optim_target_modules``: as ``TrainingArguments.optim_target_modules`` (GaLore / APOLLO).
    ``freeze``: regex of parameter names to freeze (not trainable).
    """
    spec = get_spec(optim)
    _check_available(spec)
    dtype = normalize_dtype(dtype)
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"batch_size and seq_len must be positive integers, got {batch_size!r} and {seq_len!r}")
    inv = (model if isinstance(model, Inventory) else build_inventory(model)).with_dtype(dtype).with_frozen(freeze)
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
        gradients = 0
        notes.append("updates are fused into backward: no gradient set is stored")
    elif spec.layerwise:
        gradients = inv.largest_trainable_bytes
        notes.append("layer-wise: each gradient is consumed by its own optimizer as soon as it is accumulated")
    else:
        gradients = trainable_bytes
    host = total if spec.state_location == "host" else \
        sum(breakdown.get(k, 0) for k in spec.host_keys) + breakdown.get(LAYERWISE_DUMMY_KEY, 0)
    if spec.cpu_note:
        notes.append(spec.cpu_note)
    return Estimate(
        model=inv.model, optim=spec.name, dtype=dtype, num_params=inv.num_params,
        trainable_params=inv.trainable_params,
        bytes={"weights": inv.weight_bytes, "gradients": gradients,
               "optimizer_state": total, "optimizer_state_host": host, "optimizer_state_device": total - host},
        state_breakdown=dict(sorted(breakdown.items())), optim_args={k: v for k, v in args.items()},
        optim_target_modules=list(optim_target_modules) if isinstance(optim_target_modules, (list, tuple))
        else optim_target_modules,
        targeted_params=n_targeted, batch_size=batch_size, seq_len=seq_len, family=spec.family, notes=notes)
