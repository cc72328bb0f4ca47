"""Plots of a ``bench plan``: the largest micro-batch per optimizer per GPU (a heatmap) and the per-GPU peak
against the number of GPUs for each sharding scheme. matplotlib with the Agg backend (no display needed)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from optimem.estimators import planner as P
from optimem.estimators.step_memory import MAX_BATCH, step_memory
from optimem.estimators.setup import TrainingSetup

from optimem.estimators.gpus import GIB
import numpy as np
COUNTS = (1, 2, 4, 8, 16, 32, 64)
STYLE = {"ddp": ("tab:gray", "o"), "zero1": ("tab:blue", "s"), "zero2": ("tab:green", "^"),
         "zero3": ("tab:red", "v"), "fsdp": ("tab:purple", "D")}


def cell_text(r: P.PlanRow) -> str:
    """'4' (no checkpointing), '9c' (only with it), '1/11c' (1 without, 11 with), '-' (not even 1), 'n/a'."""
    if r.status == "unsupported":
        return "n/a"
    if r.status != "fits":
        return "-"
    by = r.max_micro_batch_by_checkpointing
    if not r.gradient_checkpointing and by.get("on", 0) > r.max_micro_batch:
        return f"{r.max_micro_batch}/{by['on']}{'+' if by['on'] >= MAX_BATCH else ''}c"
    return f"{r.max_micro_batch}{'+' if r.at_cap else ''}{'c' if r.gradient_checkpointing else ''}"


def _curves_optims(plan) -> list[str]:
    """The optimizers the memory-vs-GPUs panels show: the first two planned."""
    return list(plan.optims[:2])


def memory_curves(plan, optim: str, counts=COUNTS) -> tuple[TrainingSetup, dict[str, list[int | None]]]:
    """Per-GPU peak at micro-batch 1 for each sharding and GPU count (gradient checkpointing as planned:
    'auto' counts as on, the leanest setting)."""
    base = replace(plan.base.with_optimizer(optim), num_processes=1, sharding="none",
                   gradient_checkpointing=plan.checkpointing != "off")
    return base, P.memory_vs_gpus(base, 1, counts)


def plot_plan(plan, path: str | Path) -> Path:
    """Write the plan's figure to ``path`` (PNG): heatmap on the left, memory vs GPUs on the right."""
    import matplotlib  # lazy: pulls in matplotlib, which importing this module does not

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: pulls in matplotlib, which importing this module does not

    gpus, optims = plan.gpus, plan.optims
    by = {(r.optim, r.gpu): r for r in plan.rows}
    curves = _curves_optims(plan)
    fig = plt.figure(figsize=(max(12, 0.75 * len(gpus) + 9), max(5.5, 0.42 * len(optims) + 2.5)),
                     constrained_layout=True)
    grid = fig.add_gridspec(len(curves) or 1, 2, width_ratios=[max(1.2, len(gpus) / 7), 1])
    ax = fig.add_subplot(grid[:, 0])
    data = np.full((len(optims), len(gpus)), np.nan)
    nofit = np.full((len(optims), len(gpus)), np.nan)
    for i, o in enumerate(optims):
        for j, g in enumerate(gpus):
            r = by.get((o, g.id))
            if r is not None and r.status == "fits":
                best = max([r.max_micro_batch, *r.max_micro_batch_by_checkpointing.values()])
                data[i, j] = math.log2(best) + 1
            elif r is not None and r.status == "no_fit":
                nofit[i, j] = 1.0
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    top = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto", vmin=0, vmax=max(1.0, top))
    ax.imshow(np.ma.masked_invalid(nofit), cmap=matplotlib.colors.ListedColormap(["#f2c4c4"]), aspect="auto",
              vmin=0, vmax=1)
    for i, o in enumerate(optims):
        for j, g in enumerate(gpus):
            r = by.get((o, g.id))
            txt = "?" if r is None else cell_text(r)
            val = data[i, j]
            dark = np.isfinite(val) and val < 0.55 * top
            ax.text(j, i, txt, ha="center", va="center", fontsize=7.5, color="white" if dark else "black")
    ax.set_xticks(range(len(gpus)), [g.id for g in gpus], rotation=45, ha="right")
    ax.set_yticks(range(len(optims)), optims)
    n, sh = plan.base.num_processes, plan.base.sharding
    where = "1 GPU" if n == 1 and sh == "none" else f"{n} GPUs, {sh}"
    mp = plan.base.mixed_precision
    ax.set_title(f"{plan.model}: largest micro-batch per GPU\nseq {plan.base.seq_len}, {plan.base.dtype} weights"
                 f"{' + ' + mp + ' autocast' if mp else ''}, {where} (a/bc: a without, b with gradient "
                 "checkpointing; red -: does not fit; grey: cannot run)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("largest micro-batch, either checkpointing setting (log2 scale)")
    ticks = list(range(1, int(top) + 1))
    cb.set_ticks(ticks, labels=[str(2 ** (t - 1)) for t in ticks])

    budgets: dict[int, list[str]] = {}
    for g in gpus:
        budgets.setdefault(round(g.budget(plan.headroom) / GIB), []).append(g.id)
    for k, optim in enumerate(curves):
        axm = fig.add_subplot(grid[k, 1])
        base, mem = memory_curves(plan, optim)
        single = step_memory(base, 1).peak / GIB
        axm.axhline(single, color="black", lw=1, ls=":", label=f"1 GPU: {single:.0f} GiB")
        for sh, vals in mem.items():
            xs = [c for c, v in zip(COUNTS, vals) if v is not None]
            ys = [v / GIB for v in vals if v is not None]
            color, marker = STYLE.get(sh, ("black", "."))
            if xs:
                axm.plot(xs, ys, marker=marker, color=color, label=sh, lw=1.5, ms=4)
            else:
                axm.plot([], [], color=color, label=f"{sh}: cannot run")
        ymax = max([single] + [v / GIB for vals in mem.values() for v in vals if v is not None]) * 1.1
        last = None
        for gib, ids in sorted(budgets.items()):
            if gib > ymax:
                continue
            axm.axhline(gib, color="tab:orange", lw=0.8, ls="--", alpha=0.6)
            if last is None or gib - last > 0.06 * ymax:  # labels that would overlap are left off
                axm.text(COUNTS[-1], gib, ",".join(ids[:3]) + ("..." if len(ids) > 3 else ""),
                         fontsize=6.5, va="bottom", ha="right", color="tab:orange")
                last = gib
        axm.set_xscale("log", base=2)
        axm.set_xticks(COUNTS, [str(c) for c in COUNTS])
        axm.set_xlabel("GPUs")
        axm.set_ylabel(f"GiB at micro-batch 1{', ckpt' if base.gradient_checkpointing else ''}\n"
                       "(dashed: GPU budgets)", fontsize=8)
        axm.set_ylim(bottom=0)
        axm.set_title(f"{optim}: per-GPU peak vs number of GPUs", fontsize=9.5)
        axm.grid(alpha=0.3)
        axm.legend(fontsize=7, ncol=2, loc="upper right")
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["COUNTS", "cell_text", "memory_curves", "plot_plan"]
