"""``bench plot RESULTS.jsonl [...] [--out DIR]``: PNG figures and a one-page Markdown report of results.

Writes ``predicted_vs_measured.png``, ``memory_breakdown.png``, ``throughput_vs_memory.png`` (and
``max_batch.png`` when max-batch searches are found) and ``report.md`` linking them with the error table.
The last record of each configuration is used (see ``results/README.md``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from optimem.estimators.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw predicted-vs-measured, memory breakdown and throughput figures from results files",
        description="Read one or more JSONL results files (from 'bench run' or 'bench sweep') and write PNG "
                    "figures with matplotlib: predicted vs measured peak memory and optimizer state (log-log, "
                    "y = x, ±5%% band), the memory at the peak stacked by category beside the prediction, "
                    "throughput vs peak memory with the Pareto front, the largest batch per optimizer (when "
                    "max-batch searches are present), and report.md linking them with the error table.")
    p.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="results files (the last record of each "
                                                                       "configuration is used)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: a 'plots' folder beside the first file)")
    p.add_argument("--max-batch", metavar="FILE", action="append",
                   help="max-batch search results (default: RESULTS.max-batch.jsonl beside each file, if present)")
    p.add_argument("--all-records", action="store_true", help="plot every record, not only the last per "
                                                              "configuration")
    p.add_argument("--no-report", action="store_true", help="write the figures only")
    p.add_argument("--json", action="store_true", help="print the written paths and figures as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from optimem.harness.paths import check_output_dir
    from optimem.harness.plots import ok_rows, write_all
    from optimem.harness.record import read_records
    from optimem.harness.results import load_records, to_frame
    from optimem.harness.max_batch import max_batch_path

    reports: list = []
    records = load_records(args.results, reports=reports)
    given = args.out is not None
    out = check_output_dir(args.out if given else Path(args.results[0]).resolve().parent / "plots",
                           "--out" if given else "the default --out (beside the first results file)")
    summaries: list[dict] = []
    mb_files = [Path(f) for f in (args.max_batch or [])] or [max_batch_path(f) for f in args.results]
    for f in mb_files:
        if f.is_file():
            latest = {r.get("group_key"): r for r in read_records(f) if r.get("kind") == "max_batch"}
            summaries += list(latest.values())
        elif args.max_batch:
            raise UserError(f"--max-batch {f}: no such max-batch file")
    if not records and not summaries:
        from optimem.harness.results import none_read

        raise UserError(none_read(args.results, reports))
    df = to_frame(records, latest=not args.all_records)
    paths = write_all(df, out, sources=[str(Path(s)) for s in args.results], summaries=summaries,
                      report=not args.no_report)
    ok = ok_rows(df)
    n_ok = 0 if ok is None else len(ok)
    if args.json:
        print(json.dumps({"out": str(out), "files": {k: str(v) for k, v in paths.items()},
                          "records": len(df), "completed": n_ok, "max_batch_searches": len(summaries)}, indent=2))
    else:
        print(f"bench plot: {len(df)} configurations ({n_ok} completed) from {', '.join(args.results)}")
        for name, path in paths.items():
            print(f"  {path}")
    return 0


__all__ = ["main", "register"]
