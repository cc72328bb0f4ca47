"""The run record: one JSON object per run, its JSON Schema, and the atomic JSONL append.

A record holds ``schema_version``, ``run_id``, the full ``config``, ``status`` (``ok``, ``oom``,
``skipped``, ``error``) with a one-line ``reason``, ``measured`` (bytes and seconds; ``null`` when
nothing ran), ``predicted`` (``estimators.estimate(...).to_dict()`` for the same configuration, or
``null`` when the optimizer cannot be estimated), ``env`` (machine and package facts), ``run`` (launch
facts) and ``detail`` (an error's traceback tail, else ``null``).

:func:`append_record` writes a record as one line with a single ``os.write`` on a descriptor opened
with ``O_APPEND`` and fsyncs it, with SIGINT/SIGTERM/SIGHUP held for the duration: a file of records
only ever gains whole lines. :func:`read_records` skips any line that does not parse (a file some other
tool truncated).
"""
from __future__ import annotations

import json
import os

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from estimators.inventory import DTYPES
from estimators.setup import ATTN_IMPLEMENTATIONS, DEVICES, MIXED_PRECISIONS, SHARDINGS, TASKS

SCHEMA_VERSION = 2
"""2: the config holds the whole training setup (task, attention implementation, freeze, processes,
sharding); version-1 records read back with those at their defaults."""
SCHEMA_VERSIONS = (1, 2)
STATUSES = ("ok", "oom", "skipped", "error")

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
        "phases": {"type": "object",
                   "required": ["model_load", "step0.forward", "step0.backward", "step0.optimizer_step"]},
    },
}

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
"""A record's ``config``: :meth:`harness.run_config.RunConfig.to_dict` (the fields of schema version 1 are
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
                                                                            "required": ["optimizer_state"]}}}]},
        "env": ENV_SCHEMA,
        "run": {"type": "object"},
        "detail": {"type": ["string", "null"]},
    },
    "allOf": [
        {"if": {"properties": {"status": {"const": "ok"}}},
         "then": {"properties": {"measured": _OK_MEASURED, "reason": {"type": "string"}}}},
        {"if": {"properties": {"status": {"enum": ["oom", "skipped", "error"]}}},
         "then": {"properties": {"reason": {"type": "string", "minLength": 1}}}},
    ],
}


def validate(record: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``record`` matches :data:`SCHEMA`."""
    import jsonschema

    jsonschema.Draft202012Validator(SCHEMA).validate(record)


def new_run_id() -> str:
    return uuid.uuid4().hex


def build_record(*, config: dict, status: str, reason: str, measured: dict | None, predicted: dict | None,
                 env: dict, run: dict | None = None, detail: str | None = None, run_id: str | None = None) -> dict:
    """Assemble a record in the schema's key order (does not validate)."""
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id or new_run_id(), "status": status,
            "reason": reason, "config": config, "measured": measured, "predicted": predicted, "env": env,
            "run": run or {}, "detail": detail}


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


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Every record in a JSONL file, skipping blank and unparseable lines."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


__all__ = ["SCHEMA", "SCHEMA_VERSION", "STATUSES", "append_record", "build_record", "new_run_id", "read_records",
           "to_line", "validate"]
