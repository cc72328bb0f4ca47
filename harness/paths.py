"""Paths the user names, checked before any work starts; and where a record goes when its file cannot be written.

Every command that writes (``run``/``sweep`` records, ``plot`` figures, ``compare --markdown``, ``plan
--plot``) checks its output here first, so a bad path is one line and exit 2 before anything runs, never a
traceback after the work is done. Inputs (results files, config files) are checked by the readers that
parse them (:func:`optimem.harness.record.read_records`, :func:`optimem.estimators.catalog.resolve`, ...).

:func:`rescue_record` is the last resort: a record whose ``--out`` fails after the run (a disk that filled up,
a file removed under the sweep) is written to a fallback file it names, so a measurement is never lost.
"""
from __future__ import annotations

import codecs
import os
import tempfile
from pathlib import Path

from optimem.estimators.errors import UserError
from optimem.harness.record import to_line

RESCUE_PREFIX = "optimem-unsaved-"


def _named(flag: str, path: object) -> str:
    return f"{flag} {path}" if flag else str(path)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_create(directory: Path) -> str | None:
    """Why a new file cannot be created in the existing ``directory`` (None: it can); creates and removes a
    probe file (``os.access`` says yes to root even on read-only or virtual file systems)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".optimem-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def check_output_file(path: str | os.PathLike | None, flag: str, *, what: str = "file", text: bool = True,
                      example: str = "runs.jsonl") -> Path:
    """``path`` as a file this process can create or append to (its missing parent folders are created
    when the results are written, not now). ``text``: an existing file must be text (UTF-8), as a JSONL
    results file or a Markdown report is. UserError naming ``flag`` (and, for a folder, suggesting
    ``example`` inside it) otherwise."""
    if path is None or not str(path).strip():
        raise UserError(f"{flag}: give a {what} path, got {str(path)!r}")
    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise UserError(f"{_named(flag, path)} is a directory: give a {what} path (e.g. {p / example})")
    if p.exists():
        if not p.is_file():
            raise UserError(f"{_named(flag, path)} is not a regular file: give a {what} path")
        try:
            with open(p, "ab"):
                pass
        except OSError as exc:
            raise UserError(f"{_named(flag, path)} cannot be written ({exc.strerror or exc}): give a {what} "
                            "you can write") from None
        if text:
            bad = _not_text(p)
            if bad:
                raise UserError(f"{_named(flag, path)} exists and is not a text file ({bad}); appending to it "
                                f"would mix records into it: give another {what}")
        return p
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise UserError(f"{_named(flag, path)} cannot be created: {base} is a file, not a folder")
    why = _probe_create(base)
    if why:
        raise UserError(f"{_named(flag, path)} cannot be created ({base}: {why}): give a path in a folder you "
                        "can write")
    return p


def check_output_dir(path: str | os.PathLike | None, flag: str) -> Path:
    """``path`` as a folder this process can write files into (created later if missing)."""
    if path is None or not str(path).strip():
        raise UserError(f"{flag}: give a folder path, got {str(path)!r}")
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{_named(flag, path)} is a file, not a folder: give a folder for the output")
    base = p if p.is_dir() else _nearest_existing(p.parent)
    if not base.is_dir():
        raise UserError(f"{_named(flag, path)} cannot be created: {base} is a file, not a folder")
    why = _probe_create(base)
    if why:
        raise UserError(f"{_named(flag, path)} cannot be written ({base}: {why}): give a folder you can write")
    return p


def check_output_suffix(path: Path, flag: str, suffixes: tuple[str, ...]) -> Path:
    """``path`` ends in one of ``suffixes`` (what the writer can produce)."""
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{_named(flag, path)}: the file name must end in {', '.join(suffixes)} (the format is "
                        "read off the name)")
    return path


def _not_text(path: Path, limit: int = 1 << 16) -> str | None:
    """Why the first ``limit`` bytes of ``path`` are not UTF-8 text (None when they are)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError as exc:
        return exc.strerror or str(exc)
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"byte {nul} is NUL"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < limit)
    except UnicodeDecodeError as exc:
        return f"byte {exc.start} is not UTF-8"
    return None


def rescue_record(record: dict, failed: str | os.PathLike, error: BaseException, *,
                  name: str | None = None) -> Path | None:
    """Write ``record`` (one JSONL line) to a fallback file after writing it to ``failed`` raised ``error``:
    ``./optimem-unsaved-<name or run id>.jsonl``, else the same name in the temp folder (appended: a sweep
    keeps all its rescued records in one). Returns the path (None when neither could be written: the caller
    still prints the record)."""
    name = f"{RESCUE_PREFIX}{name or record.get('run_id') or 'record'}.jsonl"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        target = folder / name
        try:
            if target.resolve() == Path(failed).expanduser().resolve():
                continue
            with open(target, "ab") as fh:
                fh.write(to_line(record))
                fh.flush()
                os.fsync(fh.fileno())
            return target
        except OSError:
            continue
    return None


__all__ = ["RESCUE_PREFIX", "check_output_dir", "check_output_file", "check_output_suffix", "rescue_record"]
