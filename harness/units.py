"""Human-readable units. Figures are kept in bytes everywhere; only display converts."""
from __future__ import annotations


def human_bytes(n: float | int | None) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    """8030261248 -> '8.03B'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A plain aligned text table; ``align`` holds 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def md_table(headers: list[str], rows: list[list], text_cols: frozenset[str] | None = None) -> str:
    """A Markdown table; with ``text_cols``, the other columns are right-aligned."""
    def esc(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    rule = ["---" if text_cols is None or h in text_cols else "---:" for h in headers]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    return "\n".join(out + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def rel_error(predicted: float | None, measured: float | None) -> float | None:
    """``(predicted - measured) / measured``, a fraction; None when either is missing, 0 when both are 0, inf
    when only the measurement is 0."""
    if predicted is None or measured is None:
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


def pct_error(predicted: float | None, measured: float | None) -> float | None:
    """:func:`rel_error` in percent (None also when the measurement is 0)."""
    return None if measured == 0 else (None if (e := rel_error(predicted, measured)) is None else e * 100.0)


def error_text(error: float | None) -> str:
    """A relative error (a fraction) for a table: ``""`` when missing, ``exact``, ``n/a`` (nothing measured),
    else ``+1.23%``."""
    if error is None:
        return ""
    if error == 0:
        return "exact"
    return "n/a" if error == float("inf") else f"{error:+.2%}"
