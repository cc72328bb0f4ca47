"""The results tab: an uploaded ``bench run``/``sweep`` results file drawn as ``bench plot`` draws it, and
``bench compare``'s report against a second upload. Only uploads are read (Gradio's copies, size-capped); a
file that holds no record this optimem reads is one message. Figures are bytes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from optimem.estimators.errors import UserError
from optimem.harness.units import human_bytes
from optimem.harness.results import latest_by_key, load_records, none_read, pct_error, to_frame
from optimem.harness.grid import config_label
from optimem.harness.plots import error_table, memory_breakdown_figure, predicted_vs_measured_figure
from optimem.harness.compare import compare_records, markdown_report

MAX_RESULTS_BYTES = 64 << 20
"""An uploaded results file may hold at most 64 MiB."""
PHASE_COLUMNS = ["run", "phase", "measured peak", "predicted peak", "error"]
MAX_PHASE_ROWS = 400


@dataclass
class ResultsAnswer:
    """What the results tab shows: ``error`` (the inline message, empty when read), matplotlib figures, the
    error table (``bench plot``'s), the per-phase table and the comparison report (Markdown)."""

    error: str = ""
    summary: str = ""
    predicted_vs_measured: object = None
    breakdown: object = None
    error_rows: list[list] = field(default_factory=list)
    phase_rows: list[list] = field(default_factory=list)
    comparison: str = ""


def _records(path: str | None, what: str) -> list[dict]:
    if not path:
        raise UserError(f"{what}: upload a JSONL results file written by 'bench run' or 'bench sweep'")
    p = Path(path)
    size = p.stat().st_size if p.is_file() else 0
    if size > MAX_RESULTS_BYTES:
        raise UserError(f"{what}: {size} bytes is more than the page reads (at most {MAX_RESULTS_BYTES >> 20} MiB); "
                        "use 'bench plot' on the command line for larger files")
    reports: list = []
    records = load_records(p, reports=reports)
    if not records:
        raise UserError(f"{what}: {none_read([p.name], reports)}")
    return records


def phase_rows(records: list[dict]) -> list[list]:
    """Measured vs predicted peak per phase, per completed run (the last record of each configuration)."""
    out = []
    for rec in latest_by_key(records).values():
        if rec.get("status") != "ok":
            continue
        measured = (rec.get("measured") or {}).get("phases") or {}
        predicted = (rec.get("predicted") or {}).get("phases") or {}
        label = config_label(rec["config"])
        for name, ph in measured.items():
            m = ph.get("peak_bytes")
            p = (predicted.get(name) or {}).get("peak")
            err = pct_error(p, m)
            out.append([label, name, human_bytes(m), human_bytes(p) if p is not None else "-",
                        "-" if err is None else f"{err:+.2f}%"])
            if len(out) >= MAX_PHASE_ROWS:
                return out
    return out


def results(path: str | None, baseline: str | None = None) -> ResultsAnswer:
    """The results tab's answer for an uploaded results file (and, if given, a second one to compare it with:
    ``baseline`` is the older file)."""
    try:
        records = _records(path, "results file")
        df = to_frame(records)
        ans = ResultsAnswer()
        ok = int((df["status"] == "ok").sum()) if len(df) else 0
        ans.summary = f"{len(records)} records, {len(df)} configurations, {ok} completed."
        ans.predicted_vs_measured = predicted_vs_measured_figure(df)
        ans.breakdown = memory_breakdown_figure(df)
        ans.error_rows = error_table(df)
        ans.phase_rows = phase_rows(records)
        if baseline:
            base = _records(baseline, "baseline file")
            ans.comparison = markdown_report(compare_records(base, records, baseline_path=Path(baseline).name,
                                                             current_path=Path(path).name))
        return ans
    except UserError as exc:
        return ResultsAnswer(error=str(exc))


__all__ = ["MAX_RESULTS_BYTES", "PHASE_COLUMNS", "ResultsAnswer", "phase_rows", "results"]
