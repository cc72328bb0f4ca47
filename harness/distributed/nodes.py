"""Per node of a multi-process run (parent side): which ranks each node held and their host figures, measured
beside the planner's per-node host figures (bytes).

A node is a torchrun agent: its host name and its node rank in the rendezvous (``GROUP_RANK``), so two agents
simulated on one host stay two nodes. Measured per node: the sum of its ranks' peaks (the primary tracker's:
live tensors on CPU, the CUDA allocator on GPUs) and of their process RSS peaks — sums of per-rank peaks, an
upper bound of what the node held at once. Predicted per node (:func:`predicted_per_node`): under CPU / NVMe
offload the offload split's host and NVMe bytes per node (:mod:`optimem.estimators.offload`, rules from the
engines' source); CPU ranks: the planner's per-rank whole-step peak times the ranks per node (the host *is*
their device); GPU ranks without offload: the optimizer state an optimizer keeps in host memory (e.g. a paged
or CPU-stepping one), times the ranks per node, else no host figure (their model states are on the GPUs).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def predicted_per_node(cfg, device: str, per_rank: Mapping[str, Any], predicted: Mapping[str, Any] | None) -> dict:
    """The planner's host (and NVMe) bytes for one node of ``cfg`` on ``device``; ``per_rank``: the per-rank
    prediction (:func:`optimem.harness.distributed.report.predict_per_rank`); ``predicted``: the record's
    ``estimate().to_dict()`` (its ``offload`` split, when offloaded)."""
    k = int(cfg.num_processes) // max(int(getattr(cfg, "num_nodes", 1) or 1), 1)
    off = (predicted or {}).get("offload")
    if off:
        return {"ranks_per_node": k, "host_bytes": int(off["host_per_node"]), "nvme_bytes": int(off["nvme_per_node"]),
                "pinned_bytes": int(off.get("pinned_per_rank") or 0) * k,
                "source": f"{off.get('scheme')}: model states and offload buffers on the host, per rank x {k} ranks "
                          "(estimators/offload.py; rules from the engines' source)"}
    if device == "cpu" and per_rank.get("supported") and per_rank.get("peak_bytes") is not None:
        return {"ranks_per_node": k, "host_bytes": int(per_rank["peak_bytes"]) * k, "nvme_bytes": 0,
                "source": f"CPU ranks: the planner's per-rank whole-step peak x {k} ranks per node"}
    if per_rank.get("host_state_bytes"):
        return {"ranks_per_node": k, "host_bytes": int(per_rank["host_state_bytes"]) * k, "nvme_bytes": 0,
                "source": f"the optimizer state its optimizer keeps in host memory, per rank x {k} ranks (the "
                          "processes' own RSS is not predicted)"}
    return {"ranks_per_node": k, "host_bytes": None, "nvme_bytes": 0,
            "source": "model states on the GPUs: no host figure predicted (the processes' own RSS is not)"}


def node_of(entry: Mapping[str, Any]) -> tuple[str, int | None]:
    """``(host name, node rank)`` of a rank's entry (the node rank is None when torchrun did not say)."""
    facts = entry.get("node_facts") or {}
    return str(entry.get("node") or facts.get("hostname") or "?"), facts.get("node_rank")


def measured_nodes(ranks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per node the ranks ran on (in node-rank order): its host name, node rank, Slurm node id, the
    ranks it held, and the sums of their peaks and RSS peaks (bytes; None when a rank measured nothing)."""
    by: dict[tuple[str, int | None], list[Mapping[str, Any]]] = {}
    for e in ranks:
        by.setdefault(node_of(e), []).append(e)
    out = []
    for (host, node_rank), es in sorted(by.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, kv[0][0])):
        ms = [e.get("measured") or {} for e in es]
        peaks = [m.get("peak_bytes") for m in ms]
        rss = [(m.get("peaks") or {}).get("rss_peak_bytes") for m in ms]
        facts = es[0].get("node_facts") or {}
        out.append({"node": host, "node_rank": node_rank, "slurm_node_id": facts.get("slurm_node_id"),
                    "slurm_job_id": facts.get("slurm_job_id"), "ranks": [e.get("rank") for e in es],
                    "peak_bytes_sum": sum(peaks) if peaks and None not in peaks else None,
                    "rss_peak_bytes_sum": sum(rss) if rss and None not in rss else None})
    return out


def node_section(cfg, device: str, ranks: Sequence[Mapping[str, Any]], per_rank: Mapping[str, Any],
                 predicted: Mapping[str, Any] | None) -> dict[str, Any]:
    """The record's ``distributed.nodes``: how many nodes were asked for, the planner's per-node figures and
    what each node measured."""
    return {"requested": int(getattr(cfg, "num_nodes", 1) or 1),
            "predicted": predicted_per_node(cfg, device, per_rank, predicted),
            "measured": measured_nodes(ranks)}


__all__ = ["measured_nodes", "node_of", "node_section", "predicted_per_node"]
