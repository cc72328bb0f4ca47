"""The run record: one JSON object per run, its JSON Schema, and the atomic JSONL append.

A record holds ``schema_version``, ``run_id``, the full ``config``, ``status`` (``ok``, ``oom``,
``skipped``, ``error``) with a one-line ``reason``, ``measured`` (bytes and seconds; ``null`` when
nothing ran), ``predicted`` (``optimem.estimators.estimate(...).to_dict()`` for the same configuration, or
``null`` when the optimizer cannot be estimated), ``env`` (machine and package facts), ``run`` (launch
facts), ``detail`` (an error's traceback tail, else ``null``) and, for a multi-process run only,
``distributed`` (every rank's status and measurement beside the planner's per-rank prediction; ``measured``
is then the rank with the highest peak).

:func:`append_record` writes a record as one line with a single ``os.write`` on a descriptor opened
with ``O_APPEND`` and fsyncs it, with SIGINT/SIGTERM/SIGHUP held for the duration: a file of records
only ever gains whole lines. :func:`read_records` skips any line that is not a record it reads (cut off, not
JSON, not matching the schema, of a newer schema version) and says so in one line.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimem.estimators import cache
from optimem.estimators.errors import UserError
from optimem.estimators.inventory import DTYPES
from optimem.estimators.setup import ATTN_IMPLEMENTATIONS, DEVICES, MIXED_PRECISIONS, SHARDINGS, TASKS

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

SCHEMA_VERSION = 2
"""2: the config holds the whole training setup (task, attention implementation, freeze, processes,
sharding); version-1 records read back with those at their defaults."""
SCHEMA_VERSIONS = (1, 2)
STATUSES = ("ok", "oom", "skipped", "error", "oom-predicted")
"""``oom-predicted``: refused before it ran, the estimate being larger than the device's free memory
(:mod:`optimem.harness.fit`)."""

_INT = {"type": "integer", "minimum": 0}
_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_NUM_OR_NULL = {"type": ["number", "null"]}
_TIME_SUMMARY = {"type": ["object", "null"], "required": ["p50", "p90", "mean"],
                 "properties": {k: {"type": "number", "minimum": 0} for k in ("p50", "p90", "mean", "min", "max")}}

PHASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["peak_bytes", "end_bytes", "occurrences"],
    "properties": {
        "peak_bytes": _INT, "end_bytes": _INT, "occurrences": {"type": "integer", "minimum": 1},
        "interrupted": {"type": "boolean"},
        "tensors": {"type": "object", "required": ["peak_bytes", "end_bytes", "breakdown_at_peak"],
                    "properties": {"peak_bytes": _INT, "end_bytes": _INT,
                                   "breakdown_at_peak": {"type": "object", "additionalProperties": {"type": "integer"}},
                                   "breakdown_at_end": {"type": "object", "additionalProperties": {"type": "integer"}}}},
        "rss": {"type": "object", "required": ["peak_bytes", "end_bytes"],
                "properties": {"peak_bytes": _INT, "end_bytes": _INT}},
        "cuda": {"type": "object", "required": ["peak_bytes", "reserved_peak_bytes", "active_peak_bytes",
                                                "alloc_retries"],
                 "properties": {"peak_bytes": _INT, "reserved_peak_bytes": _INT, "active_peak_bytes": _INT,
                                "alloc_retries": _INT}},
        "nvml": {"type": "object", "required": ["peak_used_bytes"], "properties": {"peak_used_bytes": _INT}},
    },
}

THROUGHPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["warmup_steps", "measured_steps", "samples_per_s", "tokens_per_s", "step_time_s",
                 "optimizer_step_time_s", "mfu"],
    "properties": {
        "warmup_steps": _INT, "measured_steps": _INT, "samples_per_s": _NUM_OR_NULL, "tokens_per_s": _NUM_OR_NULL,
        "step_time_s": _TIME_SUMMARY, "optimizer_step_time_s": _TIME_SUMMARY, "mfu": _NUM_OR_NULL,
        "flops_per_step": _NUM_OR_NULL, "peak_flops": _NUM_OR_NULL,
        "all_step_times_s": {"type": "array", "items": {"type": "number", "minimum": 0}},
    },
}

MEASURED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["device", "peak_bytes", "peaks", "phases", "parameters_bytes", "gradients_bytes",
                 "optimizer_state_bytes", "optimizer_state", "throughput"],
    "properties": {
        "device": {"enum": ["cpu", "cuda"]},
        "peak_bytes": _INT,
        "peaks": {"type": "object"},
        "phases": {"type": "object", "additionalProperties": PHASE_SCHEMA},
        "parameters_bytes": _INT, "gradients_bytes": _INT, "optimizer_state_bytes": _INT_OR_NULL,
        "optimizer_state": {"type": ["object", "null"]},
        "optimizer_state_bytes_after_step": {"type": "array", "items": _INT},
        "throughput": THROUGHPUT_SCHEMA,
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}

_OK_MEASURED: dict[str, Any] = {
    "type": "object",
    "required": ["phases", "optimizer_state_bytes"],
    "properties": {
        "optimizer_state_bytes": _INT,
        "phases": {"type": "object", "required": ["step0.forward", "step0.backward", "step0.optimizer_step"]},
    },
}

RUN_SOURCES = ("bench", "callback")
"""Who measured a run: the harness (``bench run`` / ``bench sweep``: ``run.source`` absent or ``bench``) or the
:class:`optimem.harness.callback.MemoryCallback` inside the user's own Trainer (``callback``), which starts at
``on_train_begin`` and so has no ``model_load`` phase."""

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["optim", "model", "dtype", "mixed_precision", "batch_size", "seq_len", "grad_accum",
                 "gradient_checkpointing", "optim_args", "optim_target_modules", "steps", "warmup", "device",
                 "seed", "data"],
    "properties": {
        "optim": {"type": "string"}, "model": {"type": "string"}, "task": {"enum": list(TASKS)},
        "dtype": {"enum": list(DTYPES)}, "mixed_precision": {"enum": list(MIXED_PRECISIONS)},
        "batch_size": {"type": "integer", "minimum": 1}, "seq_len": {"type": "integer", "minimum": 1},
        "grad_accum": {"type": "integer", "minimum": 1}, "gradient_checkpointing": {"type": "boolean"},
        "attn_implementation": {"enum": list(ATTN_IMPLEMENTATIONS)},
        "optim_args": {"type": ["string", "null"]},
        "optim_target_modules": {"type": ["string", "array", "null"], "items": {"type": "string"}},
        "freeze": {"type": ["string", "null"]},
        "num_processes": {"type": "integer", "minimum": 1}, "sharding": {"enum": list(SHARDINGS)},
        "steps": {"type": "integer", "minimum": 1}, "warmup": {"type": "integer", "minimum": 0},
        "device": {"enum": list(DEVICES)}, "seed": {"type": "integer"},
        "data": {"type": ["string", "null"]}, "extra": {"type": "object"},
    },
}
"""A record's ``config``: :meth:`optimem.harness.run_config.RunConfig.to_dict` (the fields of schema version 1 are
required; those added since are optional, so version-1 records still match; read back with
``RunConfig.from_dict``)."""

ENV_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["device", "device_name", "driver", "cuda", "torch", "transformers", "python", "optimizer_package",
                 "git_commit", "time"],
    "properties": {
        "device": {"enum": ["cpu", "cuda"]}, "device_name": {"type": ["string", "null"]},
        "driver": {"type": ["string", "null"]}, "cuda": {"type": ["string", "null"]},
        "torch": {"type": "string"}, "transformers": {"type": "string"}, "python": {"type": "string"},
        "optimizer_package": {"type": "object", "required": ["name", "version"],
                              "properties": {"name": {"type": ["string", "null"]},
                                             "version": {"type": ["string", "null"]}}},
        "packages": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "git_commit": {"type": ["string", "null"]}, "time": {"type": "string"},
    },
}

RANK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["rank", "status", "reason", "measured"],
    "properties": {"rank": _INT, "status": {"enum": list(STATUSES)}, "reason": {"type": "string"},
                   "measured": {"anyOf": [{"type": "null"}, MEASURED_SCHEMA]}},
}

DISTRIBUTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["scheme", "world_size", "ranks", "predicted"],
    "properties": {
        "scheme": {"enum": [s for s in SHARDINGS if s != "none"]},
        "world_size": {"type": "integer", "minimum": 2}, "backend": {"type": "string"},
        "launcher": {"type": "string"}, "command": {"type": ["string", "null"]},
        "training_arguments": {"type": "object"}, "measured_rank": _INT_OR_NULL,
        "ranks": {"type": "array", "items": RANK_SCHEMA},
        "predicted": {"type": "object", "required": ["supported"]},
        "nodes": {"type": "object", "required": ["requested", "predicted", "measured"]},
    },
}
"""A multi-process run's ``distributed`` section (absent from single-process records): one entry per rank
(its status and measurement) and the planner's per-rank prediction (``optimem.harness.distributed.report.section``)."""

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "optimem run record",
    "type": "object",
    "required": ["schema_version", "run_id", "status", "reason", "config", "measured", "predicted", "env"],
    "properties": {
        "schema_version": {"enum": list(SCHEMA_VERSIONS)},
        "run_id": {"type": "string", "minLength": 1},
        "status": {"enum": list(STATUSES)},
        "reason": {"type": "string"},
        "config": CONFIG_SCHEMA,
        "measured": {"anyOf": [{"type": "null"}, MEASURED_SCHEMA]},
        "predicted": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["model", "optim", "dtype", "bytes"],
                                                   "properties": {"bytes": {"type": "object",
                                                                            "required": ["optimizer_state"],
                                                                            "additionalProperties": _INT_OR_NULL},
                                                                  "phases": {"type": "object", "additionalProperties": {
                                                                      "type": "object",
                                                                      "additionalProperties": {"type": "integer"}}},
                                                                  "peak_phase": {"type": ["string", "null"]}}}]},
        "env": ENV_SCHEMA,
        "run": {"type": "object", "properties": {"source": {"enum": list(RUN_SOURCES)}}},
        "detail": {"type": ["string", "null"]},
        "distributed": DISTRIBUTED_SCHEMA,
    },
    "allOf": [
        {"if": {"properties": {"status": {"const": "ok"}}},
         "then": {"properties": {"measured": _OK_MEASURED, "reason": {"type": "string"}}}},
        {"if": {"properties": {"status": {"const": "ok"},
                               "run": {"not": {"required": ["source"], "properties": {"source": {"const": "callback"}}}}}},
         "then": {"properties": {"measured": {"properties": {"phases": {"required": ["model_load"]}}}}}},
        {"if": {"properties": {"status": {"enum": ["oom", "skipped", "error", "oom-predicted"]}}},
         "then": {"properties": {"reason": {"type": "string", "minLength": 1}}}},
    ],
}


def validate(record: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``record`` matches :data:`SCHEMA`."""
    _validator(None).validate(record)


def new_run_id() -> str:
    return uuid.uuid4().hex


def build_record(*, config: dict, status: str, reason: str, measured: dict | None, predicted: dict | None,
                 env: dict, run: dict | None = None, detail: str | None = None, run_id: str | None = None,
                 distributed: dict | None = None) -> dict:
    """Assemble a record in the schema's key order (does not validate). ``distributed``: a multi-process
    run's per-rank section (left out of single-process records)."""
    record = {"schema_version": SCHEMA_VERSION, "run_id": run_id or new_run_id(), "status": status,
              "reason": reason, "config": config, "measured": measured, "predicted": predicted, "env": env,
              "run": run or {}, "detail": detail}
    if distributed is not None:
        record["distributed"] = distributed
    return record


def to_line(record: dict) -> bytes:
    """The record as one UTF-8 JSON line ending in a newline (JSON never contains a raw newline)."""
    return (json.dumps(record, separators=(",", ":"), default=str, allow_nan=False) + "\n").encode("utf-8")


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _DeferSignals:
    """Hold SIGINT/SIGTERM/SIGHUP while the block runs, then deliver them to their usual handlers.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the kernel
    delivered the signal to, so the handlers themselves are swapped (masking the main thread alone is not
    enough when other threads exist). Outside the main thread handlers cannot be changed: nothing is held.
    """

    def __enter__(self):
        self.pending: list[int] = []
        self.saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                old = signal.getsignal(sig)
                if old is None:  # installed from C: leave it alone
                    continue
                self.saved[sig] = signal.signal(sig, lambda signum, frame: self.pending.append(signum))
        return self

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        for sig in dict.fromkeys(self.pending):
            signal.raise_signal(sig)
        return False


def append_record(path: str | os.PathLike, record: dict, *, validate_first: bool = True) -> Path:
    """Append ``record`` to the JSONL file ``path`` as one whole line, or not at all.

    The line is written with a single ``os.write`` on an ``O_APPEND`` descriptor and fsynced while
    SIGINT/SIGTERM/SIGHUP are held (they are delivered right after). If the file does not end in a
    newline (another writer was cut off), the record starts on a fresh line. A short write is rolled
    back by truncating to the previous size and raises ``OSError``. Concurrent optimem writers take
    turns through an advisory ``flock``.
    """
    if validate_first:
        validate(record)
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    data = to_line(record)
    with _DeferSignals():
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # optimem writers take turns; released by close()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            written = os.write(fd, data)
            if written != len(data):
                os.ftruncate(fd, size)
                raise OSError(f"short write to {path}: {written} of {len(data)} bytes (rolled back)")
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def lock_results(path: str | os.PathLike, holder: str = "bench sweep"):
    """Hold an advisory lock (``fcntl.flock``) on a results file for a whole sweep: a second sweep on the same
    file stops with a UserError naming the first (its pid) instead of running every configuration again.
    The lock is on ``<path>.lock`` beside the file (the appends' own per-line lock is on the file itself:
    ``bench run`` can still append while a sweep runs); the lock file is removed on exit, and a lock left by a
    killed sweep is released by the kernel with its process."""
    if fcntl is None:  # no advisory locks here (Windows): nothing to hold
        yield None
        return
    lock = Path(f"{path}{LOCK_SUFFIX}")
    if lock.parent and not lock.parent.exists():
        lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise UserError(f"{path} is being written by another sweep ({who}): wait for it to finish, or give "
                            "another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the lock file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}, pid {os.getpid()}".encode(), 0)
        yield lock
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


MAX_BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "group_key", "label", "config", "max_batch_size", "probes"],
    "properties": {
        "kind": {"const": "max_batch"}, "group_key": {"type": "string", "minLength": 1}, "label": {"type": "string"},
        "config": {"type": "object"}, "device": {"type": ["string", "null"]},
        "memory_limit_bytes": _INT_OR_NULL, "max_batch_size": _INT_OR_NULL, "first_failing_batch": _INT_OR_NULL,
        "capped": {"type": "boolean"}, "complete": {"type": "boolean"}, "reason": {"type": ["string", "null"]},
        "peak_bytes_at_max": _INT_OR_NULL, "probes": {"type": "array", "items": {"type": "object"}},
        "runs": _INT, "env": {"type": ["object", "null"]},
    },
}
"""A max-batch search's summary line (``<results>.max-batch.jsonl``, written by ``bench sweep --find-max-batch``)."""


@functools.cache
def _validator(kind: str | None):
    import jsonschema  # lazy: pulls in jsonschema, which importing this module does not

    return jsonschema.Draft202012Validator(MAX_BATCH_SCHEMA if kind == "max_batch" else SCHEMA)


def _why_invalid(obj: dict) -> str | None:
    """Why ``obj`` is not a record this optimem can read (None: it is one): the first schema error, as
    ``config.batch_size: 'abc' is not of type 'integer'``."""
    kind = obj.get("kind")
    if kind not in (None, "max_batch"):
        return None  # another kind of line (a tool's own): passed on, readers pick what they know
    errors = sorted(_validator(kind).iter_errors(obj), key=lambda e: (len(e.path), list(map(str, e.path))))
    if not errors:
        return None
    e = errors[0]
    where = ".".join(str(x) for x in e.absolute_path) or "the record"
    msg = e.message if len(e.message) <= 120 else e.message[:117] + "..."
    return f"{where}: {msg}"


@dataclass
class ReadReport:
    """What a reader of one results file kept and left out: ``records`` kept; per reason, the line numbers
    (1-based) of the lines skipped: ``torn`` (the file's last line, cut off mid-write: no newline, no whole
    JSON), ``not_json`` (not JSON, not UTF-8, or not a JSON object), ``invalid`` (a record that does not match
    :data:`SCHEMA`, with why) and ``future`` (a record of a newer ``schema_version`` than this optimem reads)."""

    path: str
    records: int = 0
    torn: list[int] = field(default_factory=list)
    not_json: list[int] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    future: list[tuple[int, Any]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.torn) + len(self.not_json) + len(self.invalid) + len(self.future)

    def summary(self, *, with_path: bool = True) -> str | None:
        """One line saying what was skipped and why (None when nothing was), led by the file's path."""
        if not self.skipped:
            return None

        def at(lines: list[int]) -> str:
            shown = ", ".join(str(n) for n in lines[:3]) + (", ..." if len(lines) > 3 else "")
            return f"line{'s' if len(lines) > 1 else ''} {shown}"

        parts = []
        if self.torn:
            parts.append(f"the last line cut off mid-write ({at(self.torn)}; left in place, it is never read)")
        if self.not_json:
            parts.append(f"{len(self.not_json)} not a JSON object ({at(self.not_json)})")
        if self.invalid:
            n, why = self.invalid[0]
            parts.append(f"1 not a valid record (line {n}: {why})" if len(self.invalid) == 1 else
                         f"{len(self.invalid)} not valid records ({at([i for i, _ in self.invalid])}; line {n}: {why})")
        if self.future:
            versions = sorted({str(v) for _, v in self.future})
            parts.append(f"{len(self.future)} of schema_version {'/'.join(versions)}, newer than this optimem reads "
                         f"({', '.join(map(str, SCHEMA_VERSIONS))}: update optimem) ({at([i for i, _ in self.future])})")
        total = self.records + self.skipped
        return (f"{self.path}: " if with_path else "") + f"skipped {self.skipped} of {total} lines: " + "; ".join(parts)


_REPORTED: set[tuple] = set()


def _report(report: ReadReport, key: tuple) -> None:
    """Print the report's summary on stderr, once per file state (a command that reads a file twice says it
    once)."""
    line = report.summary()
    if line and key not in _REPORTED:
        _REPORTED.add(key)
        print(f"bench: warning: {line}", file=sys.stderr)


def read_records(path: str | os.PathLike, *, report: ReadReport | None = None, quiet: bool = False,
                 check: bool = True) -> Iterator[dict]:
    """Every record in a JSONL results file, in file order, skipping blank lines and, with ``check``, what is
    not a record this optimem reads (lines cut off or not JSON, records that do not match :data:`SCHEMA` or
    :data:`MAX_BATCH_SCHEMA`, records of a newer schema version). What was skipped is counted in ``report``
    and, unless ``quiet``, said in one line on stderr when the file has been read to its end. Lines of other
    ``kind`` s pass unchecked. UserError for a file that cannot be read or is not text at all."""
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        st = os.stat(path)
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a results file (a JSONL file of records)") from None
    except OSError as exc:
        raise UserError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    head = data[:1 << 16]
    nul = head.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{path} is not a results file: it is binary (byte {nul} is NUL), not JSONL text")
    lines = data.split(b"\n")
    last = len(lines) - 1
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(lines[0]) and not any(_parses(ln) for ln in lines[:50]):
            raise UserError(f"{path} is not a results file: byte {exc.start} is not UTF-8 text (JSONL records "
                            "are UTF-8)") from None
    checked_key = _checked_key(data) if check else None
    known = _known_invalid(checked_key)
    invalid: dict[str, str] = {}
    for i, raw in enumerate(lines):
        text = raw.strip()
        if not text:
            continue
        obj = _parses(text)
        if not isinstance(obj, dict):
            (report.torn if i == last and obj is None else report.not_json).append(i + 1)
            continue
        if check:
            version = obj.get("schema_version")
            if obj.get("kind") is None and isinstance(version, int) and not isinstance(version, bool) \
                    and version > SCHEMA_VERSION:
                report.future.append((i + 1, version))
                continue
            why = known.get(str(i + 1)) if known is not None else _why_invalid(obj)
            if why is not None:
                invalid[str(i + 1)] = why
                report.invalid.append((i + 1, why))
                continue
        report.records += 1
        yield obj
    if checked_key is not None and known is None:
        cache.put(checked_key, invalid)
    if not quiet:
        _report(report, (str(path.resolve()), st.st_size, st.st_mtime_ns))


@functools.cache
def _schemas_digest() -> str:
    return hashlib.sha256(json.dumps([SCHEMA, MAX_BATCH_SCHEMA], sort_keys=True).encode()).hexdigest()


def _checked_key(data: bytes):
    """The on-disk cache key of a results file's schema check: its content and the schemas (a file read
    before is not validated again; validating is most of the time of reading one)."""
    return cache.key("records_checked", 1, content=hashlib.sha256(data).hexdigest(), schemas=_schemas_digest())


def _known_invalid(k) -> dict[str, str] | None:
    """Line number (text) -> why, of the lines of a file checked before that are not valid records (None:
    not checked before, or the cache is off)."""
    if k is None:
        return None
    got = cache.get(k)
    if not isinstance(got, dict) or not all(isinstance(v, str) for v in got.values()):
        return None
    return got


def _parses(raw: bytes):
    """The JSON value of one line (None when it is not JSON or not UTF-8)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


__all__ = ["LOCK_SUFFIX", "MAX_BATCH_SCHEMA", "RUN_SOURCES", "ReadReport", "SCHEMA", "SCHEMA_VERSION", "STATUSES",
           "append_record", "build_record", "new_run_id", "read_records",
           "to_line", "validate"]
