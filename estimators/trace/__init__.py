"""Whole-step memory by tracing the real model (see the README's "How the estimate works").

:mod:`~optimem.estimators.trace.run` is the entry point (:func:`~optimem.estimators.trace.run.step_trace`: trace a setting's
region of shapes, fit, cache); :mod:`~optimem.estimators.trace.model` builds the model as the harness does;
:mod:`~optimem.estimators.trace.step` runs the Trainer's training step; :mod:`~optimem.estimators.trace.tensor` holds the trace
tensors, their dispatch and the storage recorder; :mod:`~optimem.estimators.trace.meta_kernels` picks torch's C++ meta
kernels; :mod:`~optimem.estimators.trace.cpu_rules` / :mod:`~optimem.estimators.trace.cuda_rules` are the per-op rules where a
meta kernel is not what the CPU (or CUDA) kernel allocates; :mod:`~optimem.estimators.trace.events` holds event logs
and their polynomial fit; :mod:`~optimem.estimators.trace.replay` replays a log on the simulator;
:mod:`~optimem.estimators.trace.setting` is the setting a trace is keyed by; :mod:`~optimem.estimators.trace.data` holds a fitted
trace as data and its on-disk cache. Only ``run`` and what it imports need
torch (the rules install when it is imported).
"""
