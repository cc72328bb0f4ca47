"""Whole-step memory by tracing the real model: see :mod:`estimators.trace.run` (the entry point,
:func:`~estimators.trace.run.step_trace`), :mod:`~estimators.trace.tensor` (trace tensors and the event
recorder), :mod:`~estimators.trace.step` (the Trainer's training step), :mod:`~estimators.trace.events` (event
logs and their polynomial fit) and :mod:`~estimators.trace.replay` (replay on the simulator)."""
from . import cpu_rules

cpu_rules.install()
