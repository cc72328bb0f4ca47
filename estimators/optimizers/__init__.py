"""The optimizer registry: one :class:`OptimizerSpec` per name, families in their own modules."""
from __future__ import annotations

import difflib

from ..errors import UserError
from .spec import OptimizerSpec, ParamCtx, parse_optim_args
from . import bnb, flash, lomo, lowrank, misc, torch_builtin, torchao_low_bit

REGISTRY: dict[str, OptimizerSpec] = {}
for _mod in (torch_builtin, bnb, torchao_low_bit, lowrank, lomo, misc, flash):
    for _spec in _mod.SPECS:
        if _spec.name in REGISTRY:
            raise RuntimeError(f"optimizer {_spec.name} registered twice")
        REGISTRY[_spec.name] = _spec


def names(*, include_unavailable: bool = True) -> list[str]:
    """Every registered name (optionally only those optimem can estimate)."""
    return [n for n, s in REGISTRY.items() if include_unavailable or s.availability == "ok"]


def get_spec(name: str) -> OptimizerSpec:
    """The spec for ``name``; unknown names raise UserError with the closest known name."""
    key = str(name).strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    close = ([n for n in names(include_unavailable=False) if n.startswith(key)][:1]
             or difflib.get_close_matches(key, names(include_unavailable=False), n=1, cutoff=0.5)
             or difflib.get_close_matches(key, list(REGISTRY), n=1, cutoff=0.5))
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown optimizer '{name}': {hint}run 'bench optims' for the {len(REGISTRY)} known names")


__all__ = ["REGISTRY", "OptimizerSpec", "ParamCtx", "get_spec", "names", "parse_optim_args"]
