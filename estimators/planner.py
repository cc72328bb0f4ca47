"""Capacity planning: which optimizer fits on which GPU, at what micro-batch, how fast, and what sharding buys.

Pure arithmetic over :func:`optimem.estimators.estimate` (the whole-step peak: ``bytes["peak"]``) and the GPU catalog
(``estimators/gpus.json``). Nothing here needs a GPU. All memory figures are bytes per GPU.

**Fit.** A configuration fits a GPU when its predicted per-GPU peak is at most the GPU's *budget*:
``usable x (1 - headroom)``, where ``usable`` is the memory torch reports minus the CUDA context (catalog) and
``headroom`` (default :data:`DEFAULT_HEADROOM`) leaves room for the caching allocator's fragmentation
(reserved minus allocated bytes), which the estimator does not predict. :func:`max_micro_batch` finds the
largest micro-batch that fits by exponential then binary search, so the batch it reports fits and one more
does not (up to :data:`MAX_BATCH`).

**Sharding** (per GPU, ``N`` GPUs; ``P`` trainable elements; each optimizer's state from its own formulas):

* ``none`` / ``ddp``: everything replicated, as the Trainer holds it on one GPU. DDP also keeps gradient
  buckets as large as the gradients (the Trainer leaves ``gradient_as_bucket_view`` off, and PyTorch documents
  that turning it on saves "the total gradients size").
* ``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed): the engine trains a 16-bit copy of the model when mixed
  precision (or a 16-bit dtype) is on, keeps an fp32 master partition (``4P/N``) and hands the optimizer one
  flat 1-D fp32 partition per parameter group, so the optimizer state is the optimizer's formula on a 1-D
  tensor of ``P/N`` elements (Adafactor is then *not* factored; GaLore/APOLLO cannot project a 1-D tensor and
  fail). ZeRO-1 shards the optimizer state and master weights; ZeRO-2 also the gradients (16-bit partition +
  the fp32 copy the step reads); ZeRO-3 also the 16-bit weights (its fp32 gradient copy is one
  ``sub_group_size`` at a time), plus the gathered working set: the largest single module's parameters and
  gradients, unsharded (DeepSpeed's ``4 x largest layer``). For AdamW in bf16, ZeRO-2 is ``2P + 18P/N``.
* ``fsdp`` (FSDP2 full shard, the Trainer's default FSDP): parameters, gradients and optimizer state stay in
  the Trainer's dtype, each ``/N`` (``MixedPrecisionPolicy`` computes in bf16/fp16), plus the gathered
  working set: the largest FSDP unit (a decoder block, the input embedding, or the output head with the final
  norm, as accelerate wraps them), parameters and gradients unsharded in the compute dtype.

Activations and step transients are taken from the single-GPU estimate (data parallelism does not change the
micro-batch a GPU sees), with two exceptions under ZeRO/FSDP: the optimizer step's temporaries shrink to the
shard (``/N``), and the forward holds no autocast copies of fp32 weights (the 16-bit engine / FSDP's
``MixedPrecisionPolicy`` give autocast 16-bit weights, so nothing is cast and cached).

Layer-wise optimizers cannot run distributed in the Trainer (``NotImplementedError: Layer-wise ... does not
support DDP``); LOMO/AdaLomo update parameters inside backward hooks without all-reducing gradients except on
lomo_optim's DeepSpeed ZeRO-3 path, so they are data-parallel only under ``zero3``.

**Throughput.** Model FLOPs per trained token ``6 N + 12 L d S`` (``N`` non-embedding parameters, PaLM appendix
B; the same formula the harness uses for MFU). Tokens/s per GPU = ``MFU x peak FLOP/s / FLOPs per token``,
divided by :data:`RECOMPUTE_FACTOR` with gradient checkpointing (the forward runs twice). MFU is assumed
(:data:`DEFAULT_MFU`) unless recorded runs of the same model on the same GPU in the same compute dtype exist
(:func:`calibrate`). Communication is not modelled: multi-GPU tokens/s is N times one GPU's, an upper bound.
"""
from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .inventory import build_inventory
from .optimizers import get_spec
from .optimizers.spec import ParamCtx
from .params import DTYPES, Inventory, ParamRow, normalize_dtype
from .setup import DEFAULT_TARGETS, SHARDINGS, TrainingSetup

GPU_CATALOG = Path(__file__).with_name("gpus.json")
GIB = 1 << 30

DEFAULT_MFU = 0.40
"""Assumed model FLOPs utilisation of a Trainer run without gradient checkpointing (a typical figure for
well-fed dense decoder training in bf16 on one datacenter GPU; calibrated from records when they exist)."""

DEFAULT_HEADROOM = 0.05
"""Fraction of a GPU's usable memory kept free for the caching allocator's fragmentation (an assumption)."""

RECOMPUTE_FACTOR = 4.0 / 3.0
"""Hardware FLOPs with gradient checkpointing over model FLOPs: the forward (2 of 6) is run again."""

MAX_BATCH = 4096
"""Largest micro-batch the search tries; a result at this cap is reported as 'at least'."""

ZERO3_SUB_GROUP = 1_000_000_000
"""DeepSpeed's default ``sub_group_size`` (elements): ZeRO-3 steps the optimizer one sub-group at a time."""
ZERO3_MAX_LIVE = 1_000_000_000
"""DeepSpeed's default ``stage3_max_live_parameters`` (elements): gathered parameters ZeRO-3 keeps before it
releases any (with ``stage3_max_reuse_distance`` also 1e9, a model below it stays gathered once the first step
has traced the module order: measured)."""
ZERO_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads each flat parameter group to a multiple of ``2 x N`` elements
(``nccl_start_alignment_factor``) before cutting it into ``N`` partitions."""
ZERO3_PERSISTENCE = 10
"""The Trainer's ``auto`` ``stage3_param_persistence_threshold``: ``10 x hidden`` elements; smaller
parameters stay whole on every rank."""
ZERO = ("zero1", "zero2", "zero3")

DEFAULT_OPTIMS = ("adamw_torch_fused", "adamw_bnb_8bit", "adamw_torch_4bit", "adafactor", "lion_8bit",
                  "galore_adamw_8bit", "apollo_adamw", "adalomo", "lomo", "sgd")
"""What ``bench plan`` compares when no ``--optim`` is given: one or two of each memory class."""



# ---------------------------------------------------------------------------------------------- GPU catalog
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
        """Dense peak FLOP/s for matmuls in ``compute_dtype`` (``bf16``, ``fp16``, ``fp32``), None if none."""
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
            import yaml

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


# ---------------------------------------------------------------------------------------------- model facts
@dataclass(frozen=True)
class ModelFacts:
    """What the throughput and sharding arithmetic needs from one model (element counts)."""

    num_params: int
    trainable_params: int
    non_embedding_params: int
    layers: int | None
    hidden: int | None
    largest_module_params: int
    """Largest set of parameters one module owns directly (what ZeRO-3 gathers at once)."""
    largest_unit_params: int
    """Largest FSDP unit: a repeated block (``...layers.<i>``), the input embedding, the output head
    with the final norm, or the rest of the root."""
    largest_unit: str
    decay_params: int
    no_decay_params: int
    autocast_cast_params: int = 0
    fsdp_root_params: int = 0
    """Parameters left to the root FSDP unit (not in a layer, the input embedding or the tail): GPT-2's
    position embedding. The root is never resharded between forward and backward."""
    """Elements autocast casts and caches for the whole forward: the weights (and biases) of every matmul
    layer, a tied input embedding included (it is the output head's weight)."""


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _config(inv: Inventory) -> dict:
    from .catalog import resolve

    try:
        return resolve(inv.model).load()
    except UserError:
        return {}


@functools.lru_cache(maxsize=64)
def model_facts(inv: Inventory) -> ModelFacts:
    """Element counts of ``inv`` that planning needs (cached per inventory)."""
    cfg = _config(inv)
    rows = inv.rows
    trainable = [r for r in rows if r.trainable]
    non_emb = sum(r.numel for r in rows if not r.in_embedding)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if cfg.get("is_encoder_decoder"):
        layers = (cfg.get("num_layers") or 0) + (cfg.get("num_decoder_layers") or cfg.get("num_layers") or 0) or layers
    hidden = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd")
    per_module: dict[str, int] = {}
    for r in rows:
        per_module[r.module_name] = per_module.get(r.module_name, 0) + r.numel
    units: dict[str, int] = {}
    vocab = cfg.get("vocab_size")
    for r in rows:
        m = _BLOCK.match(r.name)
        if m:
            key = m.group(1)
        elif r.in_embedding and r.tied:
            key = "head"  # an input embedding tied to the output head: accelerate puts both in the tail unit
        elif (r.module_kind == "embedding" or r.in_embedding) and r.shape and r.shape[0] == vocab:
            key = r.module_name or r.name  # the input embedding: its own unit
        elif r.module_kind == "embedding" or r.in_embedding:
            key = "root"  # other embeddings (GPT-2's positions) stay with the root module
        elif len(r.shape) >= 2 and r.module_kind in ("linear", "conv1d"):
            key = "head"  # the output projection(s) and the final norm form accelerate's tail unit
        elif r.module_kind == "norm":
            key = "head"
        else:
            key = "root"
        units[key] = units.get(key, 0) + r.numel
    root = units.pop("root", 0)
    unit_name, unit_params = max(units.items(), key=lambda kv: kv[1]) if units else ("root", root)
    no_decay = sum(r.numel for r in trainable if r.module_kind == "norm" or r.name.endswith("bias"))
    return ModelFacts(num_params=inv.num_params, trainable_params=inv.trainable_params,
                      non_embedding_params=non_emb, layers=int(layers) if layers else None,
                      hidden=int(hidden) if hidden else None,
                      largest_module_params=max(per_module.values(), default=0),
                      largest_unit_params=unit_params, largest_unit=unit_name, fsdp_root_params=root,
                      decay_params=inv.trainable_params - no_decay, no_decay_params=no_decay,
                      autocast_cast_params=sum(r.numel for r in rows if r.module_kind in ("linear", "conv1d")
                                               or (r.in_embedding and r.tied)))


def flops_per_token(facts: ModelFacts, seq_len: int) -> float:
    """Model FLOPs per trained token: ``6 N + 12 L d S`` (forward + backward; no recomputation)."""
    attn = 12.0 * facts.layers * facts.hidden * seq_len if facts.layers and facts.hidden else 0.0
    return 6.0 * facts.non_embedding_params + attn


# ---------------------------------------------------------------------------------------------- sharding
FSDP2_FAILS: dict[str, str] = {
    "bitsandbytes": "bitsandbytes' update kernels have no DTensor sharding strategy (NotImplementedError: Operator "
                    "bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy registered)",
    "transformers.optimization.Adafactor": "transformers' Adafactor mixes its plain factored state with the "
                                           "DTensor gradient (RuntimeError: aten.add_.Tensor got mixed "
                                           "torch.Tensor and DTensor)",
}
"""Optimizers whose step fails on FSDP2's DTensor parameters (by package or class), with the error a real run
raised (measured on CPU ranks: results/cpu-amd-epyc-2026-12-02-distributed.jsonl; DTensor dispatch is the same
on GPUs)."""


def sharding_support(optim: str, sharding: str, num_gpus: int) -> tuple[bool, str]:
    """``(allowed, reason)`` for running ``optim`` under ``sharding`` on ``num_gpus`` GPUs in the Trainer."""
    spec = get_spec(optim)
    if sharding not in SHARDINGS:
        raise UserError(f"unknown sharding '{sharding}': use one of {', '.join(SHARDINGS)}")
    if sharding == "none":
        if num_gpus > 1:
            return False, "several GPUs need a sharding scheme (ddp, zero1/2/3, fsdp)"
        return True, ""
    if spec.layerwise:
        return False, (f"layer-wise {optim} cannot run distributed: the Trainer raises 'Layer-wise {optim} does "
                       "not support DDP' (DDP, DeepSpeed and FSDP alike)")
    if not spec.keeps_gradients:
        if sharding == "zero3":
            return True, (f"{optim} under DeepSpeed ZeRO-3 takes lomo_optim's ZeRO-3 path (all-reduces each "
                          "gradient inside backward)")
        return False, (f"{optim} updates each parameter inside backward without all-reducing its gradient "
                       "(lomo_optim all-reduces only under DeepSpeed ZeRO-3): not data-parallel under "
                       f"{sharding}; use zero3 or one GPU")
    if sharding == "fsdp":
        why = FSDP2_FAILS.get(spec.cls) or FSDP2_FAILS.get(spec.import_name)
        if why:
            return False, f"{optim} cannot step FSDP2's DTensor parameters: {why}"
    if sharding in ZERO and spec.needs_target_modules:
        return False, (f"{optim} projects 2-D gradients; DeepSpeed ZeRO hands the optimizer flat 1-D "
                       "partitions and the projector indexes shape[1] (IndexError)")
    return True, ""


def _flat_partition_state(inv: Inventory, optim: str, args: Mapping[str, Any], facts: ModelFacts,
                          num_gpus: int, dtype: str, sizes: Sequence[int] | None = None) -> int:
    """Optimizer-state bytes for DeepSpeed's flat partitions: one 1-D ``dtype`` tensor per parameter group
    (the Trainer's decay / no-decay groups) of ``sizes`` elements (default ``group/N``), device-resident keys
    only. DeepSpeed's master partition is fp32 whatever the training dtype."""
    spec = get_spec(optim)
    if spec.state_location == "host":
        return 0
    total = 0
    if sizes is None:
        sizes = [math.ceil(x / num_gpus) for x in (facts.decay_params, facts.no_decay_params) if x > 0]
    for i, numel in enumerate(sizes):
        if numel <= 0:
            continue
        row = ParamRow(name=f"flat_partition_{i}", shape=(int(numel),), dtype=dtype,
                       trainable=True, module_kind="other", module_name="", module_class="FlatPartition")
        for key, nbytes in spec.param_state(ParamCtx(row, args, False)).items():
            if key not in spec.host_keys:
                total += nbytes
    if spec.shared is not None:
        total += sum(v for k, v in spec.shared(inv, args).items() if k not in spec.host_keys)
    return total


@dataclass(frozen=True)
class ShardLayout:
    """Per-rank element counts of one model under one scheme on ``N`` ranks, from the parameter inventory
    (how the engines cut the real parameter list, padding included).

    ``local_params``: parameter elements a rank stores between steps (ZeRO-1/2: the whole padded flat
    groups; ZeRO-3: its partition of every parameter plus the persistent ones whole; FSDP2: its dim-0 shard of
    every parameter, dim 0 padded to a multiple of ``N``). ``local_trainable``: elements of its master /
    gradient partition. ``grad_storage``: per rank, gradient elements held at the optimizer step (ZeRO-1/2:
    the partition is a list of views of the parameters' gradients, so a parameter straddling a partition
    edge keeps its whole gradient alive on both ranks; the last rank's padding is a zero tensor of its own).
    ``persistent``: ZeRO-3 parameters below the persistence threshold (whole on every rank). ``bucket``:
    ZeRO-3's reduction bucket (``reduce_bucket_size`` = hidden², the Trainer's ``auto``). ``gathered``:
    parameters gathered at once in forward/backward (ZeRO-3: those not persistent, at most
    :data:`ZERO3_MAX_LIVE`; FSDP2: the largest unit)."""

    local_params: int
    local_trainable: int
    grad_storage: tuple[int, ...]
    persistent: int = 0
    bucket: int = 0
    gathered: int = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _decay_groups(inv: Inventory) -> list[list[ParamRow]]:
    """The Trainer's two parameter groups (weight decay, then none: norms and biases), in model order."""
    rows = [r for r in inv.rows if r.trainable]
    no_decay = [r for r in rows if r.module_kind == "norm" or r.name.endswith("bias")]
    ids = {id(r) for r in no_decay}
    return [g for g in ([r for r in rows if id(r) not in ids], no_decay) if g]


def shard_layout(inv: Inventory, facts: ModelFacts, sharding: str, n: int) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``inv`` under ``sharding`` on ``n`` ranks (None for none/ddp)."""
    n = max(int(n), 1)
    frozen = sum(r.numel for r in inv.rows if not r.trainable)
    if sharding in ("zero1", "zero2"):
        local, part_total = frozen, 0
        storage = [0] * n
        for group in _decay_groups(inv):
            total = sum(r.numel for r in group)
            padded = _ceil_div(total, ZERO_ALIGNMENT * n) * ZERO_ALIGNMENT * n
            part = padded // n
            local += padded
            part_total += part
            starts, offset = [], 0
            for r in group:
                starts.append((offset, offset + r.numel))
                offset += r.numel
            for rank in range(n):
                lo, hi = rank * part, (rank + 1) * part
                storage[rank] += sum(e - b for b, e in starts if b < hi and e > lo)  # whole gradients
                storage[rank] += max(0, min(hi, padded) - max(lo, total))  # the zero padding
        return ShardLayout(local, part_total, tuple(storage))
    if sharding == "zero3":
        threshold = ZERO3_PERSISTENCE * (facts.hidden or 0)
        rows = inv.rows
        parts = sum(_ceil_div(r.numel, n) for r in rows)
        persistent = sum(r.numel for r in rows if r.numel < threshold)
        trainable = sum(_ceil_div(r.numel, n) for r in rows if r.trainable)
        gathered = min(sum(r.numel for r in rows if r.numel >= threshold), ZERO3_MAX_LIVE)
        return ShardLayout(parts + persistent, trainable, (trainable,) * n, persistent=persistent,
                           bucket=(facts.hidden or 0) ** 2, gathered=gathered)
    if sharding == "fsdp":
        def shard(r: ParamRow) -> int:
            if not r.shape:
                return _ceil_div(1, n)
            rest = math.prod(r.shape[1:])
            return _ceil_div(r.shape[0], n) * rest

        local = sum(shard(r) for r in inv.rows)
        trainable = sum(shard(r) for r in inv.rows if r.trainable)
        # the root unit stays gathered through forward and backward, beside the largest other unit
        return ShardLayout(local, trainable, (trainable,) * n,
                           gathered=facts.largest_unit_params + facts.fsdp_root_params)
    return None


def shard_model_states(*, sharding: str, num_gpus: int, weights: int, gradients: int, optimizer_state: int,
                       num_params: int = 0, trainable_params: int = 0, flat_state: int | None = None,
                       sixteen_bit: bool = False, gathered_params: int = 0,
                       gathered_elem_bytes: int = 2, layout: ShardLayout | None = None, param_bytes: int = 4,
                       rank: int | None = None) -> dict[str, int]:
    """Per-GPU model-state terms (bytes) of one configuration under ``sharding`` on ``num_gpus`` GPUs.

    ``weights``, ``gradients``, ``optimizer_state``: what the Trainer holds on one GPU (the estimator's
    ``weights``, ``gradients``, ``optimizer_state_device``). ZeRO stages also read ``num_params`` and
    ``trainable_params`` (elements), ``flat_state`` (the optimizer's state on its flat partitions, already per
    GPU; default ``optimizer_state / N``) and ``sixteen_bit`` (the engine trains in bf16/fp16: 2-byte weights
    and gradients). ``layout`` (:func:`shard_layout`): the engines' real cut of the parameter list (padding,
    partition edges, persistent parameters); without it the terms are the even split ``x / N``.
    ``param_bytes``: bytes per element of the stored parameters (FSDP2 keeps trainable parameters in fp32
    under mixed precision). ``rank``: the rank whose gradient storage is reported (default: the largest).

    Terms: ``weights`` (local parameter storage), ``master_weights`` (DeepSpeed's fp32 partition: a copy of
    the local weights whatever the training dtype), ``gradients`` (gradient storage at the optimizer step),
    ``grad_partition_fp32`` (the fp32 flat gradient partition a ZeRO step builds), ``optimizer_state``,
    ``gathered_working_set`` (one copy of the parameters gathered at once, in the compute dtype: ZeRO-3's live
    parameters, FSDP2's largest unit; :func:`step_memory` counts it per phase), ``ddp_buckets`` (DDP's
    gradient buckets), ``grad_buckets`` (ZeRO-3's reduction bucket, allocated once).
    """
    n = max(int(num_gpus), 1)

    def part(x: int) -> int:
        return -(-int(x) // n)  # exact ceil(x / n), whatever the size

    terms = {"weights": 0, "master_weights": 0, "gradients": 0, "grad_partition_fp32": 0, "optimizer_state": 0,
             "gathered_working_set": 0, "ddp_buckets": 0, "grad_buckets": 0}
    if sharding in ("none", "ddp"):
        terms.update(weights=weights, gradients=gradients, optimizer_state=optimizer_state)
        if sharding == "ddp" and n > 1:
            terms["ddp_buckets"] = gradients
        return terms
    if sharding == "fsdp":
        if layout is not None:
            terms.update(weights=layout.local_params * param_bytes,
                         gradients=layout.local_trainable * param_bytes if gradients else 0,
                         gathered_working_set=layout.gathered * gathered_elem_bytes)
        else:
            terms.update(weights=part(weights), gradients=part(gradients),
                         gathered_working_set=int(gathered_params) * int(gathered_elem_bytes))
        terms["optimizer_state"] = part(optimizer_state) if flat_state is None else int(flat_state)
        return terms
    if sharding not in ZERO:
        raise UserError(f"unknown sharding '{sharding}': use one of {', '.join(SHARDINGS)}")
    p = int(trainable_params)
    eb = 2 if sixteen_bit else int(param_bytes)
    terms["optimizer_state"] = part(optimizer_state) if flat_state is None else int(flat_state)
    if layout is None:  # the even split, as the ZeRO paper counts
        w = 2 * int(num_params) if sixteen_bit else weights
        g = (2 * p if gradients else 0) if sixteen_bit else gradients
        terms["master_weights"] = part(4 * p)
        if sixteen_bit and gradients:
            terms["grad_partition_fp32"] = 4 * (part(p) if sharding != "zero3" else min(part(p), ZERO3_SUB_GROUP))
        if sharding == "zero1":
            terms.update(weights=w, gradients=g)
        elif sharding == "zero2":
            terms.update(weights=w, gradients=part(g))
        else:
            terms.update(weights=part(w), gradients=part(g),
                         gathered_working_set=int(gathered_params) * int(gathered_elem_bytes))
        return terms
    local = layout.local_trainable
    held = max(layout.grad_storage) if rank is None else layout.grad_storage[rank]
    terms["weights"] = layout.local_params * eb
    terms["master_weights"] = 4 * local
    if sharding in ("zero1", "zero2"):
        if gradients:
            terms["gradients"] = held * eb
            terms["grad_partition_fp32"] = 4 * local  # the step flattens the partition into one fp32 tensor
        return terms
    if gradients:  # ZeRO-3: one flat gradient partition buffer, fp32 when training in fp32
        terms["gradients"] = local * eb
        terms["grad_partition_fp32"] = 4 * min(local, ZERO3_SUB_GROUP) if sixteen_bit else 0
        terms["grad_buckets"] = layout.bucket * eb
    terms["gathered_working_set"] = layout.gathered * eb
    return terms


# ---------------------------------------------------------------------------------------------- one configuration
PLAN_DEFAULTS: dict = {"mixed_precision": "bf16", "seq_len": 2048}
"""What the planner assumes where a setup field is not given: bf16 autocast (how people train on GPUs) and
2048 tokens per sample; every other field has :class:`~optimem.estimators.setup.TrainingSetup`'s default."""


def plan_setup(model: Any, optim: Any, **fields) -> TrainingSetup:
    """A :class:`~optimem.estimators.setup.TrainingSetup` with the planner's defaults (:data:`PLAN_DEFAULTS`), and
    GaLore/APOLLO's default targets where none are given.

    ``model``: a model name, or the user's own config / ``PreTrainedModel`` / PEFT model; ``optim``: an optimizer
    name, or the ``transformers.TrainingArguments`` of the run (then its precision, batch, accumulation,
    checkpointing and parallelism are the setup's, and only the sequence length takes the planner's default).
    See :func:`optimem.estimators.user_objects.setup_for`."""
    from .user_objects import is_training_arguments, setup_for

    if is_training_arguments(optim):
        setup = setup_for(model, optim, **{"seq_len": PLAN_DEFAULTS["seq_len"], **fields})
    else:
        setup = setup_for(model, get_spec(optim).name, **{**PLAN_DEFAULTS, **fields})
    if get_spec(setup.optim).needs_target_modules and not setup.optim_target_modules:
        setup = replace(setup, optim_target_modules=DEFAULT_TARGETS)
    return setup


BREAKDOWN = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "other", "sharding_overhead")
"""Parts of a per-GPU peak (bytes): as the estimator splits each phase, plus what sharding adds (the gathered
unit of ZeRO-3/FSDP, DDP's gradient buckets). ``weights`` includes ZeRO's fp32 master partition and
``gradients`` its fp32 gradient copy."""


@dataclass
class StepMemory:
    """The predicted per-GPU peak of one configuration at one micro-batch, and its parts (bytes)."""

    batch_size: int
    peak: int
    terms: dict[str, int]
    """Model-state terms per GPU (see :func:`shard_model_states`)."""
    breakdown: dict[str, int]
    """The peak phase's bytes split as :data:`BREAKDOWN` (they sum to ``peak``)."""
    host_state: int
    single_gpu_peak: int
    peak_phase: str | None = None

    @property
    def activations(self) -> int:
        """Everything at the peak that is not a model state: activations, temporaries, other."""
        return self.peak - sum(self.breakdown.get(k, 0) for k in ("weights", "gradients", "optimizer_state",
                                                                   "sharding_overhead"))


def _estimate(setup: TrainingSetup, batch: int):
    """The estimate of ``setup`` at micro-batch ``batch``, on the device it trains on (``auto``: CUDA)."""
    from .estimate import estimate

    return estimate(setup, batch_size=batch, device=setup.estimate_device)


def _phases(est) -> list[tuple[str, int, dict[str, int]]] | None:
    """``[(phase, total bytes, {component: bytes})]`` from the estimate's per-phase breakdown, or None."""
    raw = getattr(est, "phases", None)
    if raw is None:
        raw = est.bytes.get("phases") if isinstance(est.bytes.get("phases"), Mapping) else None
    if not isinstance(raw, Mapping) or not raw:
        return None
    out = []
    for name, ph in raw.items():
        if not isinstance(ph, Mapping):
            return None
        total = ph.get("peak", ph.get("total"))
        if not isinstance(total, (int, float)):
            return None
        comps = {k: int(v) for k, v in ph.items() if isinstance(v, (int, float)) and k not in ("peak", "total")}
        out.append((str(name), int(total), comps))
    return out


def _pick(comps: Mapping[str, int], keys: Sequence[str], default: int) -> int:
    for k in keys:
        if k in comps:
            return int(comps[k])
    return default


@functools.lru_cache(maxsize=4096)
def _inventory(model: str, dtype: str) -> Inventory:
    return build_inventory(model, dtype)


def setup_inventory(setup: TrainingSetup) -> Inventory:
    """The inventory of the model ``setup`` trains: the plain model's, or a LoRA/QLoRA setup's peft model."""
    if setup.peft:
        from .peft_model import adapter_inventory

        return adapter_inventory(setup)
    return _inventory(setup.model, setup.dtype)


def step_memory(setup: TrainingSetup, batch: int) -> StepMemory:
    """Predicted per-GPU peak of ``setup`` at micro-batch ``batch`` (``setup.batch_size`` is not read)."""
    return _step_memory_cached(setup, int(batch))


@functools.lru_cache(maxsize=65536)
def _step_memory_cached(setup: TrainingSetup, batch: int) -> StepMemory:
    est = _estimate(setup, batch)
    b = est.bytes
    if b["peak"] is None:  # no whole-step peak for this setup (see the estimate's notes): nothing to fit
        raise UserError(f"cannot plan {setup.model} with {setup.optim}: {est.notes[-1]}")
    W, G, O = int(b["weights"]), int(b["gradients"]), int(b["optimizer_state_device"])
    peak = int(b["peak"])
    host = int(b.get("optimizer_state_host", 0))
    phases = _phases(est)
    single = setup.sharding == "none" and setup.num_processes == 1
    if single:
        terms = shard_model_states(sharding="none", num_gpus=1, weights=W, gradients=G, optimizer_state=O)
    else:
        inv = setup_inventory(setup)
        terms = _sharded_terms(setup, inv, model_facts(inv), W, G, O, est)
    if not phases:
        # No per-phase split: weights and optimizer state live through every steady phase, so their change
        # applies to the peak exactly; gradients come and go, so only an increase is applied (an upper bound).
        g_sh = terms["gradients"] + terms["grad_partition_fp32"]
        over = terms["ddp_buckets"] + terms["gathered_working_set"]
        new_peak = (peak - W - O + terms["weights"] + terms["master_weights"] + terms["optimizer_state"]
                    + max(0, g_sh - G) + over)
        parts = {"weights": terms["weights"] + terms["master_weights"], "gradients": g_sh,
                 "optimizer_state": terms["optimizer_state"], "sharding_overhead": over}
        parts["other"] = new_peak - sum(parts.values())
        return StepMemory(batch, new_peak, terms, parts, host, peak, None)
    # Each model-state component present in a phase scales by its shard factor; the optimizer step runs on
    # this GPU's shard, so its temporaries shrink with the state; the gathered unit lives in forward/backward.
    f_w = (terms["weights"] + terms["master_weights"]) / W if W else 1.0
    f_g = terms["gradients"] / G if G else 1.0  # the fp32 gradient copy exists only in the step
    if setup.sharding == "zero1":
        f_g = (2 * facts_of(setup).trainable_params if setup.sixteen_bit else G) / G if G else 1.0  # reduced at the end
    f_g_step = (terms["gradients"] + terms["grad_partition_fp32"]) / G if G else 1.0
    f_o = terms["optimizer_state"] / O if O else 1.0
    shards_step = setup.sharding in ZERO + ("fsdp",)
    # The Trainer's autocast keeps a 16-bit copy of every matmul weight for the whole forward. DeepSpeed's
    # 16-bit engine and FSDP's MixedPrecisionPolicy hand autocast 16-bit weights already: no copies.
    cast_cache = 0
    if shards_step and setup.mixed_precision and DTYPES[normalize_dtype(setup.dtype)] > DTYPES[setup.mixed_precision]:
        inv = setup_inventory(setup)
        cast_cache = model_facts(inv).autocast_cast_params * DTYPES[setup.mixed_precision]
    best: tuple[int, str, dict[str, int]] | None = None
    all_parts: dict[str, dict[str, int]] = {}
    for name, total, comps in phases:
        is_step = "optim" in name.lower() and "step" in name.lower()
        grads_here = _pick(comps, ("gradients", "grads", "grad"), 0)
        parts = {
            "weights": math.ceil(_pick(comps, ("weights", "parameters", "params"), W) * f_w),
            "gradients": math.ceil(grads_here * (f_g_step if is_step else f_g)),
            # (ZeRO-3's flat gradient partition is allocated once, at engine start: see below)
            "optimizer_state": math.ceil(_pick(comps, ("optimizer_state_device", "optimizer_state", "state"), 0) * f_o),
            "activations": _pick(comps, ("activations", "act"), 0),
            "temporaries": _pick(comps, ("temporaries", "tmp"), 0),
            "sharding_overhead": terms["ddp_buckets"] + terms["grad_buckets"]
            + (0 if is_step else _gathered_copies(setup.sharding, name, grads_here) * terms["gathered_working_set"]),
        }
        if setup.sharding == "zero3" and G:
            parts["gradients"] = terms["gradients"] + (terms["grad_partition_fp32"] if is_step else 0)
        if is_step and shards_step:
            parts["temporaries"] = -(-parts["temporaries"] // setup.num_processes)  # exact ceil
        if cast_cache and name.endswith("forward"):
            parts["activations"] -= min(cast_cache, parts["activations"])
        known = sum(_pick(comps, keys, 0) for keys in (("weights", "parameters", "params"), ("gradients", "grads", "grad"),
                                                        ("optimizer_state_device", "optimizer_state", "state"),
                                                        ("activations", "act"), ("temporaries", "tmp")))
        parts["other"] = max(int(total) - known, 0)
        t = sum(parts.values())
        all_parts[name] = parts
        if best is None or t >= best[0]:
            best = (t, name, parts)
    new_peak, name, parts = best
    if single:  # the estimator's own figure and phase, exactly
        new_peak = peak
        own = getattr(est, "peak_phase", None)
        name, parts = (own, all_parts[own]) if own in all_parts else (name, parts)
    return StepMemory(batch, new_peak, terms, parts, host, peak, name)


def facts_of(setup: TrainingSetup) -> ModelFacts:
    return model_facts(setup_inventory(setup))


def _gathered_copies(sharding: str, phase: str, grads_in_phase: int) -> int:
    """How many copies of the gathered parameters a phase holds at its peak. FSDP2: in forward the unit's
    all-gather output and its unsharded parameters (accelerate keeps the tail unit, the largest, unsharded
    into backward); in backward the unsharded parameters, plus their unsharded gradients once gradients
    exist at the phase's peak (measured: the backward peak at its start holds one copy). ZeRO-3: the live
    parameters, once."""
    if sharding == "fsdp":
        if phase.endswith("forward"):
            return 2
        return 1 + (1 if grads_in_phase > 0 else 0)
    return 1 if sharding == "zero3" else 0


def _partition_sizes(inv: Inventory, sharding: str, n: int) -> list[int]:
    """Elements of each flat 1-D partition a ZeRO rank's optimizer steps (one per Trainer parameter group):
    ZeRO-1/2 cut the padded flat group evenly; ZeRO-3 concatenates the rank's partition of each parameter."""
    out = []
    for group in _decay_groups(inv):
        if sharding == "zero3":
            out.append(sum(_ceil_div(r.numel, n) for r in group))
        else:
            total = sum(r.numel for r in group)
            out.append(_ceil_div(total, ZERO_ALIGNMENT * n) * ZERO_ALIGNMENT)
    return out


def _fsdp_state(setup: TrainingSetup, inv: Inventory, n: int) -> int:
    """A rank's optimizer state under FSDP2, parameter by parameter: each state tensor of a parameter's shape is
    a DTensor sharded on dim 0 (``ceil(d0 / N)`` rows), a 0-d step counter is whole on every rank. GaLore (its
    ops run on the DTensor gradient; measured): the projector comes out of the SVD replicated, and the moments
    of the projected gradient stay sharded when it is projected from the right (dim 0 kept), replicated when
    from the left (dim 0 contracted). Device-resident keys only."""
    from .estimate import _targets_key, targeted_names
    from .optimizers import parse_optim_args
    from .optimizers.lowrank import projection_side

    spec = get_spec(setup.optim)
    if spec.state_location == "host":
        return 0
    args = spec.resolve_args(parse_optim_args(setup.optim_args))
    targeted = (targeted_names(inv, _targets_key(setup.optim_target_modules)) if spec.needs_target_modules
                else frozenset())
    total = 0
    for row in inv.rows:
        if not (row.trainable or spec.state_for_frozen):
            continue
        d0 = row.shape[0] if row.shape else 1
        frac = _ceil_div(d0, n) / d0
        projected = spec.family == "galore" and row.name in targeted and len(row.shape) == 2
        side = projection_side(row.shape[0], row.shape[1], str(args.get("proj_type", "std"))) if projected else None
        for key, nbytes in spec.param_state(ParamCtx(row, args, row.name in targeted)).items():
            if key in spec.host_keys:
                continue
            whole = nbytes <= 8 or (projected and (key == "projector" or side != "right"))
            total += nbytes if whole else math.ceil(nbytes * frac)
    if spec.shared is not None:
        total += sum(v for k, v in spec.shared(inv, args).items() if k not in spec.host_keys)
    return total


def _sharded_terms(setup: TrainingSetup, inv: Inventory, facts: ModelFacts, W: int, G: int, O: int, est,
                   rank: int | None = None) -> dict[str, int]:
    spec = get_spec(setup.optim)
    compute_bytes = DTYPES[setup.mixed_precision] if setup.mixed_precision else DTYPES[normalize_dtype(setup.dtype)]
    n = setup.num_processes
    flat = None
    if setup.sharding in ZERO and spec.keeps_gradients:
        flat = _flat_partition_state(inv, setup.optim, est.optim_args, facts, n, "fp32",
                                     sizes=_partition_sizes(inv, setup.sharding, n))
    elif setup.sharding in ZERO:  # LOMO family on ZeRO-3: lomo_optim keeps its (tiny) state per full shape
        flat = O
    if setup.sharding == "fsdp":
        flat = _fsdp_state(setup, inv, n)
    layout = shard_layout(inv, facts, setup.sharding, n)
    param_bytes = DTYPES[normalize_dtype(setup.dtype)]
    if setup.sharding == "fsdp" and setup.mixed_precision:
        param_bytes = 4  # accelerate upcasts trainable parameters to fp32 for FSDP2 under mixed precision
    gathered = facts.largest_module_params if setup.sharding == "zero3" else facts.largest_unit_params
    return shard_model_states(sharding=setup.sharding, num_gpus=n, weights=W, gradients=G,
                              optimizer_state=O, num_params=facts.num_params,
                              trainable_params=facts.trainable_params, flat_state=flat,
                              sixteen_bit=setup.sixteen_bit, gathered_params=gathered,
                              gathered_elem_bytes=compute_bytes, layout=layout, param_bytes=param_bytes, rank=rank)


def model_state_terms(setup: TrainingSetup, rank: int | None = None) -> dict[str, int]:
    """Per-GPU model-state terms of ``setup`` (:func:`shard_model_states`), batch-independent: needs only the
    estimator's weights, gradients and optimizer state, not the whole-step peak. ``rank``: the rank whose
    gradient storage is reported (ZeRO-1/2 partitions differ at their edges; default: the largest)."""
    est = _estimate(setup, 1)
    b = est.bytes
    inv = setup_inventory(setup)
    return _sharded_terms(setup, inv, model_facts(inv), int(b["weights"]), int(b["gradients"]),
                          int(b["optimizer_state_device"]), est, rank=rank)


def fits(setup: TrainingSetup, batch: int, budget: int) -> bool:
    """Whether micro-batch ``batch`` of ``setup`` fits in ``budget`` bytes per GPU."""
    return step_memory(setup, batch).peak <= budget


def max_micro_batch(setup: TrainingSetup, budget: int, limit: int = MAX_BATCH) -> int:
    """The largest micro-batch ``b <= limit`` with ``fits(b)`` (0 when batch 1 does not fit). Exponential
    search then bisection; the peak grows with the batch, so ``b`` fits and ``b + 1`` does not (below the limit)."""
    return _largest(lambda b: fits(setup, b, budget), limit)


def _largest(ok, limit: int) -> int:
    """The largest ``n`` in ``1..limit`` with ``ok(n)``, for ``ok`` true up to some point and false after it
    (0 when ``ok(1)`` is false): doubling, then bisection."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        if ok(limit):
            return limit
        hi = limit
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


MAX_SEQ = 1 << 20
"""Longest sequence the search tries when the model's config names no position limit."""


def position_limit(setup: TrainingSetup) -> int:
    """The longest sequence the model takes: its config's ``max_position_embeddings`` / ``n_positions``
    (none for relative-position models such as T5: :data:`MAX_SEQ`)."""
    from .catalog import resolve

    cfg = resolve(setup.model).load()
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in ("max_position_embeddings", "n_positions"):
        value = cfg.get(key) or text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return MAX_SEQ


def max_seq_len(setup: TrainingSetup, batch: int, budget: int, limit: int | None = None) -> int:
    """The longest sequence ``s <= limit`` (default :func:`position_limit`) at micro-batch ``batch`` whose
    step fits in ``budget`` bytes (0 when not even 1 token does). The peak grows with the sequence length:
    exponential search then bisection, as :func:`max_micro_batch`."""
    limit = position_limit(setup) if limit is None else limit
    return _largest(lambda seq: fits(replace(setup, seq_len=seq), batch, budget), limit)


# ---------------------------------------------------------------------------------------------- throughput & MFU
@dataclass(frozen=True)
class Calibration:
    """A measured MFU (no recompute counted) for one GPU, model and compute dtype."""

    gpu: str
    model: str
    compute_dtype: str
    mfu: float
    runs: int


def _record_compute(config: Mapping[str, Any]) -> str | None:
    mp = config.get("mixed_precision")
    if mp:
        return str(mp)
    dt = config.get("dtype")
    return str(dt) if dt else None


def _records(sources: Iterable[str | Path | Mapping]) -> Iterable[Mapping]:
    """Records from run records themselves or JSONL files of them (lines that are not JSON objects skipped;
    the harness reads files with :func:`optimem.harness.record.read_records`, which says what it skipped)."""
    for source in sources:
        if isinstance(source, Mapping):
            yield source
            continue
        path = Path(source)
        try:
            lines = path.read_bytes().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, Mapping):
                yield rec


def calibrate(paths: Iterable[str | Path | Mapping], catalog: Mapping[str, GPU]) -> dict[tuple[str, str, str], Calibration]:
    """MFU per ``(gpu id, model, compute dtype)`` from recorded runs (JSONL records written by ``bench run``, or
    the records themselves).

    Uses ``ok`` CUDA records with a measured MFU. The achieved FLOP/s (``mfu x peak_flops`` of the record) is
    divided by this catalog's peak for the same GPU and dtype, and by :data:`RECOMPUTE_FACTOR` undone for runs
    with gradient checkpointing, so the figure is comparable with :data:`DEFAULT_MFU`. The median per key wins.
    """
    from .catalog import canonical_name

    samples: dict[tuple[str, str, str], list[float]] = {}
    for rec in _records(paths):
        if rec.get("status") != "ok":
            continue
        meas, env, cfg = rec.get("measured") or {}, rec.get("env") or {}, rec.get("config") or {}
        if not all(isinstance(x, Mapping) for x in (meas, env, cfg)):
            continue
        tp = meas.get("throughput") or {}
        if not isinstance(tp, Mapping):
            continue
        mfu = tp.get("mfu")
        if meas.get("device") != "cuda" or not isinstance(mfu, (int, float)) or mfu <= 0:
            continue
        gpu = match_gpu(str(env.get("device_name") or ""), catalog)
        compute = _record_compute(cfg)
        if gpu is None or compute is None:
            continue
        ours = gpu.peak_flops(compute)
        if not ours:
            continue
        theirs = tp.get("peak_flops")
        achieved = float(mfu) * float(theirs) if isinstance(theirs, (int, float)) and theirs else float(mfu) * ours
        value = achieved / ours * (RECOMPUTE_FACTOR if cfg.get("gradient_checkpointing") else 1.0)
        model = canonical_name(str(cfg.get("model")))  # never fetches a Hub id's config
        samples.setdefault((gpu.id, model, compute), []).append(value)
    return {k: Calibration(k[0], k[1], k[2], statistics.median(v), len(v)) for k, v in samples.items()}


def default_result_files(root: str | Path = "results") -> list[Path]:
    """``results/*.jsonl`` under ``root`` (relative to the working directory)."""
    root = Path(root)
    return sorted(root.glob("*.jsonl")) if root.is_dir() else []


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float | None
    """Per GPU."""
    mfu: float
    mfu_source: str
    flops_per_token: float


def throughput(facts: ModelFacts, gpu: GPU, setup: TrainingSetup, *, mfu: float = DEFAULT_MFU,
               mfu_source: str = "assumed") -> Throughput:
    """Tokens/s on one GPU from model FLOPs and an MFU (None when the GPU has no fast path for the dtype)."""
    fpt = flops_per_token(facts, setup.seq_len)
    peak = gpu.peak_flops(setup.compute_dtype)
    if not peak or not fpt:
        return Throughput(None, mfu, mfu_source, fpt)
    tps = mfu * peak / fpt / (RECOMPUTE_FACTOR if setup.gradient_checkpointing else 1.0)
    return Throughput(tps, mfu, mfu_source, fpt)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class PlanRow:
    """One optimizer x GPU answer."""

    optim: str
    gpu: str
    gpu_name: str
    status: str
    """``fits``, ``no_fit`` (not even micro-batch 1), ``unsupported`` (cannot run so), ``error``."""
    reason: str = ""
    gradient_checkpointing: bool | None = None
    max_micro_batch: int = 0
    at_cap: bool = False
    max_micro_batch_by_checkpointing: dict[str, int] = field(default_factory=dict)
    """The largest micro-batch without (``off``) and with (``on``) gradient checkpointing, where searched."""
    budget: int = 0
    peak: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    host_state: int = 0
    peak_at_batch1: int | None = None
    peak_phase: str | None = None
    tokens_per_s_per_gpu: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    mfu_source: str = ""
    num_gpus: int = 1
    sharding: str = "none"
    notes: list[str] = field(default_factory=list)
    max_seq_len: int | None = None
    """With a sequence search (:func:`plan_seq`): the longest sequence that fits at ``batch_size``."""
    max_seq_len_by_checkpointing: dict[str, int] = field(default_factory=dict)
    seq_limit: int | None = None
    """The model's position limit (the search's cap)."""
    batch_size: int | None = None
    """The micro-batch a sequence search holds."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _notes(optim: str, sharding: str, num_gpus: int) -> list[str]:
    spec = get_spec(optim)
    out = []
    if spec.state_location == "host":
        out.append("optimizer state lives in host memory (not counted against the GPU)")
    if sharding in ZERO and spec.family == "adafactor":
        out.append("under ZeRO the optimizer sees 1-D partitions: Adafactor's second moment is not factored")
    if sharding == "fsdp" and spec.cls.split(".")[0] not in ("torch", "galore_torch"):
        out.append("FSDP2 hands the optimizer DTensor shards; optimem has not run this optimizer there: "
                   "the state shown is its formula / N")
    if sharding in ZERO and spec.cls not in ("torch.optim.AdamW", "torch.optim.Adam"):
        out.append("outside DeepSpeed's tested ZeRO optimizers (the Trainer sets zero_allow_untested_optimizer); "
                   "state shown is their formula on the flat fp32 partitions")
    return out


CHECKED_ON_CPU = "results/cpu-amd-epyc-2026-12-02-distributed.jsonl"
"""Where the per-rank sharding model was measured: 2 CPU ranks (gloo), fp32 training."""


def verification_note(setup: TrainingSetup) -> str | None:
    """What the per-rank sharding model of ``setup`` has been checked against, and what only a GPU can check."""
    if setup.sharding == "none":
        return None
    if setup.sixteen_bit:
        return (f"{setup.sharding}: the per-rank model was measured on 2 CPU ranks in fp32 only ({CHECKED_ON_CPU}); "
                "its 16-bit paths (DeepSpeed's bf16/fp16 flat groups and fp32 gradient copy, FSDP2's "
                "MixedPrecisionPolicy) and NCCL can only be checked on GPUs: not yet measured")
    return (f"{setup.sharding}: per-rank model measured on 2 CPU ranks, fp32 ({CHECKED_ON_CPU}); on GPUs (NCCL, "
            "the CUDA allocator) not yet measured")


def _row(setup: TrainingSetup, gpu: GPU, headroom: float, **fields) -> PlanRow:
    """A new answer for ``setup`` on ``gpu``: ``no_fit`` until a search fills it, or ``unsupported`` (with the
    reason) where the optimizer cannot run under the setup's sharding; the sharding notes."""
    row = PlanRow(optim=setup.optim, gpu=gpu.id, gpu_name=gpu.name, status="no_fit", budget=gpu.budget(headroom),
                  num_gpus=setup.num_processes, sharding=setup.sharding, **fields)
    ok, why = sharding_support(setup.optim, setup.sharding, setup.num_processes)
    if not ok:
        row.status, row.reason = "unsupported", why
        return row
    if why:
        row.notes.append(why)
    row.notes.extend(_notes(setup.optim, setup.sharding, setup.num_processes))
    checked = verification_note(setup)
    if checked:
        row.notes.append(checked)
    return row


def plan_one(setup: TrainingSetup, gpu: GPU, *, headroom: float = DEFAULT_HEADROOM, checkpointing: str = "auto",
             calibration: Mapping[tuple[str, str, str], Calibration] | None = None,
             mfu: float = DEFAULT_MFU) -> PlanRow:
    """Fit, max micro-batch, breakdown and tokens/s of ``setup`` on ``gpu`` (``checkpointing``: auto, on, off:
    auto searches both and chooses no checkpointing when micro-batch 1 fits without it (no recomputation: the
    most tokens/s at a constant MFU), else checkpointing)."""
    row = _row(setup, gpu, headroom)
    if row.status == "unsupported":
        return row
    if not gpu.peak_flops(setup.compute_dtype):
        row.notes.append(f"{gpu.name} has no fast {setup.compute_dtype} path")
    modes = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    chosen = None
    for ckpt in modes:
        s = replace(setup, gradient_checkpointing=ckpt)
        b = max_micro_batch(s, row.budget)
        row.max_micro_batch_by_checkpointing["on" if ckpt else "off"] = b
        if b >= 1 and chosen is None:
            chosen = (s, b)
    last = replace(setup, gradient_checkpointing=modes[-1])
    row.peak_at_batch1 = step_memory(last, 1).peak
    if chosen is None:
        row.gradient_checkpointing = modes[-1]
        row.reason = (f"micro-batch 1 needs {row.peak_at_batch1 / GIB:.1f} GiB per GPU, budget "
                      f"{row.budget / GIB:.1f} GiB")
        return row
    s, b = chosen
    row.max_micro_batch, row.at_cap = b, b >= MAX_BATCH
    return _fits(row, s, b, gpu, calibration, mfu)


def _fits(row: PlanRow, s: TrainingSetup, batch: int, gpu: GPU,
          calibration: Mapping[tuple[str, str, str], Calibration] | None, mfu: float) -> PlanRow:
    """``row`` filled for the fitting setup ``s`` at micro-batch ``batch``: breakdown at the peak, MFU
    (measured where a recorded run calibrates it) and tokens/s."""
    mem = step_memory(s, batch)
    row.status = "fits"
    row.gradient_checkpointing = s.gradient_checkpointing
    row.peak, row.host_state = mem.peak, mem.host_state
    row.breakdown = dict(mem.breakdown)
    row.peak_phase = mem.peak_phase
    facts = model_facts(setup_inventory(s))
    cal = None
    if calibration:
        from .catalog import canonical_name

        cal = calibration.get((gpu.id, canonical_name(s.model), s.compute_dtype))
    if cal is not None:
        tp = throughput(facts, gpu, s, mfu=cal.mfu, mfu_source=f"measured ({cal.runs} run{'s' * (cal.runs > 1)})")
    else:
        tp = throughput(facts, gpu, s, mfu=mfu, mfu_source="assumed")
    row.mfu, row.mfu_source = tp.mfu, tp.mfu_source
    if tp.tokens_per_s is not None:
        row.tokens_per_s_per_gpu = tp.tokens_per_s
        row.tokens_per_s = tp.tokens_per_s * s.num_processes
    return row


def plan_seq(setup: TrainingSetup, gpu: GPU, *, batch: int = 1, headroom: float = DEFAULT_HEADROOM,
             checkpointing: str = "auto", calibration: Mapping[tuple[str, str, str], Calibration] | None = None,
             mfu: float = DEFAULT_MFU) -> PlanRow:
    """The longest sequence of ``setup`` that fits on ``gpu`` at micro-batch ``batch`` (``checkpointing``:
    auto searches both and keeps the longer, no checkpointing on a tie; on; off), with the breakdown and
    tokens/s there. ``setup.seq_len`` is not read."""
    row = _row(setup, gpu, headroom, batch_size=batch, seq_limit=position_limit(setup))
    if row.status == "unsupported":
        return row
    modes = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    best = None
    for ckpt in modes:
        s = replace(setup, gradient_checkpointing=ckpt)
        n = max_seq_len(s, batch, row.budget, row.seq_limit)
        row.max_seq_len_by_checkpointing["on" if ckpt else "off"] = n
        if n >= 1 and (best is None or n > best[1]):
            best = (s, n)
    if best is None:
        last = replace(setup, gradient_checkpointing=modes[-1], seq_len=1)
        row.gradient_checkpointing = modes[-1]
        row.peak_at_batch1 = step_memory(last, batch).peak
        row.reason = (f"micro-batch {batch} of 1 token needs {row.peak_at_batch1 / GIB:.1f} GiB per GPU, budget "
                      f"{row.budget / GIB:.1f} GiB")
        return row
    s, n = best
    row.max_seq_len, row.max_micro_batch, row.at_cap = n, batch, n >= row.seq_limit
    return _fits(row, replace(s, seq_len=n), batch, gpu, calibration, mfu)


def min_gpus_to_fit(setup: TrainingSetup, gpu: GPU, *, sharding: str = "fsdp", headroom: float = DEFAULT_HEADROOM,
                    max_gpus: int = 1024) -> int | None:
    """The fewest GPUs (2..``max_gpus``) on which micro-batch 1 of ``setup`` fits under ``sharding`` (None: not
    even ``max_gpus``, or the optimizer cannot run so). The per-GPU peak falls as GPUs are added: bisection."""
    if not sharding_support(setup.optim, sharding, 2)[0]:
        return None
    budget = gpu.budget(headroom)

    def ok(n: int) -> bool:
        return fits(replace(setup, sharding=sharding, num_processes=n), 1, budget)

    if not ok(max_gpus):
        return None
    lo, hi = 1, 2  # lo: does not fit (or one GPU), hi: candidate
    while not ok(hi):
        lo, hi = hi, min(hi * 2, max_gpus)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def memory_vs_gpus(setup: TrainingSetup, batch: int, counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                   shardings: Sequence[str] = SHARDINGS[1:]) -> dict[str, list[int | None]]:
    """Per-GPU peak (bytes) of ``setup`` at ``batch`` for each sharding and GPU count (None: cannot run)."""
    out: dict[str, list[int | None]] = {}
    for sh in shardings:
        vals: list[int | None] = []
        for n in counts:
            if not sharding_support(setup.optim, sh, n)[0]:
                vals.append(None)
                continue
            vals.append(step_memory(replace(setup, sharding=sh, num_processes=n), batch).peak)
        out[sh] = vals
    return out


__all__ = ["DEFAULT_HEADROOM", "DEFAULT_MFU", "DEFAULT_OPTIMS", "GPU", "GPU_CATALOG", "MAX_BATCH", "MAX_SEQ", "ModelFacts",
           "BREAKDOWN", "PLAN_DEFAULTS", "PlanRow", "RECOMPUTE_FACTOR", "SHARDINGS", "ZERO3_SUB_GROUP", "StepMemory", "calibrate",
           "default_result_files", "fits", "flops_per_token", "load_gpus", "match_gpu", "max_micro_batch", "max_seq_len",
           "memory_vs_gpus", "min_gpus_to_fit", "model_facts", "model_state_terms", "plan_one", "plan_seq", "plan_setup",
           "position_limit", "select_gpus", "setup_inventory", "shard_layout", "shard_model_states", "sharding_support",
           "step_memory", "throughput", "verification_note", "ShardLayout", "ZERO3_MAX_LIVE", "CHECKED_ON_CPU"]
