"""Multi-process runs: the Trainer's own data-parallel integrations (``ddp``, ``fsdp``, ``zero1/2/3``) on N ranks
started by torchrun, each a ``python -m optimem.harness.worker`` measuring itself with the same trackers.

The parts, by the side of the run they live on:

* :mod:`.schemes` (both sides): what each scheme hands the Trainer (``TrainingArguments`` keywords, the DeepSpeed
  and FSDP2 configs).
* :mod:`.rank` (child side, inside a rank): CPU ranks opened to accelerate's FSDP/DeepSpeed paths, and
  :class:`~.rank.RankView`, what the engine made of parameters, gradients and optimizer state (bytes).
* :mod:`.launch` (parent side): one torchrun per run with the per-run timeout, and one outcome from every
  rank's result (:func:`~.launch.combine`).
* :mod:`.nodes` (parent side): per node (torchrun agent), its ranks' host figures beside the planner's per-node
  host bytes (several nodes: :mod:`optimem.harness.multinode` starts them through srun, with :func:`.launch.launch`).
* :mod:`.report` (parent side): the record's ``distributed`` section (every rank beside the planner's per-rank
  prediction) and the per-rank table: ``python -m optimem.harness.distributed RESULTS.jsonl [--markdown OUT.md]``.
"""
