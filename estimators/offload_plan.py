"""The offload ``bench plan`` offers when nothing fits without it: the least CPU offload under which a setup's
micro-batch fits a GPU, and the host RAM it then needs.

Tried in order, on DeepSpeed ZeRO-3 across the ranks of one node (DeepSpeed's defaults; the optimizer state stepped
on the host): the optimizer state on the host (``offload_optimizer: cpu``), then the parameters too
(``offload_param: cpu``). Per-rank figures are :func:`optimem.estimators.offload.split`'s rules from DeepSpeed's
source (bytes), not measured; the CUDA context and allocator terms are the budget's business.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from .estimate import estimate_setup
from .setup import TrainingSetup
from .sharding import sharding_support

STEPS = (("cpu", "none"), ("cpu", "cpu"))
"""(offload_optimizer, offload_param), least offload first."""


@dataclass(frozen=True)
class OffloadOffer:
    """An offload that fits: ``scheme`` (what to put in the DeepSpeed config), ``num_gpus`` on one node,
    ``device_peak`` (bytes per GPU), ``host_per_node`` (bytes), ``offload_optimizer`` / ``offload_param``."""

    scheme: str
    num_gpus: int
    device_peak: int
    host_per_node: int
    offload_optimizer: str
    offload_param: str

    def config_hint(self) -> str:
        """The zero_optimization lines of a DeepSpeed config that asks for this offload."""
        parts = ['"stage": 3', f'"offload_optimizer": {{"device": "{self.offload_optimizer}"}}']
        if self.offload_param != "none":
            parts.append(f'"offload_param": {{"device": "{self.offload_param}"}}')
        return '"zero_optimization": {' + ", ".join(parts) + '}, "optimizer": {"type": "AdamW"}'


def offload_offer(setup: TrainingSetup, budget: int, gpus_per_node: int = 8) -> OffloadOffer | None:
    """The least offload (see the module doc) under which ``setup`` (its micro-batch, its sequence) fits ``budget``
    bytes per GPU on ``max(setup.num_processes, gpus_per_node)`` GPUs of one node; None when even full offload
    does not (the activations alone exceed the budget)."""
    n = max(setup.num_processes, gpus_per_node)
    for opt, par in STEPS:
        s = replace(setup, sharding="zero3", num_processes=n, num_nodes=1, deepspeed=None, fsdp=None,
                    fsdp_config=None, offload_optimizer=opt, offload_param=par)
        est = estimate_setup(s)
        o = est.offload
        if o and o["device_peak"] is not None and o["device_peak"] <= budget:
            return OffloadOffer(o["scheme"], n, int(o["device_peak"]), int(o["host_per_node"]), opt, par)
    return None


def offload_offers(plan, for_optim: Callable[[str], TrainingSetup]) -> dict[str, dict]:
    """For each optimizer of ``plan`` (a :class:`optimem.estimators.planner.Plan`) that fits no listed GPU and runs
    under ZeRO-3: the :func:`offload_offer` on the largest listed GPU at micro-batch 1 (with checkpointing unless
    the plan turns it off), as a plain dict with ``gpu``, ``gradient_checkpointing`` and a ``deepspeed`` snippet."""
    out: dict[str, dict] = {}
    biggest = max(plan.gpus, key=lambda g: g.budget(plan.headroom))
    for o in plan.optims:
        if any(r.optim == o and r.status == "fits" for r in plan.rows) or not sharding_support(o, "zero3", 8)[0]:
            continue
        setup = replace(for_optim(o), batch_size=1, gradient_checkpointing=plan.checkpointing != "off")
        offer = offload_offer(setup, biggest.budget(plan.headroom))
        if offer is not None:
            out[o] = {**asdict(offer), "gpu": biggest.id, "gradient_checkpointing": setup.gradient_checkpointing,
                      "deepspeed": "{" + offer.config_hint() + "}"}
    return out


__all__ = ["OffloadOffer", "STEPS", "offload_offer", "offload_offers"]
