"""``bench compare BASELINE.jsonl CURRENT.jsonl``: did memory or speed regress?

Exit status: 0 no regression, 1 regression, 2 not compared (records from different environments without
``--allow-env-mismatch``, or bad input). See :mod:`optimem.harness.compare` for the rules.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from optimem.estimators.errors import UserError
from optimem.harness.commands.argtypes import positive_int
from optimem.harness.compare import Tolerances, compare_records, markdown_report, text_report
from optimem.harness.paths import check_output_file
from optimem.harness.results import load_records, none_read


def _pct(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative percentage, got {text!r}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare two results files: memory and throughput regressions (exit 1 on regression)",
        description="Match the runs of two results files by configuration key and report regressions: peak "
                    "memory or optimizer state above --memory-tolerance (memory is deterministic), throughput "
                    "down by at least --throughput-tolerance in median step time and significant by a one-sided "
                    "Mann-Whitney U test on the per-step times, and runs that used to work and now fail. "
                    "Configurations in only one file are listed, not errors. Records from different environments "
                    "(device model, torch, transformers, optimizer package versions) are not compared unless "
                    "--allow-env-mismatch.",
        epilog="Exit status: 0 no regression, 1 regression, 2 not compared (environments differ) or bad input. "
               "In CI: bench compare base.jsonl new.jsonl --markdown \"$GITHUB_STEP_SUMMARY\"")
    p.add_argument("baseline", metavar="BASELINE.jsonl")
    p.add_argument("current", metavar="CURRENT.jsonl")
    p.add_argument("--memory-tolerance", type=_pct, default=1.0, metavar="PCT",
                   help="largest allowed increase of peak memory and optimizer state, percent (default 1)")
    p.add_argument("--throughput-tolerance", type=_pct, default=10.0, metavar="PCT",
                   help="smallest slowdown of the median step time that counts, percent (default 10)")
    p.add_argument("--alpha", type=_alpha, default=0.05, help="significance level of the throughput test "
                                                               "(default 0.05)")
    p.add_argument("--min-samples", type=positive_int, default=3, metavar="N",
                   help="step-time samples needed on each side to gate throughput (default 3)")
    p.add_argument("--allow-env-mismatch", action="store_true",
                   help="compare records from different environments anyway (differences are listed)")
    p.add_argument("--markdown", metavar="FILE", help="write the Markdown report here ('-' for stdout); appends "
                                                      "when FILE is $GITHUB_STEP_SUMMARY")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.markdown is not None and args.markdown != "-":
        check_output_file(args.markdown, "--markdown", what="Markdown file", example="report.md")
    tol = Tolerances(memory_pct=args.memory_tolerance, throughput_pct=args.throughput_tolerance, alpha=args.alpha,
                     min_samples=args.min_samples)
    sides = {}
    for label, path in (("BASELINE", args.baseline), ("CURRENT", args.current)):
        reports: list = []
        sides[label] = load_records(path, reports=reports)
        if not sides[label]:
            raise UserError(f"{label}: {none_read([path], reports)}")
    cmp = compare_records(sides["BASELINE"], sides["CURRENT"], tol,
                          allow_env_mismatch=args.allow_env_mismatch, baseline_path=args.baseline,
                          current_path=args.current)
    if args.markdown == "-":
        sys.stdout.write(markdown_report(cmp))
    if args.json:
        print(json.dumps(cmp.to_dict(), indent=2, default=str))
    elif args.markdown != "-":
        print(text_report(cmp))
    if args.markdown and args.markdown != "-":  # after the report is out: a failing write loses nothing
        path = Path(args.markdown)
        append = os.environ.get("GITHUB_STEP_SUMMARY") and path.resolve() == Path(
            os.environ["GITHUB_STEP_SUMMARY"]).resolve()
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as fh:
            fh.write(markdown_report(cmp))
    if cmp.refused:
        fields = ", ".join(sorted({m["field"] for m in cmp.env_mismatches}))
        print(f"bench compare: error: the records come from different environments ({fields}); rerun the baseline "
              "here or pass --allow-env-mismatch", file=sys.stderr)
    return cmp.exit_code()


__all__ = ["main", "register"]
