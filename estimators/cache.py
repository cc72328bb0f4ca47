"""A persistent on-disk cache of what is costly to derive from a model config.

Building a parameter inventory means importing transformers' modeling code (seconds) to construct a meta
model (milliseconds); tracing a training step takes seconds per model and setting. Both
depend only on data: the config's content, the setting, and the code that derived them. This module stores
such results between processes, so a second ``bench estimate`` or ``bench plan`` of the same model imports
neither torch nor transformers.

An entry is named by a :class:`Key`: a namespace (``inventory``, ``trace``...), the namespace's payload
version (bump it when the payload's layout changes), the parts that say what the entry was derived from
(the config's content hash, the setting, ...) and :func:`versions` (torch, transformers, optimem, and a digest
of optimem's estimator sources, so an edited checkout never reads entries its old code wrote). The key's
SHA-256 names the file, ``<cache dir>/<namespace>/<digest>.json`` (or ``.npz`` for arrays), and the file holds
the whole key document beside the payload. A read that finds a file that does not parse, another key
document, or a payload the caller's decoder rejects is a miss: the caller rebuilds the value and the entry is
overwritten. Writes go to a temporary file in the same directory, then ``os.replace``: a reader sees the old
entry or the new one, never part of one. The cache is an optimisation only: when its directory cannot be
written, values are simply rebuilt.

Where: ``$OPTIMEM_CACHE_DIR`` if set, else the platform's user cache directory (``platformdirs``; on Linux
``~/.cache/optimem``). ``OPTIMEM_NO_CACHE=1`` (or ``--no-cache`` on the ``bench`` commands) turns it off:
nothing is read or written. ``python -m optimem.estimators.cache`` shows the directory and its entries;
``--clear`` empties it.

>>> k = key("trace", 1, config=inv.config_hash, setting={"dtype": "bf16", "gc": True})  # doctest: +SKIP
>>> memo(k, build=lambda: expensive(), encode=to_json, decode=from_json)              # doctest: +SKIP
>>> memo_arrays(k, build=lambda: trace(), encode=to_arrays, decode=from_arrays)       # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

FORMAT = 1
"""Layout of an entry file (``{"format", "key", "payload"}``); entries of another format are misses."""
ENV_DIR = "OPTIMEM_CACHE_DIR"
ENV_OFF = "OPTIMEM_NO_CACHE"
APP_NAME = "optimem"
SOURCE_ROOT = Path(__file__).resolve().parent
"""The estimator package: its ``*.py`` sources are part of every key (see :func:`versions`)."""


# ---------------------------------------------------------------------------------------- settings
def enabled() -> bool:
    """Whether the cache is read and written (``OPTIMEM_NO_CACHE`` unset, empty or ``0``)."""
    return os.environ.get(ENV_OFF, "").strip().lower() in ("", "0", "false", "no")


def disable() -> None:
    """Turn the cache off for this process and the processes it starts (``--no-cache``)."""
    os.environ[ENV_OFF] = "1"


def cache_dir() -> Path:
    """``$OPTIMEM_CACHE_DIR``, else the platform's user cache directory for optimem."""
    override = os.environ.get(ENV_DIR, "").strip()
    if override:
        return Path(override).expanduser()
    import platformdirs  # lazy: pulls in platformdirs, which importing this module does not

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _dist_version(name: str) -> str:
    return _installed_version(name) or "absent"


def library_versions() -> dict[str, str | None]:
    """The installed peft and bitsandbytes versions (package metadata: nothing is imported; None: absent)."""
    return {"peft": _installed_version("peft"), "bitsandbytes": _installed_version("bitsandbytes")}


@functools.cache
def source_digest() -> str:
    """SHA-256 (16 hex digits) of the estimator package's Python sources, path by path."""
    h = hashlib.sha256()
    for path in sorted(SOURCE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(SOURCE_ROOT)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def versions() -> dict[str, str]:
    """The code an entry depends on: installed torch, transformers and optimem versions (read from package
    metadata, so nothing is imported) and :func:`source_digest`."""
    return {"torch": _dist_version("torch"), "transformers": _dist_version("transformers"),
            "optimem": _dist_version("optimem"), "source": source_digest()}


# ---------------------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class Key:
    """The name of one entry. ``parts`` are JSON values (sorted by name); see the module doc."""

    namespace: str
    version: int
    parts: tuple[tuple[str, Any], ...]

    def document(self) -> dict[str, Any]:
        """What the entry was derived from, as stored in its file."""
        return {"namespace": self.namespace, "version": self.version, "parts": dict(self.parts),
                "versions": versions()}

    @functools.cached_property
    def canonical(self) -> str:
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":"))

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical.encode()).hexdigest()

    def path(self, suffix: str = ".json") -> Path:
        return cache_dir() / self.namespace / f"{self.digest}{suffix}"


def key(namespace: str, version: int, **parts: Any) -> Key:
    """A :class:`Key`. ``parts`` must be JSON values (tuples become lists): the config's content hash and
    everything about the setting the entry depends on."""
    if not namespace.isidentifier():
        raise ValueError(f"cache namespace must be an identifier, got {namespace!r}")
    normal = json.loads(json.dumps(parts, sort_keys=True))  # JSON-only values, fails early otherwise
    return Key(namespace, int(version), tuple(sorted(normal.items())))


# ------------------------------------------------------------------------------------------ reading
def _matches(doc: Any, k: Key) -> bool:
    return isinstance(doc, dict) and json.dumps(doc, sort_keys=True, separators=(",", ":")) == k.canonical


def get(k: Key) -> Any | None:
    """The JSON payload stored under ``k``, or None (absent, unreadable, corrupt, another key, or off)."""
    if not enabled():
        return None
    try:
        with open(k.path(".json"), "rb") as fh:
            entry = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not _matches(entry.get("key"), k):
        return None
    return entry.get("payload")


def get_arrays(k: Key) -> dict[str, Any] | None:
    """The numpy arrays stored under ``k`` by :func:`put_arrays`, or None (as :func:`get`)."""
    if not enabled():
        return None
    try:
        with np.load(k.path(".npz"), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        doc = json.loads(str(arrays.pop("__key__")))
        fmt = int(arrays.pop("__format__"))
    except Exception:  # noqa: BLE001 - a truncated zip, garbage, a missing member: all misses
        return None
    if fmt != FORMAT or not _matches(doc, k):
        return None
    return arrays


# ------------------------------------------------------------------------------------------ writing
def _write_atomic(path: Path, write: Callable[[Any], None]) -> bool:
    """``write(binary file)`` into a temporary file beside ``path``, then rename it over ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:12]}-", suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
        return True
    except Exception:  # noqa: BLE001 - a full disk or an unserialisable payload: no entry, no error
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def put(k: Key, payload: Any) -> bool:
    """Store a JSON payload under ``k`` (atomically); False when the cache is off or cannot be written."""
    if not enabled():
        return False
    try:
        data = json.dumps({"format": FORMAT, "key": k.document(), "payload": payload},
                          separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return False
    return _write_atomic(k.path(".json"), lambda fh: fh.write(data))


def put_arrays(k: Key, arrays: Mapping[str, Any]) -> bool:
    """Store numpy arrays (no object arrays) under ``k`` as an ``.npz`` holding the key document too."""
    if not enabled():
        return False
    members = {str(n): np.asarray(a) for n, a in arrays.items()}
    if "__key__" in members or "__format__" in members or any(a.dtype.hasobject for a in members.values()):
        raise ValueError("put_arrays takes plain numeric/string arrays, not named __key__/__format__")
    members["__key__"] = np.array(k.canonical)
    members["__format__"] = np.array(FORMAT)
    return _write_atomic(k.path(".npz"), lambda fh: np.savez(fh, **members))


def memo(k: Key, build: Callable[[], T], *, encode: Callable[[T], Any] = lambda v: v,
         decode: Callable[[Any], T] = lambda p: p) -> T:
    """The value stored under ``k`` (``decode(payload)``), else ``build()``, stored as ``encode(value)``.

    A payload that ``decode`` rejects (any exception) is treated as absent, rebuilt and overwritten, so a
    corrupt or stale entry is never trusted."""
    payload = get(k)
    if payload is not None:
        try:
            return decode(payload)
        except Exception:  # noqa: BLE001 - see the docstring
            pass
    value = build()
    if enabled():
        try:
            encoded = encode(value)
        except Exception:  # noqa: BLE001 - a value that cannot be stored is still returned
            return value
        put(k, encoded)
    return value


def memo_arrays(k: Key, build: Callable[[], T], *, encode: Callable[[T], Mapping[str, Any]] = lambda v: v,
                decode: Callable[[dict[str, Any]], T] = lambda a: a) -> T:
    """:func:`memo` for values stored as numpy arrays (``encode(value)``: ``{name: array}``), in an ``.npz``."""
    arrays = get_arrays(k)
    if arrays is not None:
        try:
            return decode(arrays)
        except Exception:  # noqa: BLE001 - as memo
            pass
    value = build()
    if enabled():
        try:
            put_arrays(k, encode(value))
        except Exception:  # noqa: BLE001
            pass
    return value


# ---------------------------------------------------------------------------------------- housekeeping
def entries(namespace: str | None = None) -> list[Path]:
    """Entry files in the cache (one namespace or all)."""
    root = cache_dir()
    where = [root / namespace] if namespace else ([p for p in root.iterdir() if p.is_dir()] if root.is_dir() else [])
    return sorted(p for d in where if d.is_dir() for p in d.iterdir()
                  if p.suffix in (".json", ".npz") and not p.name.startswith("."))


def clear(namespace: str | None = None) -> int:
    """Remove entries (one namespace or all); returns how many."""
    n = 0
    for p in entries(namespace):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def main(argv: list[str] | None = None) -> int:
    """``python -m optimem.estimators.cache [--clear] [--namespace NS]``: where the cache is and what it holds."""
    ap = argparse.ArgumentParser(prog="python -m optimem.estimators.cache", description=main.__doc__)
    ap.add_argument("--clear", action="store_true", help="remove the entries")
    ap.add_argument("--namespace", default=None, help="only this namespace (inventory, trace, ...)")
    args = ap.parse_args(argv)
    root = cache_dir()
    state = "on" if enabled() else f"off ({ENV_OFF} is set)"
    print(f"optimem cache: {root} ({state}; {ENV_DIR} overrides the directory)")
    if args.clear:
        print(f"removed {clear(args.namespace)} entries")
        return 0
    counts: dict[str, list[int]] = {}
    for p in entries(args.namespace):
        c = counts.setdefault(p.parent.name, [0, 0])
        c[0] += 1
        c[1] += p.stat().st_size
    for ns, (n, size) in sorted(counts.items()):
        print(f"  {ns}: {n} entries, {size / 1024:.1f} KiB")
    if not counts:
        print("  (empty)")
    return 0


__all__ = ["ENV_DIR", "ENV_OFF", "FORMAT", "Key", "cache_dir", "clear", "disable", "enabled", "entries", "get",
           "get_arrays", "key", "library_versions", "memo", "memo_arrays", "put", "put_arrays", "source_digest", "versions"]

if __name__ == "__main__":
    raise SystemExit(main())
