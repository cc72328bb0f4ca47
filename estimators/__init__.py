"""optimem estimators: GPU-free predictions of training memory per optimizer.

>>> from optimem.estimators import estimate
>>> estimate("gpt2", "adamw_bnb_8bit", dtype="bf16").bytes["optimizer_state"]  # doctest: +SKIP
"""
from .catalog import DEFAULT_MODEL, catalog, resolve
from .errors import UserError
from .estimate import Estimate, estimate
from .inventory import build_inventory
from .optimizers import REGISTRY, OptimizerSpec, get_spec, names
from .params import Inventory, ParamRow

__all__ = ["DEFAULT_MODEL", "Estimate", "Inventory", "OptimizerSpec", "ParamRow", "REGISTRY", "UserError",
           "build_inventory", "catalog", "estimate", "get_spec", "names", "resolve"]
