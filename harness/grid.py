"""Sweep grids and stable configuration keys.

A :class:`Grid` is the cross product optimizers x models x shapes (batch size x sequence length) x
parameter dtypes x mixed precision x gradient checkpointing x gradient accumulation, plus the settings
every run shares (steps, warmup, device, seed, per-optimizer ``optim_args``). It comes from the command
line or a YAML file (:func:`grid_from_mapping`) and expands, in a fixed order, to :class:`RunConfig` s.

:func:`config_key` is the identity of a run configuration across files, machines and time: a short hash
of the canonical configuration (optimizer and model names canonicalised, ``optim_args`` parsed and
sorted, a one-element target list unwrapped, ``device: auto`` replaced by the device it resolved to).
``bench sweep --resume`` and ``bench compare`` match records by it. :func:`config_label` is the same
configuration as a short human string.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from optimem.estimators import get_spec
from optimem.estimators.catalog import canonical_name, resolve
from optimem.estimators.errors import UserError, one_line
from optimem.estimators.optimizers import REGISTRY, names, parse_optim_args
from optimem.estimators.setup import CLI, DEFAULT_TARGETS, SetupError
from optimem.harness.commands.setup_args import field_defaults
from optimem.harness.run_config import RunConfig
from optimem.harness.units import human_bytes

KEY_FIELDS: tuple[str, ...] = ("model", "optim", "dtype", "mixed_precision", "batch_size", "seq_len", "grad_accum",
                               "gradient_checkpointing", "optim_args", "optim_target_modules", "steps", "warmup",
                               "device", "seed", "data", "extra")
"""The configuration fields a key covers (every field of :class:`optimem.harness.scenario.RunConfig`)."""



# ----------------------------------------------------------------------------------------------- keys
def _canonical_optim(name: Any) -> Any:
    try:
        return get_spec(str(name)).name
    except UserError:
        return str(name).strip().lower()


def _canonical_model(name: Any) -> Any:
    return canonical_name(name)  # never fetches: a Hub id stays as given


def _canonical_optim_args(text: Any) -> Any:
    if text in (None, ""):
        return None
    if isinstance(text, dict):
        pairs = {str(k): str(v) for k, v in text.items()}
    else:
        try:
            pairs = parse_optim_args(str(text))
        except UserError:
            return str(text)
    return ",".join(f"{k}={v}" for k, v in sorted(pairs.items())) or None


def _canonical_targets(targets: Any) -> Any:
    if targets in (None, "", []):
        return None
    if isinstance(targets, (list, tuple)):
        return targets[0] if len(targets) == 1 else list(targets)
    return targets


def canonical_config(config: dict, resolved_device: str | None = None) -> dict:
    """The fields of ``config`` that identify a run, normalised (see the module doc)."""
    c = dict(config)
    out: dict[str, Any] = {}
    out["model"] = _canonical_model(c.get("model"))
    out["optim"] = _canonical_optim(c.get("optim"))
    out["dtype"] = c.get("dtype") or "fp32"
    mp = c.get("mixed_precision")
    out["mixed_precision"] = None if mp in (None, "", "none", "no") else mp
    for name, default in (("batch_size", 1), ("seq_len", 1), ("grad_accum", 1), ("steps", 1), ("warmup", 0),
                          ("seed", 0)):
        value = c.get(name, default)
        out[name] = int(value) if value is not None else None
    out["gradient_checkpointing"] = bool(c.get("gradient_checkpointing", False))
    out["optim_args"] = _canonical_optim_args(c.get("optim_args"))
    out["optim_target_modules"] = _canonical_targets(c.get("optim_target_modules"))
    device = c.get("device") or "auto"
    if device == "auto" and resolved_device:
        device = resolved_device
    out["device"] = device
    out["data"] = c.get("data") or None
    extra = {k: v for k, v in sorted((c.get("extra") or {}).items()) if v is not None}
    out["extra"] = extra
    # Fields added since the first records (task, attention, freezing, processes, sharding...): part of the
    # identity only where they differ from their default, so older records keep their keys.
    defaults = _field_defaults()
    for k in sorted(set(c) - set(KEY_FIELDS)):
        v = c[k]
        if v is None or (k in defaults and v == defaults[k]):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _field_defaults() -> dict[str, Any]:
    return field_defaults(RunConfig)


def config_key(config: dict, resolved_device: str | None = None) -> str:
    """A stable 16-hex-digit key for a run configuration (see the module doc)."""
    canon = canonical_config(config, resolved_device)
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_key(record: dict) -> str:
    """:func:`config_key` of a record's configuration, with the device the run resolved to."""
    run = record.get("run") or {}
    env = record.get("env") or {}
    return config_key(record.get("config") or {}, run.get("resolved_device") or env.get("device"))


def shape_label(config: dict) -> str:
    shape = f"b{config.get('batch_size')}xs{config.get('seq_len')}"
    if (config.get("grad_accum") or 1) > 1:
        shape += f"xa{config['grad_accum']}"
    return shape


def precision_label(config: dict) -> str:
    text = config.get("dtype") or "fp32"
    if config.get("mixed_precision"):
        text += f"+{config['mixed_precision']}-amp"
    return text


def config_label(config: dict, *, with_optim: bool = True) -> str:
    """``adamw_torch tiny-llama b2xs64 fp32`` plus ``ckpt``, optim_args, the newer setup fields that are not at
    their defaults (``attn_implementation=eager``) and extras when set."""
    parts = [str(config.get("optim"))] if with_optim else []
    parts += [str(config.get("model")), shape_label(config), precision_label(config)]
    if config.get("gradient_checkpointing"):
        parts.append("ckpt")
    args = _canonical_optim_args(config.get("optim_args"))
    if args:
        parts.append(f"[{args}]")
    defaults = _field_defaults()
    for k in sorted(set(config) - set(KEY_FIELDS)):  # newer setup fields, where they differ from the default
        v = config[k]
        if v is not None and not (k in defaults and v == defaults[k]):
            parts.append(f"{k}={v}")
    extra = config.get("extra") or {}
    if extra.get("memory_limit_bytes"):
        parts.append(f"limit {human_bytes(extra['memory_limit_bytes'])}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ values
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: Any) -> int:
    """'4GiB', '512 MB', '1.5g', '123456' -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB); exact
    (no float rounding), positive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not 0 < text < float("inf"):
            raise UserError(f"memory size must be a positive number of bytes, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([-+]?)([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(3).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise UserError(f"cannot read memory size {text!r}: give bytes or a number with a unit, e.g. 4GiB, 512MB")
    value = int(Fraction(m.group(2)) * _SIZE_UNITS[unit])
    if m.group(1) == "-" or value <= 0:
        raise UserError(f"memory size must be positive (at least 1 byte), got {text!r}")
    return value


def parse_shape(text: str) -> tuple[int, int]:
    """'4x128' -> (batch 4, seq_len 128)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"cannot read shape {text!r}: give BATCHxSEQ_LEN, e.g. 4x128")
    return int(m.group(1)), int(m.group(2))


def _flatten(values: Any, *, split: bool = True) -> list:
    """Scalars, lists and (with ``split``) comma-separated strings -> a flat list (order kept, duplicates
    dropped)."""
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        values = [values]
    out: list = []
    for v in values:
        items = [s.strip() for s in v.split(",")] if split and isinstance(v, str) and "," in v else [v]
        for item in items:
            if item == "" or item in out:
                continue
            out.append(item)
    return out


def _positive_ints(values: Any, what: str) -> list[int]:
    out = []
    for v in _flatten(values):
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise UserError(f"{what} must be positive integers, got {v!r}") from None
        if n < 1 or isinstance(v, bool) or (isinstance(v, float) and v != n):
            raise UserError(f"{what} must be positive integers, got {v!r}")
        out.append(n)
    return out


def _switch(values: Any, what: str) -> list[bool]:
    """``on``, ``off``, ``both`` (or booleans) -> the boolean values of a switch axis."""
    out: list[bool] = []
    for v in _flatten(values):
        text = str(v).lower()
        if text == "both":
            opts = [False, True]
        elif v is True or text in ("on", "true", "yes", "1"):
            opts = [True]
        elif v is False or text in ("off", "false", "no", "0"):
            opts = [False]
        else:
            raise UserError(f"{what} must be on, off or both, got {v!r}")
        out += [o for o in opts if o not in out]
    return out


def _axis_values(field: str, values: Any) -> list:
    """The values of one grid axis, converted as the command line converts them; the setup validates them."""
    flag = CLI[field]
    if flag.switch:
        return _switch(values, field.replace("_", " "))
    if flag.type is int:
        return _positive_ints(values, field.replace("_", " "))
    return _flatten(values, split=flag.metavar != "REGEX" and not flag.commas)


# ------------------------------------------------------------------------------------- optimizers
def families() -> dict[str, list[str]]:
    """Family -> the names in it that optimem can estimate and run (registry order)."""
    out: dict[str, list[str]] = {}
    for name, spec in REGISTRY.items():
        if spec.availability == "ok":
            out.setdefault(spec.family, []).append(name)
    return out


def select_optimizers(tokens: Any, named: set[str] | None = None) -> list[str]:
    """Optimizer names from ``all``, family names (``family:NAME`` when a family shares an optimizer's
    name), optimizer names, in any mix and comma-separated; duplicates dropped, order kept.
    ``all`` is every name optimem can estimate (removed and unsupported ones are left out). ``named``
    collects the names given one by one (not through a family or ``all``)."""
    fams = families()
    out: list[str] = []
    for token in _flatten(tokens):
        t = str(token).strip().lower()
        if t == "all":
            chosen = names(include_unavailable=False)
        elif t.startswith("family:"):
            fam = t.split(":", 1)[1]
            if fam not in fams:
                raise UserError(f"unknown optimizer family {fam!r}: known families: {', '.join(sorted(fams))}")
            chosen = fams[fam]
        elif t in REGISTRY:
            chosen = [REGISTRY[t].name]
            named is not None and named.add(chosen[0])
        elif t in fams:
            chosen = fams[t]
        else:
            try:
                chosen = [get_spec(t).name]
            except UserError as exc:
                raise UserError(f"{exc} (or a family: {', '.join(sorted(fams))}; or 'all')") from None
            named is not None and named.add(chosen[0])
        out += [n for n in chosen if n not in out]
    if not out:
        raise UserError("no optimizers selected: give --optim NAME, a family, or all")
    return out


# ------------------------------------------------------------------------------------------- grid
AXES: tuple[str, ...] = tuple(f for f in CLI if f not in ("batch_size", "seq_len", "optim", "optim_args",
                                                          "optim_target_modules"))
"""Setup fields a grid may list several values of, besides the shapes and the optimizers (every setup field
whose value is not a list of its own); expanded outermost first, then shapes, then optimizers."""
RUN_SETTINGS = ("steps", "warmup", "seed", "data")
"""Run-only fields every run of a grid shares."""


@dataclass
class Grid:
    """A sweep: the cross product of ``axes`` (setup field -> values), ``shapes`` (batch x sequence length)
    and ``optims``, with the settings every run shares (``runs``: steps, warmup, seed, data; per-optimizer
    ``optim_args``; ``optim_target_modules``)."""

    optims: list[str]
    axes: dict[str, list] = field(default_factory=dict)
    shapes: list[tuple[int, int]] = field(default_factory=lambda: [(2, 64)])
    runs: dict[str, Any] = field(default_factory=lambda: {"steps": 6, "warmup": 2})
    optim_args: dict[str, str] = field(default_factory=dict)
    """``{optimizer name, family or '*': optim_args string}``; the most specific entry wins."""
    optim_target_modules: Any = None
    named: set[str] = field(default_factory=set)
    """The optimizers given by name (not through a family or ``all``): a setup the Trainer refuses for one of
    them is an error; for the others, that optimizer is left out of the sweep with a note."""

    def args_for(self, optim: str) -> str | None:
        spec = get_spec(optim)
        for k in (spec.name, f"family:{spec.family}", spec.family, "*"):
            if k in self.optim_args:
                return self.optim_args[k]
        return None

    def targets_for(self, optim: str) -> Any:
        if not get_spec(optim).needs_target_modules:
            return None
        return _canonical_targets(self.optim_target_modules) or DEFAULT_TARGETS

    def size(self) -> int:
        n = len(self.optims) * len(self.shapes)
        for values in self.axes.values():
            n *= len(values)
        return n

    def configs(self, *, extra: dict | None = None, source: str = "grid") -> list:
        """Every :class:`RunConfig` (each validated as it is built: a bad value is a UserError naming
        ``source``), in axis order, then shape, then optimizer; duplicates (values that normalise alike)
        once."""
        names = [f for f in AXES if f in self.axes]
        out, seen = [], set()
        for combo in itertools.product(*(self.axes[f] for f in names), self.shapes, self.optims):
            *values, (batch, seq), optim = combo
            try:
                cfg = RunConfig(**dict(zip(names, values)), batch_size=batch, seq_len=seq, optim=optim,
                                optim_args=self.args_for(optim), optim_target_modules=self.targets_for(optim),
                                **self.runs, extra=dict(extra or {}))
            except SetupError as exc:
                raise SetupError(str(exc) if source == "command line" else f"{source}: {exc}", exc.field) from None
            key = config_key(cfg.to_dict())
            if key not in seen:
                seen.add(key)
                out.append(cfg)
        return out


GRID_KEYS = {"model", "shape", *CLI, *RUN_SETTINGS} - {"num_processes"} | {"nproc"}
"""Keys a YAML grid may hold besides the sweep settings of :data:`SETTING_KEYS` (setup fields by their
names, ``shape`` for BxS pairs, ``nproc`` for the processes)."""
SETTING_KEYS = {"out", "resume", "retry_failed", "timeout", "jobs", "threads", "track_tensors", "find_max_batch",
                "memory_limit", "max_batch_cap", "repeat"}


def _optim_args_mapping(value: Any) -> dict[str, str]:
    """``'rank=16'`` (every optimizer), ``'galore_adamw:rank=16'`` or a mapping -> ``{target: args}``."""
    out: dict[str, str] = {}
    if value is None:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out[str(k).strip().lower()] = None if v is None else str(v)
        return out
    for item in value if isinstance(value, (list, tuple)) else [value]:
        text = str(item)
        head, sep, rest = text.partition(":")
        if sep and "=" not in head:
            if head.strip().lower() == "family" and ":" in rest:  # 'family:NAME:ARGS'
                name, _, rest = rest.partition(":")
                head = f"family:{name.strip()}"
            out[head.strip().lower()] = rest
        else:
            out["*"] = text
    return out


def grid_from_mapping(data: dict, *, source: str = "grid") -> Grid:
    """Build a :class:`Grid` from a mapping with the :data:`GRID_KEYS` (hyphens or underscores); every
    configuration it expands to is validated here, before anything runs. A bad value is a UserError led by
    ``source`` (the sweep file, or ``command line``)."""
    try:
        return _grid_from_mapping(data, source)
    except SetupError:
        raise  # already names the source and its field
    except UserError as exc:
        text = str(exc)
        named = text.startswith((f"{source}:", "--")) or source == "command line"
        raise UserError(text if named else f"{source}: {text}") from None


class _key:
    """``with _key(source, name):`` -- a UserError raised inside is led by where the value came from: the flag
    (``--batch-size``) on the command line, ``FILE: batch_size`` in a sweep file."""

    def __init__(self, source: str, name: str):
        self.where = f"--{name.replace('_', '-')}" if source == "command line" else f"{source}: {name}"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, UserError) and not isinstance(exc, SetupError):
            raise UserError(f"{self.where}: {exc}") from None
        return False


def _grid_from_mapping(data: dict, source: str) -> Grid:
    data = {str(k).replace("-", "_"): v for k, v in (data or {}).items() if v is not None}
    if "nproc" in data:
        data["num_processes"] = data.pop("nproc")
    unknown = set(data) - GRID_KEYS - SETTING_KEYS - {"num_processes"}
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(GRID_KEYS | SETTING_KEYS))}")
    if "optim" not in data:
        raise UserError(f"{source}: no optimizers: give optim (a name, a family, a list, or all)")
    if "shape" in data and ("batch_size" in data or "seq_len" in data):
        raise UserError(f"{source}: give either shape (BxS pairs) or batch_size/seq_len lists, not both")
    if "shape" in data:
        with _key(source, "shape"):
            shapes = [parse_shape(s) if not isinstance(s, (list, tuple)) else tuple(_positive_ints(s, "shape"))
                      for s in _flatten(data["shape"])]
            if any(len(s) != 2 for s in shapes):
                raise UserError(f"a shape is a (batch, sequence length) pair, got {data['shape']!r}")
    else:
        with _key(source, "batch_size"):
            batches = _positive_ints(data.get("batch_size", 2), "batch sizes") or [2]
        with _key(source, "seq_len"):
            seqs = _positive_ints(data.get("seq_len", 64), "sequence lengths") or [64]
        shapes = [(b, s) for b in batches for s in seqs]
    named: set[str] = set()
    with _key(source, "optim"):
        grid = Grid(optims=select_optimizers(data["optim"], named), shapes=shapes, named=named)
    axes = {}
    for f in AXES:
        if f in data:
            with _key(source, f):
                axes[f] = _axis_values(f, data[f])
    grid.axes = {f: v for f, v in axes.items() if v}
    for name in ("steps", "warmup", "seed"):
        if name in data:
            value = data[name]
            with _key(source, name):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise UserError(f"{name} must be an integer, got {value!r}")
            grid.runs[name] = value
    if grid.runs["steps"] < 2:
        with _key(source, "steps"):
            raise UserError(f"steps must be at least 2 (step 0 has no optimizer state yet), got {grid.runs['steps']}")
    if data.get("data"):
        grid.runs["data"] = data["data"]
    with _key(source, "optim_args"):
        grid.optim_args = _optim_args_mapping(data.get("optim_args"))
        _check_optim_args_targets(grid)
    grid.optim_target_modules = data.get("optim_target_modules")
    for model in grid.axes.get("model", []):
        with _key(source, "model"):
            _canonical_check_model(model)
    grid.configs(source=source)  # validates every configuration before any runs
    return grid


def _check_optim_args_targets(grid: Grid) -> None:
    """Every ``NAME:ARGS`` of ``optim_args`` names an optimizer or a family of the sweep (else the args would
    be silently ignored)."""
    fams = families()
    specs = [get_spec(o) for o in grid.optims]
    for target in grid.optim_args:
        if target == "*":
            continue
        fam = target.split(":", 1)[1] if target.startswith("family:") else None
        hit = any(target == s.name or (fam or target) == s.family for s in specs)
        if hit:
            continue
        try:
            what = f"optimizer {get_spec(target).name}" if fam is None else None
        except UserError:
            what = None
        if what is None and (fam or target) in fams:
            what = f"family {fam or target}"
        if what is None:
            raise UserError(f"optim_args for {target!r}: no optimizer or family of that name (see 'bench optims'); "
                            "give NAME:ARGS with a name of the sweep, or ARGS for all of them")
        raise UserError(f"optim_args for {what}, which is not in the sweep (optimizers: "
                        f"{', '.join(grid.optims)}): the args would apply to nothing; drop them or add it to --optim")


def _canonical_check_model(model: str) -> None:
    resolve(model)  # UserError for an unknown model, before anything runs


def load_yaml(path: str | Path) -> dict:
    """A sweep file: a YAML mapping of grid keys and sweep settings."""
    import yaml  # lazy: pulls in yaml, which importing this module does not

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"sweep file {path} is not a YAML text file (byte {exc.start} is not UTF-8)") from None
    except IsADirectoryError:
        raise UserError(f"sweep file {path} is a directory: give a YAML file") from None
    except OSError as exc:
        raise UserError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"sweep file {path} is not valid YAML: {one_line(exc, 10**6)}") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file {path} must hold a mapping (optim: ..., model: ..., batch_size: ...)")
    return data


__all__ = ["AXES", "DEFAULT_TARGETS", "GRID_KEYS", "Grid", "KEY_FIELDS", "SETTING_KEYS", "canonical_config", "config_key",
           "config_label", "families", "grid_from_mapping", "load_yaml", "parse_shape", "parse_size", "precision_label",
           "record_key", "select_optimizers", "shape_label"]
