"""The figures of ``bench plot`` and ``notebooks/results.ipynb`` (matplotlib, no pyplot: headless).

Each ``*_figure`` function takes :func:`optimem.harness.results.to_frame`'s DataFrame and returns a
``Figure`` (predicted vs measured, memory breakdown by category, throughput vs memory, max batch);
:func:`write_all` saves them as PNGs beside a one-page Markdown report. Byte axes are in binary units.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from optimem.estimators.categories import BREAKDOWN, LABELS, Category
from optimem.estimators.optimizers import REGISTRY
from optimem.harness.grid import families
from optimem.harness.units import human_bytes, md_table

BAND = 0.05
"""Half-width of the band around y = x (5%)."""
MAX_LABELS = 12
MAX_PANELS = 6

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "8", "d"]
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#393b79", "#637939", "#843c39", "#7b4173"]
CATEGORY_COLORS = {Category.WEIGHTS: "#4c72b0", Category.GRADIENTS: "#dd8452", Category.OPTIMIZER_STATE: "#55a868",
                   Category.ACTIVATIONS: "#c44e52", Category.OTHER: "#8c8c8c"}


def family_style(family: str) -> dict[str, str]:
    """A fixed marker and colour per optimizer family (the same in every figure and every run)."""
    known = sorted(set(families()) | {"other"})
    i = known.index(family) if family in known else len(known) + (sum(map(ord, str(family))) % 5)
    return {"marker": _MARKERS[i % len(_MARKERS)], "color": _COLORS[i % len(_COLORS)]}


def _human(n: float) -> str:
    """Compact binary units for axes: 1.5 MiB, 512 KiB, 3 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            text = f"{n:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _BinaryLocator:
    """Ticks at round numbers of one binary unit (KiB, MiB, GiB) for a linear byte axis."""

    def __new__(cls):
        # lazy: pulls in matplotlib, which importing this module does not
        from matplotlib.ticker import Locator, MaxNLocator

        class Loc(Locator):
            def __call__(self):
                vmin, vmax = self.axis.get_view_interval()
                return self.tick_values(vmin, vmax)

            def tick_values(self, vmin, vmax):
                top = max(abs(vmin), abs(vmax), 1.0)
                unit = 1024 ** max(0, min(4, int(math.log(top, 1024))))
                inner = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
                return [t * unit for t in inner.tick_values(vmin / unit, vmax / unit)]

        return Loc()


def _byte_axis(axis, log: bool) -> None:
    # lazy: pulls in matplotlib, which importing this module does not
    from matplotlib.ticker import FuncFormatter, LogLocator

    if log:
        axis.set_major_locator(LogLocator(base=2, numticks=12))
        axis.set_minor_locator(LogLocator(base=2, subs=(1.5,), numticks=12))
    else:
        axis.set_major_locator(_BinaryLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: _human(v) if v > 0 else "0"))
    if log:
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _label_points(ax, xs: list[float], ys: list[float], texts: list[str], *, gap: float = 0.05,
                  x_offset: float = 0.04) -> None:
    """Label points with texts placed to their right and pushed apart vertically (axes fractions), each
    joined to its point by a thin line; call after the axis limits and scales are final."""
    if not texts:
        return
    to_axes = ax.transData + ax.transAxes.inverted()
    pos = [tuple(to_axes.transform((x, y))) for x, y in zip(xs, ys)]
    order = sorted(range(len(texts)), key=lambda i: pos[i][1])
    placed: list[float] = []
    for i in order:
        y = min(max(pos[i][1], 0.03), 0.97)
        if placed and y < placed[-1] + gap:
            y = placed[-1] + gap
        placed.append(y)
    if placed and placed[-1] > 0.97:  # too high: shift the column down
        shift = placed[-1] - 0.97
        placed = [max(p - shift, 0.02) for p in placed]
    for i, y in zip(order, placed):
        px, py = pos[i]
        right = px < 0.62
        tx = px + x_offset if right else px - x_offset
        ax.annotate(texts[i], (xs[i], ys[i]), xytext=(tx, y), textcoords="axes fraction", fontsize=7,
                    color="#333333", va="center", ha="left" if right else "right",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.5, "shrinkA": 0,
                                "shrinkB": 2})


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: pulls in matplotlib, which importing this module does not

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def ok_rows(df):
    """The rows of runs that completed (``status == 'ok'``) with a measured peak."""
    if df is None or len(df) == 0:
        return df
    return df[(df["status"] == "ok") & df["measured_peak"].notna()]


def group_columns() -> list[str]:
    """Runs drawn in one panel share these (so one optimizer appears once per panel)."""
    return ["model", "shape", "precision", "gradient_checkpointing", "optim_args_group", "limit"]


def _group_title(key: tuple) -> str:
    model, shape, precision, ckpt, _args, limit = key
    return f"{model}  {shape}  {precision}" + ("  ckpt" if ckpt else "") + (f"  limit {limit}" if limit else "")


def _with_group_columns(df):
    limit = df["memory_limit_bytes"].map(lambda v: human_bytes(v) if v == v and v is not None else "")
    return df.assign(limit=limit, optim_args_group="")


def _groups(df) -> list[tuple[tuple, Any]]:
    groups = list(_with_group_columns(df).groupby(group_columns(), sort=True, dropna=False))
    out = []
    for key, g in groups[:MAX_PANELS]:
        # the same optimizer twice in a panel (different optim_args): tell them apart
        dup = g["optim"].duplicated(keep=False)
        names = g["optim"].where(~dup, g["optim"] + " [" + g["optim_args"].fillna("") + "]")
        out.append((key, g.assign(optim=names)))
    return out


def _note(fig, text: str) -> None:
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#555555", wrap=True)


# ----------------------------------------------------------------------------------- figure 1
def _scatter_panel(ax, rows, x_col: str, y_col: str, title: str, what: str, label_col: str = "point_label",
                   max_labels: int = MAX_LABELS) -> None:
    pts = rows[(rows[x_col] > 0) & (rows[y_col] > 0)]
    if len(pts) == 0:
        ax.set_title(title, fontsize=10)
        ax.text(0.5, 0.5, f"no {what} to compare", ha="center", va="center", transform=ax.transAxes)
        return
    lo = float(min(pts[x_col].min(), pts[y_col].min())) / 1.6
    hi = float(max(pts[x_col].max(), pts[y_col].max())) * 1.6
    line = [lo, hi]
    ax.fill_between(line, [v * (1 - BAND) for v in line], [v * (1 + BAND) for v in line], color="#2ca02c",
                    alpha=0.15, linewidth=0, label=f"±{BAND:.0%}")
    ax.plot(line, line, color="#2ca02c", linewidth=1, label="y = x")
    for family, sub in pts.groupby("family", sort=True):
        style = family_style(family)
        ax.scatter(sub[x_col], sub[y_col], s=38, marker=style["marker"], color=style["color"], label=family,
                   edgecolors="black", linewidths=0.4, zorder=3)
    err = (pts[y_col] - pts[x_col]).abs() / pts[x_col]
    n_out = int((err > BAND).sum())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _byte_axis(ax.xaxis, True)
    _byte_axis(ax.yaxis, True)
    ax.set_xlabel(f"measured {what}")
    ax.set_ylabel(f"predicted {what}")
    out = pts[err > BAND].assign(_err=err[err > BAND]).sort_values("_err", ascending=False).head(max_labels)
    _label_points(ax, list(out[x_col]), list(out[y_col]),
                  [f"{r[label_col]} ({(r[y_col] - r[x_col]) / r[x_col]:+.0%})" for _, r in out.iterrows()])
    if n_out > len(out):
        ax.text(0.98, 0.02, f"{n_out - len(out)} more outside the band, not labelled", ha="right", fontsize=7,
                transform=ax.transAxes, color="#555555")
    within = len(pts) - n_out
    signed = (pts[y_col] - pts[x_col]) / pts[x_col]
    worst = float(signed.loc[signed.abs().idxmax()]) * 100
    ax.set_title(f"{title}\n{within} of {len(pts)} runs within ±{BAND:.0%} (largest error {worst:+.2f}%)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.tick_params(axis="y", labelsize=8)


def predicted_vs_measured_figure(df):
    """Predicted vs measured peak memory and optimizer state (log-log, y = x, ±5% band)."""
    fig = _new_figure(12, 5.4)
    rows = ok_rows(df)
    if rows is None or len(rows) == 0:
        _note(fig, "no completed runs to plot")
        return fig
    rows = _with_group_columns(rows)
    varying = [c for c in ("model", "precision", "limit") if rows[c].nunique() > 1]
    label = rows["optim"] + " " + rows["shape"]
    for c in varying:
        label = label + rows[c].astype(str).map(lambda v: f" {v}" if v else "")
    label = label.where(~rows["gradient_checkpointing"], label + " ckpt")
    rows = rows.assign(point_label=label)
    axes = fig.subplots(1, 2)
    complete = bool(rows["predicted_peak_complete"].all())
    title = "peak memory" if complete else ("peak memory (predicted = weights + gradients + optimizer state:\n"
                                             "records whose estimate has no activation figure)")
    _scatter_panel(axes[0], rows.dropna(subset=["predicted_peak"]), "measured_peak", "predicted_peak", title,
                   "peak memory", max_labels=MAX_LABELS if complete else MAX_LABELS // 2)
    state = rows.dropna(subset=["measured_optimizer_state_total", "predicted_optimizer_state_total"])
    zero = state[(state["measured_optimizer_state_total"] == 0) & (state["predicted_optimizer_state_total"] == 0)]
    _scatter_panel(axes[1], state, "measured_optimizer_state_total", "predicted_optimizer_state_total",
                   "optimizer state", "optimizer state")
    if len(zero):
        names = ", ".join(sorted(set(zero["optim"])))
        axes[1].text(0.02, 0.98, f"state 0 B measured and predicted (not drawn): {names}", fontsize=7,
                     transform=axes[1].transAxes, va="top", color="#555555", wrap=True)
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    for h, lab in zip(h2, l2):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title="optimizer family",
               title_fontsize=8, frameon=False)
    devices = ", ".join(sorted(set(rows["device_name"].dropna().astype(str))))[:80]
    fig.suptitle(f"optimem: predicted vs measured ({len(rows)} runs; {devices})", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------- figure 2
def memory_breakdown_figure(df):
    """Stacked memory at the peak per optimizer: measured (left bar) beside predicted (right, hatched)."""
    rows = ok_rows(df)
    if rows is None or len(rows) == 0:
        fig = _new_figure(8, 4)
        _note(fig, "no completed runs to plot")
        return fig
    groups = _groups(rows)
    n = len(groups)
    widest = max(len(g) for _, g in groups)
    ncols = 1 if widest > 8 or n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = _new_figure(max(7.0, 0.75 * widest + 2.5) * ncols, 4.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    any_missing_pred = False
    for ax, (key, g) in zip(axes, groups):
        g = g.sort_values("measured_peak")
        xs = list(range(len(g)))
        width = 0.38
        bottoms_m = [0.0] * len(g)
        bottoms_p = [0.0] * len(g)
        for cat in BREAKDOWN:
            m = [float(v) if v == v and v is not None else 0.0 for v in g[f"measured_{cat}"]]
            p_raw = list(g[f"predicted_{cat}"])
            p = [float(v) if v is not None and v == v else 0.0 for v in p_raw]
            if cat == Category.ACTIVATIONS and any(v is None or v != v for v in p_raw):
                any_missing_pred = True
            ax.bar([x - width / 2 for x in xs], m, width, bottom=bottoms_m, color=CATEGORY_COLORS[cat],
                   edgecolor="white", linewidth=0.5, label=LABELS[cat])
            ax.bar([x + width / 2 for x in xs], p, width, bottom=bottoms_p, color=CATEGORY_COLORS[cat],
                   edgecolor="white", linewidth=0.5, hatch="///", alpha=0.75)
            bottoms_m = [a + b for a, b in zip(bottoms_m, m)]
            bottoms_p = [a + b for a, b in zip(bottoms_p, p)]
        for x, peak in zip(xs, g["measured_peak"]):
            ax.plot([x - width, x + width], [peak, peak], color="black", linewidth=0.8)
        ax.set_xticks(xs)
        ax.set_xticklabels(g["optim"], rotation=40, ha="right", fontsize=8)
        _byte_axis(ax.yaxis, False)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(_group_title(key) + "   (left: measured at the peak, right: predicted)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes[n:]:
        ax.set_visible(False)
    from matplotlib.patches import Patch  # lazy: pulls in matplotlib, which importing this module does not

    handles = [Patch(facecolor=CATEGORY_COLORS[c], label=LABELS[c]) for c in BREAKDOWN]
    handles += [Patch(facecolor="white", edgecolor="black", label="measured"),
                Patch(facecolor="white", edgecolor="black", hatch="///", label="predicted"),
                Patch(facecolor="black", label="— measured peak")]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    note = " (predicted activations: not in these records)" if any_missing_pred else ""
    fig.suptitle(f"memory at the peak by category, measured vs predicted{note}", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------- figure 3
def pareto_front(points: list[tuple[float, float, Any]]) -> list[Any]:
    """Ids of the points no other point beats on both memory (lower) and throughput (higher), ordered
    by memory. ``points``: (memory, throughput, id)."""
    front = []
    best = -math.inf
    for mem, tp, pid in sorted(points, key=lambda p: (p[0], -p[1])):
        if tp > best:
            front.append(pid)
            best = tp
    return front


def throughput_vs_memory_figure(df):
    """Tokens/s against measured peak memory per optimizer, Pareto front drawn; a panel per group."""
    rows = ok_rows(df)
    if rows is not None and len(rows):
        rows = rows[rows["tokens_per_s"].notna() & (rows["tokens_per_s"] > 0)]
    if rows is None or len(rows) == 0:
        fig = _new_figure(8, 4)
        _note(fig, "no completed runs with throughput to plot")
        return fig
    groups = _groups(rows)
    n = len(groups)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = _new_figure(7.5 * ncols, 4.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    seen: dict[str, Any] = {}
    for ax, (key, g) in zip(axes, groups):
        ids = pareto_front([(r.measured_peak, r.tokens_per_s, i) for i, r in zip(g.index, g.itertuples())])
        for family, sub in g.groupby("family", sort=True):
            style = family_style(family)
            h = ax.scatter(sub["measured_peak"], sub["tokens_per_s"], s=40, marker=style["marker"],
                           color=style["color"], edgecolors="black", linewidths=0.4, zorder=3, label=family)
            seen.setdefault(family, h)
        front = g.loc[ids]
        ax.step(front["measured_peak"], front["tokens_per_s"], where="post", color="black", linewidth=1,
                alpha=0.7, zorder=2)
        ax.scatter(front["measured_peak"], front["tokens_per_s"], s=120, facecolors="none", edgecolors="black",
                   linewidths=0.8, zorder=2)
        _byte_axis(ax.xaxis, False)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("measured peak memory")
        ax.set_ylabel("tokens / s")
        ax.set_title(_group_title(key) + "   (circled, *: Pareto front)", fontsize=9)
        ax.grid(True, alpha=0.3)
        xmin, xmax = g["measured_peak"].min(), g["measured_peak"].max()
        pad = (xmax - xmin) * 0.12 or xmax * 0.1
        ax.set_xlim(max(xmin - pad, 0), xmax + pad * 2.5)
        ymin, ymax = g["tokens_per_s"].min(), g["tokens_per_s"].max()
        ypad = (ymax - ymin) * 0.12 or ymax * 0.1
        ax.set_ylim(max(ymin - ypad, 0), ymax + ypad)
        _label_points(ax, list(g["measured_peak"]), list(g["tokens_per_s"]),
                      [("* " if i in ids else "") + o for i, o in zip(g.index, g["optim"])], gap=0.055,
                      x_offset=0.03)
    for ax in axes[n:]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D  # lazy: pulls in matplotlib, which importing this module does not

    handles = list(seen.values()) + [Line2D([], [], color="black", linewidth=1, label="Pareto front")]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="optimizer family",
               title_fontsize=8, frameon=False)
    fig.suptitle("throughput vs peak memory (up and to the left is better)", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------- figure 4
def max_batch_figure(summaries: list[dict]):
    """Largest batch size per optimizer under the memory limit (from ``.max-batch.jsonl`` lines)."""
    fig = _new_figure(8, 4.2)
    rows = [s for s in summaries if s.get("max_batch_size") is not None]
    if not rows:
        _note(fig, "no completed max-batch searches")
        return fig
    rows.sort(key=lambda s: (-(s["max_batch_size"] or 0), s["config"]["optim"]))
    ax = fig.subplots()
    labels = [f"{s['config']['optim']} s{s['config']['seq_len']}" for s in rows]
    values = [s["max_batch_size"] for s in rows]
    colors = [family_style(_family(s["config"]["optim"]))["color"] for s in rows]
    ax.barh(range(len(rows)), values, color=colors)
    for i, s in enumerate(rows):
        ax.text(values[i], i, f" {'>=' if s.get('capped') else ''}{values[i]}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("largest batch size that fits")
    limits = {s.get("memory_limit_bytes") for s in rows}
    where = ", ".join(human_bytes(x) for x in limits if x) or "the device"
    ax.set_title(f"max batch size under {where}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def _family(optim: str) -> str:
    spec = REGISTRY.get(optim)
    return spec.family if spec else "other"


# ----------------------------------------------------------------------------------- report
def error_table(df) -> list[list[str]]:
    """Rows (strings) of the report's error table, worst peak error first."""
    rows = []
    if df is None or len(df) == 0:
        return rows
    d = df.copy()
    d["_abs"] = d["peak_error_pct"].abs()
    d = d.sort_values(["status", "_abs"], ascending=[True, False], na_position="last")

    def pct(v, digits=1):
        return "-" if v is None or v != v else f"{v:+.{digits}f}%"

    for _, r in d.iterrows():
        ok = r["status"] == "ok"
        rows.append([r["optim"], r["family"], r["model"], r["shape"], r["precision"]
                     + (" ckpt" if r["gradient_checkpointing"] else ""), r["status"],
                     human_bytes(r["measured_peak"]) if ok else "-",
                     (human_bytes(r["predicted_peak"]) + ("" if r["predicted_peak_complete"] else "*"))
                     if r["predicted_peak"] == r["predicted_peak"] and r["predicted_peak"] is not None else "-",
                     pct(r["peak_error_pct"]) if ok else "-",
                     human_bytes(r["measured_optimizer_state_total"]) if ok else "-",
                     human_bytes(r["predicted_optimizer_state_total"]),
                     (pct(r["optimizer_state_error_pct"], 2) if r["measured_optimizer_state_total"] != 0 else
                      ("exact" if r["predicted_optimizer_state_total"] == 0 else "-")) if ok else "-",
                     f"{r['tokens_per_s']:,.0f}" if ok and r["tokens_per_s"] == r["tokens_per_s"]
                     and r["tokens_per_s"] is not None else "-"])
    return rows


ERROR_HEADERS = ["optimizer", "family", "model", "shape", "precision", "status", "measured peak", "predicted peak",
                 "peak error", "measured opt. state", "predicted opt. state", "state error", "tokens/s"]


_TEXT_COLUMNS = frozenset({"optimizer", "family", "model", "shape", "precision", "status"})


def report_markdown(df, images: dict[str, str], sources: list[str], summaries: list[dict] | None = None) -> str:
    """The one-page report: sources, environment, the figures, the error table, failures."""
    n = len(df) if df is not None else 0
    ok = ok_rows(df)
    lines = ["# optimem results report", ""]
    lines.append(f"Source: {', '.join(f'`{s}`' for s in sources)} — {n} configurations "
                 f"({', '.join(f'{v} {k}' for k, v in df['status'].value_counts().sort_index().items())})."
                 if n else f"Source: {', '.join(sources)} — no records.")
    if n:
        envs = df[["device_name", "torch", "transformers"]].drop_duplicates()
        for _, e in envs.iterrows():
            lines.append(f"Environment: {e['device_name']}, torch {e['torch']}, transformers {e['transformers']}.")
        commits = sorted(set(df["git_commit"].dropna().astype(str).str[:10]))
        if commits:
            lines.append(f"optimem commit: {', '.join(commits)}.")
    if ok is not None and len(ok):
        within = int((ok["peak_error_pct"].abs() <= BAND * 100).sum())
        state_ok = ok.dropna(subset=["optimizer_state_error_pct"])
        exact = int((state_ok["optimizer_state_error_pct"].abs() <= 0.5).sum())
        lines += ["", f"- peak memory predicted within ±{BAND:.0%}: {within} of {len(ok)} runs"
                  + ("" if ok["predicted_peak_complete"].all() else
                     " (predicted peak = weights + gradients + optimizer state, marked *: records whose estimate "
                     "has no activation figure)"),
                  f"- optimizer state predicted within ±0.5%: {exact} of {len(state_ok)} runs"]
    titles = {"predicted_vs_measured": "Predicted vs measured", "memory_breakdown": "Memory breakdown at the peak",
              "throughput_vs_memory": "Throughput vs peak memory", "max_batch": "Largest batch that fits"}
    for key, path in images.items():
        lines += ["", f"## {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({path})"]
    if n:
        lines += ["", "## Errors per run", "", md_table(ERROR_HEADERS, error_table(df), _TEXT_COLUMNS)]
        if not df["predicted_peak_complete"].all():
            lines += ["", "\\* model states only (weights + gradients + optimizer state)."]
        failed = df[df["status"] != "ok"]
        if len(failed):
            lines += ["", "## Runs that did not complete", ""]
            lines += [f"- `{r['label']}`: {r['status']}: {r['reason']}" for _, r in failed.iterrows()]
    if summaries:
        rows = [[s["config"]["optim"], s["config"]["model"], str(s["config"]["seq_len"]),
                 human_bytes(s.get("memory_limit_bytes")) if s.get("memory_limit_bytes") else s.get("device", ""),
                 "-" if s.get("max_batch_size") is None else str(s["max_batch_size"]),
                 str(s.get("first_failing_batch") or "-"), str(s.get("runs", ""))] for s in summaries]
        lines += ["", "## Max batch searches", "",
                  md_table(["optimizer", "model", "seq", "limit", "max batch", "first too big", "runs"], rows,
                           _TEXT_COLUMNS)]
    lines += ["", "Made by `bench plot`; every figure is drawn from the records above (see `results/README.md`)."]
    return "\n".join(lines) + "\n"


def write_all(df, out_dir: str | os.PathLike, *, sources: list[str], summaries: list[dict] | None = None,
              report: bool = True) -> dict[str, Path]:
    """Save every figure as ``<out_dir>/<name>.png`` and the Markdown report; returns name -> path."""
    # lazy: pulls in matplotlib, which importing this module does not
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"predicted_vs_measured": predicted_vs_measured_figure(df),
               "memory_breakdown": memory_breakdown_figure(df),
               "throughput_vs_memory": throughput_vs_memory_figure(df)}
    if summaries:
        figures["max_batch"] = max_batch_figure(summaries)
    paths: dict[str, Path] = {}
    for name, fig in figures.items():
        FigureCanvasAgg(fig)
        path = out / f"{name}.png"
        fig.savefig(path)
        paths[name] = path
    if report:
        md = report_markdown(df, {k: p.name for k, p in paths.items()}, sources, summaries)
        path = out / "report.md"
        path.write_text(md)
        paths["report"] = path
    return paths


__all__ = ["BAND", "CATEGORY_COLORS", "ERROR_HEADERS", "error_table", "family_style", "max_batch_figure",
           "memory_breakdown_figure", "ok_rows", "pareto_front", "predicted_vs_measured_figure", "report_markdown",
           "throughput_vs_memory_figure", "write_all"]
