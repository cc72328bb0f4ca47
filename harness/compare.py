"""Regression comparison of two results files (``bench compare``).

Records are matched by configuration key (a file's last record of a configuration wins); records from
different environments (:data:`ENV_FIELDS`) refuse to compare unless mismatches are allowed. Memory (bytes)
is gated at ``memory_pct``; throughput needs both a minimum slowdown of the median step time
(``throughput_pct``) and a one-sided Mann-Whitney U test at ``alpha`` on step-time samples (per-run medians
with ``min_samples`` or more runs, else the last run's per-step times; fewer samples: reported, not gated).
A configuration that now fails is a regression; one that now completes, an improvement.
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from optimem.harness.grid import config_label, record_key
from optimem.harness.results import step_times
from optimem.harness.units import pct_error
from optimem.harness.units import format_table, human_bytes, md_table

ENV_FIELDS: tuple[str, ...] = ("device", "device_name", "torch", "transformers", "optimizer_package")
"""Environment facts that must match for two records to be compared."""
EXACT_LIMIT = 20000
"""Largest number of rank arrangements the exact Mann-Whitney test enumerates (else normal approximation)."""


@dataclass
class Tolerances:
    memory_pct: float = 1.0
    throughput_pct: float = 10.0
    alpha: float = 0.05
    min_samples: int = 3


@dataclass
class Finding:
    """One metric of one configuration: ``verdict`` is ``regression``, ``improvement``, ``ok`` or
    ``inconclusive`` (throughput without enough samples to test)."""

    key: str
    label: str
    metric: str
    baseline: float | None
    current: float | None
    change_pct: float | None
    verdict: str
    note: str = ""
    p_value: float | None = None


@dataclass
class Comparison:
    baseline_path: str
    current_path: str
    tolerances: Tolerances
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Labels of configurations in the baseline but not in the current file."""
    new: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    env_mismatches: list[dict[str, Any]] = field(default_factory=list)
    env_allowed: bool = False
    findings: list[Finding] = field(default_factory=list)
    baseline_env: dict[str, Any] = field(default_factory=dict)
    current_env: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return bool(self.env_mismatches) and not self.env_allowed

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "regression"]

    @property
    def improvements(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "improvement"]

    def exit_code(self) -> int:
        if self.refused:
            return 2
        return 1 if self.regressions else 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({"refused": self.refused, "regressions": len(self.regressions),
                  "improvements": len(self.improvements), "exit_code": self.exit_code()})
        return d


# ----------------------------------------------------------------------------------------- stats
def _midranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney_greater(x: list[float], y: list[float]) -> float:
    """One-sided p-value that ``x`` tends to be larger than ``y`` (Mann-Whitney U). Exact (every
    arrangement of the pooled midranks) up to :data:`EXACT_LIMIT` arrangements, else the normal
    approximation with tie and continuity corrections."""
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        return 1.0
    ranks = _midranks(list(x) + list(y))
    r1 = sum(ranks[:n1])
    if math.comb(n1 + n2, n1) <= EXACT_LIMIT:
        count = total = 0
        for combo in itertools.combinations(ranks, n1):
            total += 1
            if sum(combo) >= r1 - 1e-9:
                count += 1
        return count / total
    u = r1 - n1 * (n1 + 1) / 2
    mu = n1 * n2 / 2
    n = n1 + n2
    ties: dict[float, int] = {}
    for r in ranks:
        ties[r] = ties.get(r, 0) + 1
    tie_term = sum(t ** 3 - t for t in ties.values()) / (n * (n - 1))
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term))
    if sigma == 0:
        return 1.0
    z = (u - mu - 0.5) / sigma
    return 0.5 * math.erfc(z / math.sqrt(2))


# ---------------------------------------------------------------------------------------- compare
def env_facts(record: dict) -> dict[str, Any]:
    env = record.get("env") or {}
    pkg = env.get("optimizer_package") or {}
    return {"device": ((record.get("run") or {}).get("resolved_device") or env.get("device")),
            "device_name": env.get("device_name"), "torch": env.get("torch"), "transformers": env.get("transformers"),
            "optimizer_package": f"{pkg.get('name')} {pkg.get('version')}" if pkg.get("name") else None}


def _memory_finding(key, label, metric, b, c, tol: Tolerances) -> Finding | None:
    if b is None or c is None:
        return None
    change = pct_error(c, b)
    if change is None:
        verdict = "ok" if c == b else "regression"
        return Finding(key, label, metric, b, c, None, verdict, "baseline was 0" if verdict != "ok" else "")
    verdict = "regression" if change > tol.memory_pct else ("improvement" if change < -tol.memory_pct else "ok")
    return Finding(key, label, metric, b, c, change, verdict)


def node_peak(record: dict) -> int | None:
    """A multi-process record's fullest node: the largest sum of one node's rank peaks (bytes; None when the
    record has no per-node figures)."""
    nodes = ((record.get("distributed") or {}).get("nodes") or {}).get("measured") or []
    sums = [n.get("peak_bytes_sum") for n in nodes]
    return max(sums) if sums and None not in sums else None


def _run_median(record: dict) -> float | None:
    times = step_times(record)
    return statistics.median(times) if times else None


def throughput_samples(records: list[dict], tol: Tolerances) -> tuple[list[float], str]:
    """The samples a throughput test uses for one side: the median step time of each completed run when
    there are ``min_samples`` runs or more (run-to-run noise is then in the samples), else the step times
    after warmup of the last run. Returns (seconds, what they are)."""
    medians = [m for m in (_run_median(r) for r in records if r.get("status") == "ok") if m is not None]
    if len(medians) >= tol.min_samples:
        return medians, f"{len(medians)} runs"
    times = step_times(records[-1])
    return times, f"{len(times)} steps of 1 run"


def _throughput_finding(key, label, brecs: list[dict], crecs: list[dict], tol: Tolerances) -> Finding | None:
    brec, crec = brecs[-1], crecs[-1]
    bt, bwhat = throughput_samples(brecs, tol)
    ct, cwhat = throughput_samples(crecs, tol)
    if bwhat.endswith("runs") != cwhat.endswith("runs"):  # test like with like
        bt, bwhat = step_times(brec), f"{len(step_times(brec))} steps of 1 run"
        ct, cwhat = step_times(crec), f"{len(step_times(crec))} steps of 1 run"
    btp = ((brec.get("measured") or {}).get("throughput") or {}).get("tokens_per_s")
    ctp = ((crec.get("measured") or {}).get("throughput") or {}).get("tokens_per_s")
    if len(bt) < tol.min_samples or len(ct) < tol.min_samples:
        if btp is None or ctp is None:
            return None
        change = pct_error(ctp, btp)
        return Finding(key, label, "tokens_per_s", btp, ctp, change, "inconclusive",
                       f"{min(len(bt), len(ct))} step samples (< {tol.min_samples}): not gated")
    mb, mc = statistics.median(bt), statistics.median(ct)
    slowdown = (mc / mb - 1) * 100 if mb > 0 else 0.0
    # tokens/s at the median step time: the change a reader expects to see
    tokens_per_step = ((crec.get("measured") or {}).get("throughput") or {}).get("tokens_per_step")
    b_tp = tokens_per_step / mb if tokens_per_step and mb > 0 else btp
    c_tp = tokens_per_step / mc if tokens_per_step and mc > 0 else ctp
    change = pct_error(c_tp, b_tp)
    samples = bwhat if bwhat == cwhat else f"{bwhat} vs {cwhat}"
    if slowdown >= tol.throughput_pct:
        p = mann_whitney_greater(ct, bt)
        verdict = "regression" if p < tol.alpha else "ok"
        note = f"median step {mb * 1e3:.1f} -> {mc * 1e3:.1f} ms (+{slowdown:.1f}%), p={p:.3f} over {samples}"
        if verdict == "ok":
            note += f" (not significant at {tol.alpha})"
        return Finding(key, label, "tokens_per_s", b_tp, c_tp, change, verdict, note, p)
    if slowdown <= -tol.throughput_pct:
        p = mann_whitney_greater(bt, ct)
        verdict = "improvement" if p < tol.alpha else "ok"
        return Finding(key, label, "tokens_per_s", b_tp, c_tp, change, verdict,
                       f"median step {mb * 1e3:.1f} -> {mc * 1e3:.1f} ms ({slowdown:.1f}%), p={p:.3f} over {samples}",
                       p)
    return Finding(key, label, "tokens_per_s", b_tp, c_tp, change, "ok",
                   f"median step change {slowdown:+.1f}% (below the {tol.throughput_pct:g}% minimum effect)")


def group_by_key(records: list[dict]) -> dict[str, list[dict]]:
    """``{config key: its records in file order}`` (repeated runs of a configuration share a key)."""
    out: dict[str, list[dict]] = {}
    for rec in records:
        out.setdefault(record_key(rec), []).append(rec)
    return out


def compare_records(baseline: list[dict], current: list[dict], tol: Tolerances | None = None, *,
                    allow_env_mismatch: bool = False, baseline_path: str = "baseline",
                    current_path: str = "current") -> Comparison:
    """Compare two lists of records (see the module doc)."""
    tol = tol or Tolerances()
    b_all, c_all = group_by_key(baseline), group_by_key(current)
    b_by, c_by = {k: v[-1] for k, v in b_all.items()}, {k: v[-1] for k, v in c_all.items()}
    cmp = Comparison(baseline_path, current_path, tol, env_allowed=allow_env_mismatch)
    cmp.missing = sorted(config_label(b_by[k]["config"]) for k in b_by.keys() - c_by.keys())
    cmp.new = sorted(config_label(c_by[k]["config"]) for k in c_by.keys() - b_by.keys())
    mismatches: dict[tuple, dict] = {}
    for key in sorted(b_by.keys() & c_by.keys(), key=lambda k: config_label(b_by[k]["config"])):
        b, c = b_by[key], c_by[key]
        label = config_label(b["config"])
        cmp.matched.append(label)
        be, ce = env_facts(b), env_facts(c)
        cmp.baseline_env = cmp.baseline_env or be
        cmp.current_env = cmp.current_env or ce
        for f in ENV_FIELDS:
            if be[f] != ce[f] and not (f == "optimizer_package" and (be[f] is None or ce[f] is None)):
                entry = mismatches.setdefault((f, str(be[f]), str(ce[f])), {"field": f, "baseline": be[f],
                                                                             "current": ce[f], "configs": 0})
                entry["configs"] += 1
        bs, cs = b.get("status"), c.get("status")
        if bs == "skipped" or cs == "skipped":
            cmp.not_compared.append(f"{label} (skipped in {'baseline' if bs == 'skipped' else 'current'})")
            continue
        if bs == "ok" and cs != "ok":
            cmp.findings.append(Finding(key, label, "status", None, None, None, "regression",
                                        f"ran in the baseline, now {cs}: {c.get('reason', '')[:200]}"))
            continue
        if bs != "ok" and cs == "ok":
            cmp.findings.append(Finding(key, label, "status", None, None, None, "improvement",
                                        f"was {bs} in the baseline, now runs"))
            continue
        if bs != "ok":
            cmp.not_compared.append(f"{label} ({bs} in both)")
            continue
        bm, cm = b.get("measured") or {}, c.get("measured") or {}
        for metric in ("peak_bytes", "optimizer_state_bytes"):
            f = _memory_finding(key, label, metric, bm.get(metric), cm.get(metric), tol)
            if f is not None:
                cmp.findings.append(f)
        f = _memory_finding(key, label, "node_peak_bytes", node_peak(b), node_peak(c), tol)
        if f is not None:
            cmp.findings.append(f)
        f = _throughput_finding(key, label, b_all[key], c_all[key], tol)
        if f is not None:
            cmp.findings.append(f)
    cmp.env_mismatches = list(mismatches.values())
    if cmp.refused:
        cmp.findings = []
    return cmp


# ----------------------------------------------------------------------------------------- report
def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.endswith("_bytes"):
        return human_bytes(value)
    if metric == "tokens_per_s":
        return f"{value:,.1f} tok/s"
    return str(value)


METRIC_NAMES = {"peak_bytes": "peak memory", "optimizer_state_bytes": "optimizer state",
                "node_peak_bytes": "peak of the fullest node (its ranks' sum)",
                "tokens_per_s": "throughput", "status": "status"}


def _rows(findings: list[Finding]) -> list[list[str]]:
    return [[f.label, METRIC_NAMES.get(f.metric, f.metric), _fmt(f.metric, f.baseline), _fmt(f.metric, f.current),
             "-" if f.change_pct is None else f"{f.change_pct:+.2f}%", f.note] for f in findings]


HEADERS = ["configuration", "metric", "baseline", "current", "change", "note"]


def markdown_report(cmp: Comparison) -> str:
    """A Markdown report fit for a CI job summary (``$GITHUB_STEP_SUMMARY``)."""
    t = cmp.tolerances
    lines = []
    if cmp.refused:
        lines.append("## ⛔ optimem benchmark comparison: environments differ, not compared")
    elif cmp.regressions:
        n = len(cmp.regressions)
        lines.append(f"## ❌ optimem benchmark comparison: {n} regression{'s' if n != 1 else ''}")
    else:
        lines.append("## ✅ optimem benchmark comparison: no regressions")
    lines += ["", f"Baseline `{cmp.baseline_path}` vs current `{cmp.current_path}`: {len(cmp.matched)} matched "
                  f"configurations, {len(cmp.missing)} missing from current, {len(cmp.new)} new.",
              f"Gates: memory +{t.memory_pct:g}% (peak and optimizer state); throughput -{t.throughput_pct:g}% "
              f"median step time with a one-sided Mann-Whitney U test at p < {t.alpha:g} "
              f"(needs {t.min_samples}+ steps each side)."]
    if cmp.env_mismatches:
        lines += ["", "### Environment differences" + ("" if cmp.refused else " (allowed)"), ""]
        lines.append(md_table(["field", "baseline", "current", "configurations"],
                               [[m["field"], str(m["baseline"]), str(m["current"]), str(m["configs"])]
                                for m in cmp.env_mismatches]))
        if cmp.refused:
            lines += ["", "Figures from different machines or library versions are not comparable; rerun the "
                          "baseline in this environment, or pass `--allow-env-mismatch` to compare anyway."]
    elif cmp.baseline_env:
        e = cmp.baseline_env
        lines += ["", f"Environment: {e.get('device_name')} ({e.get('device')}), torch {e.get('torch')}, "
                      f"transformers {e.get('transformers')}."]
    if cmp.regressions:
        lines += ["", "### Regressions", "", md_table(HEADERS, _rows(cmp.regressions))]
    if cmp.improvements:
        lines += ["", "### Improvements", "", md_table(HEADERS, _rows(cmp.improvements))]
    inconclusive = [f for f in cmp.findings if f.verdict == "inconclusive"]
    if inconclusive:
        lines += ["", "### Not gated (too few samples)", "", md_table(HEADERS, _rows(inconclusive))]
    for title, items in (("Missing from current", cmp.missing), ("New in current", cmp.new),
                         ("Not compared", cmp.not_compared)):
        if items:
            lines += ["", f"### {title} ({len(items)})", ""] + [f"- `{x}`" for x in items]
    if cmp.findings:
        lines += ["", f"<details><summary>All {len(cmp.findings)} comparisons</summary>", "",
                  md_table(HEADERS + ["verdict"], [r + [f.verdict] for r, f in zip(_rows(cmp.findings),
                                                                                   cmp.findings)]),
                  "", "</details>"]
    return "\n".join(lines) + "\n"


def text_report(cmp: Comparison) -> str:
    """The terminal summary."""
    t = cmp.tolerances
    lines = [f"bench compare: {cmp.baseline_path} -> {cmp.current_path}: {len(cmp.matched)} matched, "
             f"{len(cmp.missing)} missing, {len(cmp.new)} new (memory +{t.memory_pct:g}%, throughput "
             f"-{t.throughput_pct:g}% at p < {t.alpha:g})"]
    if cmp.env_mismatches:
        lines.append("environment differences" + (" (allowed):" if not cmp.refused else ":"))
        for m in cmp.env_mismatches:
            lines.append(f"  {m['field']}: {m['baseline']} -> {m['current']} ({m['configs']} configurations)")
    for title, items in (("regressions", cmp.regressions), ("improvements", cmp.improvements)):
        if items:
            lines += ["", f"{title}:", format_table(HEADERS, _rows(items), align="llrrrl")]
    for title, items in (("missing from current", cmp.missing), ("new in current", cmp.new)):
        if items:
            lines.append(f"{title}: " + "; ".join(items))
    if cmp.refused:
        lines.append("NOT COMPARED: the environments differ (use --allow-env-mismatch to compare anyway)")
    elif cmp.regressions:
        lines.append(f"FAIL: {len(cmp.regressions)} regression(s)")
    else:
        lines.append(f"OK: no regressions ({len(cmp.findings)} comparisons, {len(cmp.improvements)} improvements)")
    return "\n".join(lines)


__all__ = ["Comparison", "ENV_FIELDS", "Finding", "Tolerances", "compare_records", "env_facts", "mann_whitney_greater",
           "markdown_report", "text_report"]
