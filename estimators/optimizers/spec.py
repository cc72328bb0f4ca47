"""The optimizer spec: one place that knows everything optimem needs about one ``optim=`` name.

State functions take one inventory row plus the resolved arguments and return the optimizer-state
tensors that parameter gets, as ``{tensor name: bytes}``. Bytes are storage bytes as the real optimizer
allocates them (a view counts the whole storage it keeps alive); 0-dim tensors count their element.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..params import Inventory, ParamRow

FP32 = 4
LAYERWISE_DUMMY_BYTES = FP32
"""Layer-wise variants: the Trainer's ``LayerWiseDummyOptimizer`` holds one 1x1 fp32 CPU tensor."""


@dataclass(frozen=True)
class ParamCtx:
    """What a state function may look at for one parameter.

    ``args``: the optimizer's resolved hyper-parameters (Trainer defaults overridden by ``optim_args``).
    ``targeted``: for low-rank optimizers, whether the parameter is projected (matched
    ``optim_target_modules`` and is an ``nn.Linear`` weight).
    """

    row: ParamRow
    args: Mapping[str, Any]
    targeted: bool = False

    @property
    def n(self) -> int:
        return self.row.numel

    @property
    def s(self) -> int:
        return self.row.element_size


StateFn = Callable[[ParamCtx], dict[str, int]]
SharedFn = Callable[[Inventory, Mapping[str, Any]], dict[str, int]]


def parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything known about one optimizer name.

    availability: ``ok`` (a real optimizer optimem estimates), ``unsupported`` (the name exists but cannot
    run here: needs hardware or a package that cannot be had), ``removed`` (no longer a Trainer name).
    state_location: where the state tensors live during training: ``device`` (beside the parameters) or
    ``host`` (CPU memory, whatever device trains). ``host_keys``: state tensors kept in CPU memory even when
    the rest is on the device (torch's non-fused ``step`` counters, FlashOptim's ``step``).
    state_container: where the real optimizer keeps them: ``state`` (``optimizer.state``),
    ``param_groups``, ``attributes`` (optimizer attributes), ``optimizer_dict`` (layer-wise: one optimizer
    per parameter behind the Trainer's dummy).
    """

    name: str
    family: str
    cls: str
    package: str | None = None
    pip: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    arg_types: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    state: StateFn | None = None
    shared: SharedFn | None = None
    runs_on_cpu: bool = True
    cpu_note: str = ""
    availability: str = "ok"
    reason: str = ""
    state_location: str = "device"
    host_keys: frozenset[str] = frozenset()
    state_container: str = "state"
    needs_target_modules: bool = False
    layerwise: bool = False
    keeps_gradients: bool = True
    state_for_frozen: bool = False
    trainer_name: bool = True
    description: str = ""

    @property
    def import_name(self) -> str:
        return self.cls.split(".", 1)[0]

    def installed(self) -> bool:
        """Whether the package holding the optimizer class can be imported here."""
        return importlib.util.find_spec(self.import_name) is not None

    def install_line(self) -> str:
        return f"pip install {self.pip or self.package}" if (self.pip or self.package) else ""

    def resolve_args(self, optim_args: Mapping[str, str] | None) -> dict[str, Any]:
        """Trainer defaults overridden by ``optim_args``; unknown keys and bad values raise UserError."""
        args = dict(self.defaults)
        for key, raw in (optim_args or {}).items():
            conv = self.arg_types.get(key)
            if conv is None:
                known = ", ".join(sorted(self.arg_types)) or "none"
                raise UserError(f"optim_args key '{key}' is not read by {self.name} (it reads: {known})")
            try:
                args[key] = conv(raw)
            except (TypeError, ValueError):
                raise UserError(f"optim_args {key}={raw!r} is not valid for {self.name}: expected "
                                f"{getattr(conv, '__name__', 'a value')}") from None
        return args

    def param_state(self, ctx: ParamCtx) -> dict[str, int]:
        return self.state(ctx) if self.state is not None else {}


def blocks(n: int, block: int) -> int:
    """Number of ``block``-element blocks covering ``n`` elements."""
    return math.ceil(n / block)


def parse_optim_args(text: str | None) -> dict[str, str]:
    """Parse the Trainer's ``optim_args`` string "k=v,k=v" (spaces ignored) exactly as the Trainer does."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for pair in text.replace(" ", "").split(","):
        if not pair:
            continue
        parts = pair.split("=")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UserError(f"malformed optim_args {text!r}: expected comma-separated key=value pairs, "
                            "e.g. 'rank=16,update_proj_gap=200'")
        out[parts[0]] = parts[1]
    return out
