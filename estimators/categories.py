"""The memory categories every estimate, measurement, record and figure splits bytes into.

:class:`Category` values are the JSON keys of records (str-valued: ``json.dumps`` writes the plain key).
The groupings below name which categories each producer reports, in its order; :data:`LABELS` is how
they are printed. All figures are bytes.
"""
from __future__ import annotations

from enum import StrEnum


class Category(StrEnum):
    WEIGHTS = "weights"  # parameters and buffers
    PARAMETERS = "parameters"
    BUFFERS = "buffers"
    GRADIENTS = "gradients"  # ``param.grad`` storages
    OPTIMIZER_STATE = "optimizer_state"  # storages reachable from the optimizer, not parameters or gradients
    ACTIVATIONS = "activations"  # born in a forward phase and alive at its end (saved for backward, logits, batch)
    TEMPORARIES = "temporaries"  # born and freed within one phase
    OTHER = "other"  # anything else alive at the peak
    SHARDING_OVERHEAD = "sharding_overhead"  # the planner's per-rank communication buffers and gathered copies


C = Category

SIM_CODES: dict[str, Category] = {"weights": C.WEIGHTS, "state": C.OPTIMIZER_STATE, "grad": C.GRADIENTS,
                                  "act": C.ACTIVATIONS, "tmp": C.TEMPORARIES, "other": C.OTHER}
"""The simulator's storage categories (``estimators/memsim``), in the order its arrays (and the phase
cache on disk) hold them, and the category each one reports as."""

TRACKED: tuple[Category, ...] = (C.PARAMETERS, C.BUFFERS, C.GRADIENTS, C.OPTIMIZER_STATE, C.ACTIVATIONS,
                                 C.TEMPORARIES, C.OTHER)
"""The tensor accountant's categories (``harness/trackers/tensor_accounting``), in report order."""

BREAKDOWN: tuple[Category, ...] = (C.WEIGHTS, C.GRADIENTS, C.OPTIMIZER_STATE, C.ACTIVATIONS, C.OTHER)
"""What results and plots stack: weights = parameters + buffers, other = temporaries + other (+ sharding
overhead)."""

PER_GPU: tuple[Category, ...] = (C.WEIGHTS, C.GRADIENTS, C.OPTIMIZER_STATE, C.ACTIVATIONS, C.TEMPORARIES, C.OTHER,
                                 C.SHARDING_OVERHEAD)
"""The planner's per-GPU peak parts (``estimators/step_memory``): weights include ZeRO's fp32 master partition,
gradients its fp32 gradient copy, sharding overhead the gathered unit and DDP's buckets."""

LABELS: dict[Category, str] = {c: c.value.replace("_", " ") for c in Category}


def to_breakdown(parts: dict) -> dict[Category, int]:
    """Fold any producer's ``{category: bytes}`` into :data:`BREAKDOWN` (missing categories count 0)."""
    get = lambda *cs: sum(parts.get(c, 0) for c in cs)  # noqa: E731
    return {C.WEIGHTS: get(C.WEIGHTS, C.PARAMETERS, C.BUFFERS), C.GRADIENTS: get(C.GRADIENTS),
            C.OPTIMIZER_STATE: get(C.OPTIMIZER_STATE), C.ACTIVATIONS: get(C.ACTIVATIONS),
            C.OTHER: get(C.TEMPORARIES, C.OTHER, C.SHARDING_OVERHEAD)}


__all__ = ["BREAKDOWN", "Category", "LABELS", "PER_GPU", "SIM_CODES", "TRACKED", "to_breakdown"]
