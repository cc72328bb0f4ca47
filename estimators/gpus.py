"""The GPU catalog: one place for every GPU fact (memory, CUDA context, dense TFLOP/s per compute dtype including
tf32, HBM bandwidth) and for matching a device name torch reports to a catalog entry.

Data lives in ``estimators/gpus.json`` (a user adds GPUs with a JSON/YAML file of the same shape). Memory in bytes,
throughput in FLOP/s, bandwidth in GB/s.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

GPU_CATALOG = Path(__file__).with_name("gpus.json")
GIB = 1 << 30

DEFAULT_HEADROOM = 0.05
"""Fraction of a GPU's usable memory kept free for the caching allocator's fragmentation (an assumption)."""


@dataclass(frozen=True)
class GPU:
    """One catalog GPU. Memory in bytes, ``tflops`` dense TFLOP/s per compute dtype, bandwidth in GB/s."""

    id: str
    name: str
    vendor: str
    memory_gb: float
    reported_bytes: int | None
    context_bytes: int
    tflops: Mapping[str, float | None]
    bandwidth_gbs: float | None
    match: tuple[str, ...] = ()
    arch: str = ""
    source: str = ""
    unsure: tuple[str, ...] = ()
    usd_per_hour: float | None = None
    notes: str = ""

    @property
    def total_bytes(self) -> int:
        """What torch reports as total memory (the datasheet's decimal GB when not known: conservative)."""
        return self.reported_bytes if self.reported_bytes is not None else int(self.memory_gb * 1e9)

    @property
    def usable_bytes(self) -> int:
        """Memory left for tensors once the CUDA context is up."""
        return self.total_bytes - self.context_bytes

    def budget(self, headroom: float = DEFAULT_HEADROOM) -> int:
        """Bytes a predicted peak may reach: usable memory less the allocator headroom."""
        return int(self.usable_bytes * (1.0 - headroom))

    def peak_flops(self, compute_dtype: str) -> float | None:
        """Dense peak FLOP/s for matmuls in ``compute_dtype`` (``bf16``, ``fp16``, ``tf32``, ``fp32``), None if none."""
        t = self.tflops.get(compute_dtype)
        return float(t) * 1e12 if t else None

    def matches(self, device_name: str) -> bool:
        """Whether ``device_name`` (as torch reports it) names this GPU: a match fragment found as a whole word."""
        return any(re.search(rf"(?<![A-Za-z0-9]){re.escape(f)}(?![A-Za-z0-9])", device_name, re.I)
                   for f in self.match)


def _gpu_from_dict(d: Mapping[str, Any], where: str) -> GPU:
    if not isinstance(d, Mapping):
        raise UserError(f"{where}: a GPU entry must be a mapping (id, memory_gb, tflops...), got {d!r:.80}")
    try:
        gid = str(d["id"]).strip().lower()
        mem = float(d["memory_gb"]) if d.get("memory_gb") is not None else None
        reported = d.get("reported_gib")
        if mem is None and reported is None:
            raise KeyError("memory_gb")
        tflops = {str(k).lower(): (float(v) if v is not None else None) for k, v in (d.get("tflops") or {}).items()}
        ctx = float(d.get("context_gib", 0.5))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{where}: GPU entry {dict(d).get('id', '?')!r} is malformed ({exc!s}); each needs id, "
                        "memory_gb (or reported_gib) and tflops {bf16: ..., fp16: ..., fp32: ...}") from None
    if not any(tflops.values()):
        raise UserError(f"{where}: GPU {gid!r} gives no TFLOP/s figure (tflops: {{bf16: ..., fp16: ...}})")
    if not gid:
        raise UserError(f"{where}: a GPU entry has an empty id; give each GPU an id such as 'h100-sxm'")
    checks = [("memory_gb", mem, False), ("reported_gib", reported, False), ("context_gib", ctx, True),
              ("bandwidth_gbs", d.get("bandwidth_gbs"), False), ("usd_per_hour", d.get("usd_per_hour"), True),
              *((f"tflops.{k}", v, True) for k, v in tflops.items())]
    for key, value, zero_ok in checks:
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")
        if isinstance(value, bool) or not (v >= 0 if zero_ok else v > 0) or v == float("inf"):
            raise UserError(f"{where}: GPU {gid!r}: {key} must be a {'non-negative' if zero_ok else 'positive'} "
                            f"finite number, got {value!r}")
    total = float(reported) * GIB if reported is not None else mem * 1e9
    if ctx * GIB >= total:
        raise UserError(f"{where}: GPU {gid!r}: context_gib {ctx} leaves no memory of its "
                        f"{total / GIB:.1f} GiB for tensors; give the CUDA context's size (about 0.5)")
    return GPU(id=gid, name=str(d.get("name") or gid), vendor=str(d.get("vendor") or ""),
               memory_gb=mem if mem is not None else float(reported) * GIB / 1e9,
               reported_bytes=int(float(reported) * GIB) if reported is not None else None,
               context_bytes=int(ctx * GIB), tflops=tflops,
               bandwidth_gbs=float(d["bandwidth_gbs"]) if d.get("bandwidth_gbs") is not None else None,
               match=tuple(str(m) for m in (d.get("match") or [d.get("name") or gid])),
               arch=str(d.get("arch") or ""), source=str(d.get("source") or where),
               unsure=tuple(d.get("unsure") or ()),
               usd_per_hour=float(d["usd_per_hour"]) if d.get("usd_per_hour") is not None else None,
               notes=str(d.get("notes") or ""))


def _read_gpu_file(path: str | Path) -> list[Mapping[str, Any]]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"GPU file {path} is not a JSON or YAML text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:
        raise UserError(f"cannot read GPU file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # lazy: pulls in yaml, which importing this module does not

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot parse GPU file {path}: {msg}") from None
    if isinstance(data, Mapping):
        data = data.get("gpus")
    if not isinstance(data, list):
        raise UserError(f"GPU file {path} must hold a list of GPUs (or {{gpus: [...]}})")
    return data


@functools.lru_cache(maxsize=16)
def _load_catalog(extra: tuple[str, ...]) -> dict[str, GPU]:
    out: dict[str, GPU] = {}
    for d in _read_gpu_file(GPU_CATALOG):
        g = _gpu_from_dict(d, str(GPU_CATALOG))
        out[g.id] = g
    for path in extra:
        for d in _read_gpu_file(path):
            g = _gpu_from_dict(d, str(path))
            out[g.id] = g
    return out


def load_gpus(extra_files: Sequence[str | Path] = ()) -> dict[str, GPU]:
    """The bundled catalog plus the GPUs in ``extra_files`` (JSON or YAML; same id replaces), in file order."""
    return dict(_load_catalog(tuple(str(p) for p in extra_files)))


def _norm_key(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower().replace("nvidia", "").replace("geforce", "").replace("amd", "")
                  .replace("instinct", ""))


def select_gpus(spec: str | Sequence[str], catalog: Mapping[str, GPU]) -> list[GPU]:
    """GPUs named by ``spec``: 'all', or ids / names separated by commas (case and punctuation ignored,
    'h100' = h100-sxm, '4090' = rtx4090). Unknown names raise UserError listing the ids."""
    items = [s.strip() for part in ([spec] if isinstance(spec, str) else spec) for s in str(part).split(",")]
    items = [s for s in items if s]
    if not items:
        raise UserError("--gpus needs at least one GPU id or 'all'")
    out: list[GPU] = []
    keys = {gid: _norm_key(gid) for gid in catalog}
    for item in items:
        if item.lower() == "all":
            out.extend(g for g in catalog.values() if g not in out)
            continue
        k = _norm_key(item)
        hits = [g for gid, g in catalog.items() if keys[gid] == k or _norm_key(g.name) == k]
        if not hits:
            hits = [g for gid, g in catalog.items() if keys[gid].startswith(k) or keys[gid].endswith(k)]
        if len(hits) > 1:  # 'h100' -> the SXM part, the one people mean
            exact = [g for g in hits if keys[g.id] in (k + "sxm", k)]
            hits = exact[:1] or hits
        if len(hits) != 1:
            what = "is ambiguous" if hits else "is not in the catalog"
            raise UserError(f"GPU '{item}' {what}: known ids: {', '.join(catalog)} (or 'all'; add your own "
                            "with --gpu-file)")
        if hits[0] not in out:
            out.append(hits[0])
    return out


def match_gpu(device_name: str, catalog: Mapping[str, GPU]) -> GPU | None:
    """The catalog GPU a device name (as torch reports it) belongs to; the first match in catalog order."""
    for g in catalog.values():
        if g.matches(device_name):
            return g
    return None


def device_peak_flops(device_name: str, compute_dtype: str, catalog: Mapping[str, GPU] | None = None) -> float | None:
    """Dense peak FLOP/s of the catalog GPU that ``device_name`` (as torch reports it) names, for matmuls in
    ``compute_dtype`` (bf16, fp16, tf32, fp32); None for an unknown device or a dtype without a fast path."""
    gpu = match_gpu(device_name, load_gpus() if catalog is None else catalog)
    return gpu.peak_flops(compute_dtype) if gpu is not None else None


__all__ = ["DEFAULT_HEADROOM", "GIB", "GPU", "GPU_CATALOG", "device_peak_flops", "load_gpus", "match_gpu",
           "select_gpus"]
