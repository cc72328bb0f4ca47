"""Whole-step memory by tracing the real model (see the README's "How the estimate works").

:mod:`~estimators.trace.run` is the entry point (:func:`~estimators.trace.run.step_trace`: trace a setting's
region of shapes, fit, cache); :mod:`~estimators.trace.model` builds the model as the harness does;
:mod:`~estimators.trace.step` runs the Trainer's training step; :mod:`~estimators.trace.tensor` holds the trace
tensors, their dispatch and the storage recorder; :mod:`~estimators.trace.meta_kernels` picks torch's C++ meta
kernels; :mod:`~estimators.trace.cpu_rules` / :mod:`~estimators.trace.cuda_rules` are the per-op rules where a
meta kernel is not what the CPU (or CUDA) kernel allocates; :mod:`~estimators.trace.events` holds event logs
and their polynomial fit; :mod:`~estimators.trace.replay` replays a log on the simulator;
:mod:`~estimators.trace.setting` is the setting a trace is keyed by; :mod:`~estimators.trace.data` holds a fitted
trace as data and its on-disk cache. Only ``run`` and what it imports need
torch (the rules install when it is imported).
"""
