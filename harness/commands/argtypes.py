"""Argument types and defaults shared by the ``bench`` subcommands (argparse turns their errors into one line)."""
from __future__ import annotations

import argparse

DEFAULT_OUT = "results/runs.jsonl"
"""Where ``bench run`` and ``bench sweep`` append records unless ``--out`` says otherwise."""


def _number(text: str, cast, ok, expected: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a non-negative integer")


def positive_seconds(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number of seconds")


def add_no_cache(parser: argparse.ArgumentParser) -> None:
    """``--no-cache`` (``optimem.harness.cli.main`` applies it: :func:`optimem.estimators.cache.disable`)."""
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the on-disk cache of parameter inventories and simulated "
                             "phases (OPTIMEM_CACHE_DIR moves it; 'python -m optimem.estimators.cache' shows it)")
