"""The plan: for each optimizer x GPU, does a setup fit, at what largest micro-batch (or longest sequence), with
which per-GPU breakdown, how fast; the fewest GPUs that would fit otherwise; and the recommendation
(:func:`plan` -> :class:`Plan`). Pure arithmetic over the step-memory model and the GPU catalog: no GPU needed.

A configuration on one GPU fits when the caching allocator's replayed reserve (``estimators/device_fit.py``) is at
most the GPU's usable memory (reported minus the CUDA context); a sharded one when its predicted per-GPU peak is
at most the GPU's budget: usable memory less a headroom fraction for the caching allocator. Bytes per GPU
throughout.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .catalog import canonical_name, resolve
from .device_fit import budget_of, by_reserve, max_micro_batch_on, max_seq_len_on, reserved_on
from .errors import UserError
from .estimate import estimate
from .gpus import DEFAULT_HEADROOM, GIB, GPU, load_gpus, select_gpus
from .model_sizes import ModelSizes
from .offload_plan import offload_offers
from .search import largest
from .optimizers import get_spec
from .setup import SHARDINGS, TrainingSetup
from .sharding import ZERO, sharding_support
from .step_memory import MAX_BATCH, fits, plan_setup, position_limit, sizes_of, \
    setup_inventory, step_memory
from .throughput import DEFAULT_MFU, Calibration, calibrate, throughput

DEFAULT_OPTIMS = ("adamw_torch_fused", "adamw_bnb_8bit", "adamw_torch_4bit", "adafactor", "lion_8bit",
                  "galore_adamw_8bit", "apollo_adamw", "adalomo", "lomo", "sgd")
"""What ``bench plan`` compares when no ``--optim`` is given: one or two of each memory class."""


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
    reserved: int | None = None
    """One GPU: the replayed caching allocator's ``max_memory_reserved`` at the answer, within the GPU's usable
    memory (None: sharded)."""
    device_total: int | None = None
    """``reserved`` + the GPU's CUDA context: what nvidia-smi would show."""
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
    row = PlanRow(optim=setup.optim, gpu=gpu.id, gpu_name=gpu.name, status="no_fit",
                  budget=budget_of(setup, gpu, headroom), num_gpus=setup.num_processes, sharding=setup.sharding,
                  **fields)
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
        b = max_micro_batch_on(s, gpu, headroom)
        row.max_micro_batch_by_checkpointing["on" if ckpt else "off"] = b
        if b >= 1 and chosen is None:
            chosen = (s, b)
    last = replace(setup, gradient_checkpointing=modes[-1])
    row.peak_at_batch1 = step_memory(last, 1).peak
    if chosen is None:
        row.gradient_checkpointing = modes[-1]
        row.reason = _no_fit(last, 1, row, "micro-batch 1")
        return row
    s, b = chosen
    row.max_micro_batch, row.at_cap = b, b >= MAX_BATCH
    return _fits(row, s, b, gpu, calibration, mfu)


def _fits(row: PlanRow, s: TrainingSetup, batch: int, gpu: GPU,
          calibration: Mapping[tuple[str, str, str], Calibration] | None, mfu: float) -> PlanRow:
    """``row`` filled for the fitting setup ``s`` at micro-batch ``batch``: breakdown at the peak, MFU
    (measured where a recorded run calibrates it) and tokens/s."""
    mem = step_memory(s, batch)
    row.reserved = reserved_on(s, batch, gpu.usable_bytes) if by_reserve(s) else None
    row.device_total = row.reserved + gpu.context_bytes if row.reserved is not None else None
    row.status = "fits"
    row.gradient_checkpointing = s.gradient_checkpointing
    row.peak, row.host_state = mem.peak, mem.host_state
    row.breakdown = dict(mem.breakdown)
    row.peak_phase = mem.peak_phase
    sizes = sizes_of(s)
    cal = None
    if calibration:
        cal = calibration.get((gpu.id, canonical_name(s.model), s.compute_dtype))
    if cal is not None:
        tp = throughput(sizes.flops_per_token(s.seq_len), gpu, s, mfu=cal.mfu, mfu_source=f"measured ({cal.runs} run{'s' * (cal.runs > 1)})")
    else:
        tp = throughput(sizes.flops_per_token(s.seq_len), gpu, s, mfu=mfu, mfu_source="assumed")
    row.mfu, row.mfu_source = tp.mfu, tp.mfu_source
    if tp.tokens_per_s is not None:
        row.tokens_per_s_per_gpu = tp.tokens_per_s
        row.tokens_per_s = tp.tokens_per_s * s.num_processes
    return row


def _no_fit(setup: TrainingSetup, batch: int, row: PlanRow, what: str) -> str:
    """Why not even ``what`` fits: the reserve against usable memory (one GPU), else the peak against the budget."""
    if by_reserve(setup):
        return (f"{what} needs more than the usable {row.budget / GIB:.1f} GiB in the caching allocator's replay "
                f"(tensor peak {row.peak_at_batch1 / GIB:.1f} GiB)")
    return f"{what} needs {row.peak_at_batch1 / GIB:.1f} GiB per GPU, budget {row.budget / GIB:.1f} GiB"


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
        n = max_seq_len_on(s, batch, gpu, headroom, row.seq_limit)
        row.max_seq_len_by_checkpointing["on" if ckpt else "off"] = n
        if n >= 1 and (best is None or n > best[1]):
            best = (s, n)
    if best is None:
        last = replace(setup, gradient_checkpointing=modes[-1], seq_len=1)
        row.gradient_checkpointing = modes[-1]
        row.peak_at_batch1 = step_memory(last, batch).peak
        row.reason = _no_fit(last, batch, row, f"micro-batch {batch} of 1 token")
        return row
    s, n = best
    row.max_seq_len, row.max_micro_batch, row.at_cap = n, batch, n >= row.seq_limit
    return _fits(row, replace(s, seq_len=n), batch, gpu, calibration, mfu)


def min_gpus_to_fit(setup: TrainingSetup, gpu: GPU, *, sharding: str = "fsdp", headroom: float = DEFAULT_HEADROOM,
                    max_gpus: int = 1024) -> int | None:
    """The fewest GPUs (2..``max_gpus``) on which micro-batch 1 of ``setup`` fits under ``sharding`` (None: not
    even ``max_gpus``, or the optimizer cannot run so). The per-GPU peak falls as GPUs are added: a search."""
    if not sharding_support(setup.optim, sharding, 2)[0]:
        return None
    budget = gpu.budget(headroom)

    def ok(n: int) -> bool:
        return fits(replace(setup, sharding=sharding, num_processes=n), 1, budget)

    if not ok(max_gpus):
        return None
    return largest(lambda n: n == 1 or not ok(n), max_gpus - 1) + 1  # one past the last count that does not fit


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


# ---------------------------------------------------------------------------------------------- the whole plan
@dataclass
class Plan:
    """Every optimizer x GPU answer of one setup, what would fit otherwise, and the recommendation."""

    base: TrainingSetup
    """The setup planned (its optimizer is the first planned; the search varies batch or sequence)."""
    architecture: str
    sizes: ModelSizes
    gpus: list[GPU]
    optims: list[str]
    """The optimizers planned, in order (those refused as a whole are in ``skipped``)."""
    rows: list[PlanRow]
    search: str = "batch"
    """``batch``: the largest micro-batch at ``base.seq_len``; ``seq``: the longest sequence at ``batch_size``."""
    batch_size: int = 1
    checkpointing: str = "auto"
    headroom: float = DEFAULT_HEADROOM
    mfu: float = DEFAULT_MFU
    skipped: list[dict] = field(default_factory=list)
    to_fit: dict[str, dict[str, dict]] = field(default_factory=dict)
    """``{optim: {gpu id: {fsdp: n | None, zero3: n | None[, with_checkpointing: bool]}}}`` where it did not fit."""
    recommendation: dict = field(default_factory=dict)
    offload: dict[str, dict] = field(default_factory=dict)
    """``{optim: offer}`` for an optimizer that fits no listed GPU: the least CPU offload under which micro-batch 1
    fits the largest of them (:func:`optimem.estimators.offload_plan.offload_offers`)."""
    calibration: dict[tuple[str, str, str], Calibration] = field(default_factory=dict)
    calibration_files: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.base.model

    @property
    def flops_per_token(self) -> float:
        return self.sizes.flops_per_token(self.base.seq_len)

    def row(self, optim: str, gpu: str) -> PlanRow | None:
        return next((r for r in self.rows if r.optim == optim and r.gpu == gpu), None)

    def to_dict(self) -> dict[str, Any]:
        b = self.base
        return {
            "model": self.model, "architecture": self.architecture, "facts": asdict(self.sizes), "search": self.search,
            "setup": {"dtype": b.dtype, "mixed_precision": b.mixed_precision, "seq_len": b.seq_len,
                      **({"batch_size": self.batch_size} if self.search == "seq" else {}),
                      **{k: v for k, v in b.to_dict().items()
                         if k in ("lora", "quantize", "double_quant", "quant_compute_dtype", "prepare_kbit")},
                      "gradient_checkpointing": self.checkpointing, "num_gpus": b.num_processes,
                      "sharding": b.sharding, "headroom": self.headroom, "assumed_mfu": self.mfu},
            "flops_per_token": self.flops_per_token,
            "gpus": [{**asdict(g), "usable_bytes": g.usable_bytes, "budget_bytes": g.budget(self.headroom)}
                     for g in self.gpus],
            "rows": [r.to_dict() for r in self.rows], "to_fit": self.to_fit, "offload": self.offload,
            "recommendation": self.recommendation, "skipped": self.skipped,
            "calibration": [asdict(c) for c in self.calibration.values()],
            "calibration_files": self.calibration_files,
        }


def _check_peak(setup: TrainingSetup) -> None:
    """Planning fits the whole-step peak: refuse, in one line, a setup the estimator has no peak for."""
    est = estimate(setup, batch_size=1, device="cuda")
    if est.bytes["peak"] is None:
        raise UserError(f"planning fits the whole-step peak, and for this setup there is none: {est.notes[-1]}")


def plan(base: TrainingSetup | Any, optims: Sequence[str] | None = None, gpus: str | Sequence[str | GPU] = "all", *,
         search: str = "batch", batch_size: int = 1, checkpointing: str = "auto",
         headroom: float = DEFAULT_HEADROOM, mfu: float = DEFAULT_MFU, records: Iterable[Mapping] = (),
         calibration_files: Sequence[str] = (), gpu_files: Sequence[str] = (), strict: bool = False,
         optim_args: str | Mapping | None = None, optim_target_modules: str | Sequence[str] | None = None,
         **fields: Any) -> Plan:
    """Plan ``base`` (a :class:`TrainingSetup`, or a model for :func:`plan_setup` with ``fields``) for each of
    ``optims`` (default :data:`DEFAULT_OPTIMS`; the setup's optimizer arguments applied where read) on each of
    ``gpus`` (catalog ids, 'all', or :class:`GPU` objects; ``gpu_files`` add GPUs). ``search``: ``batch`` (the
    largest micro-batch) or ``seq`` (the longest sequence at ``batch_size``). ``records``: run records that
    calibrate MFU. ``strict``: an optimizer that cannot be planned raises instead of being skipped.
    ``optim_args`` / ``optim_target_modules`` (default: the setup's) apply to each optimizer where it reads them."""
    if search not in ("batch", "seq"):
        raise UserError(f"search must be 'batch' or 'seq', got {search!r}")
    if checkpointing not in ("auto", "on", "off"):
        raise UserError(f"checkpointing must be auto, on or off, got {checkpointing!r}")
    optims = list(optims or DEFAULT_OPTIMS)
    if not isinstance(base, TrainingSetup):
        base = plan_setup(base, optims[0], **fields)
    args = base.optim_args if optim_args is None else optim_args
    targets = base.optim_target_modules if optim_target_modules is None else optim_target_modules

    def for_optim(optim: str) -> TrainingSetup:
        return base.with_optimizer(optim, args, targets)

    catalog = load_gpus(gpu_files)
    chosen = [g for g in gpus if isinstance(g, GPU)] if not isinstance(gpus, str) else []
    names = [g for g in ([gpus] if isinstance(gpus, str) else gpus) if not isinstance(g, GPU)]
    gpu_list = chosen + (select_gpus(names, catalog) if names else [])
    if search == "seq":
        base = replace(base, seq_len=1)  # the search sets it (up to the model's position limit)
    base.check_trainable()  # the model config and the sequence length, once, before any optimizer is planned
    base = replace(base, model=resolve(base.model).name)
    first = for_optim(optims[0])
    if base.peft:
        _check_peak(first)
    inv_setup = first
    calibration = calibrate(records, catalog)
    rows: list[PlanRow] = []
    skipped: list[dict] = []
    for optim in optims:
        setup = for_optim(optim)
        per_optim = []
        for gpu in gpu_list:
            if base.mixed_precision == "bf16" and not gpu.tflops.get("bf16"):
                per_optim.append(PlanRow(optim=optim, gpu=gpu.id, gpu_name=gpu.name, status="unsupported",
                                         reason=f"{gpu.name} has no bf16: the Trainer refuses bf16=True there; "
                                                "use --fp16", budget=gpu.budget(headroom),
                                         num_gpus=base.num_processes, sharding=base.sharding))
                continue
            try:
                if search == "seq":
                    per_optim.append(plan_seq(setup, gpu, batch=batch_size, headroom=headroom,
                                              checkpointing=checkpointing, calibration=calibration, mfu=mfu))
                else:
                    per_optim.append(plan_one(setup, gpu, headroom=headroom, checkpointing=checkpointing,
                                              calibration=calibration, mfu=mfu))
            except UserError as exc:
                if strict:
                    raise
                skipped.append({"optim": optim, "reason": str(exc)})
                per_optim = []
                break
        rows.extend(per_optim)
    if not rows:
        raise UserError("nothing to plan: " + "; ".join(f"{s['optim']}: {s['reason']}" for s in skipped))
    planned = [o for o in optims if any(r.optim == o for r in rows)]
    out = Plan(base=first, architecture=_architecture(inv_setup), sizes=sizes_of(inv_setup), gpus=gpu_list,
               optims=planned, rows=rows, search=search, batch_size=batch_size, checkpointing=checkpointing,
               headroom=headroom, mfu=mfu, skipped=skipped, calibration=calibration,
               calibration_files=list(calibration_files))
    if search == "batch":
        out.to_fit = {o: _to_fit(out, for_optim(o))
                      for o in planned}
        out.offload = offload_offers(out, for_optim)
    out.recommendation = recommend(out)
    return out


def _architecture(setup: TrainingSetup) -> str:
    return setup_inventory(setup).architecture


def size_key(gpu: GPU) -> tuple:
    """A price proxy with no prices: nominal memory, then compute (an A100 80GB before an H100)."""
    return (gpu.memory_gb, gpu.tflops.get("bf16") or gpu.tflops.get("fp16") or 0, gpu.budget(0.0))


def _to_fit(p: Plan, setup: TrainingSetup) -> dict:
    """For each GPU an optimizer does not fit: the fewest such GPUs on which micro-batch 1 fits under FSDP and
    under ZeRO-3 (None: not even 1024, or the optimizer cannot run so), and whether gradient checkpointing alone
    would do when it was turned off. ``{gpu id: {...}}``."""
    s = replace(setup, gradient_checkpointing=p.checkpointing != "off")
    out: dict = {}
    for g in p.gpus:
        r = p.row(setup.optim, g.id)
        if r is None or r.status != "no_fit":
            continue
        hint: dict = {}
        if p.checkpointing == "off":
            hint["with_checkpointing"] = fits(replace(setup, gradient_checkpointing=True), 1, g.budget(p.headroom))
        for sh in ("fsdp", "zero3"):
            hint[sh] = min_gpus_to_fit(s, g, sharding=sh, headroom=p.headroom)
        out[g.id] = hint
    return out


def cheapest_to_fit(p: Plan, optim: str, k: int = 3) -> list[str]:
    """The ``k`` multi-GPU options for an optimizer that fits no single listed GPU, least total memory first
    (a price proxy): '2x h200 (fsdp)'."""
    gpus = {g.id: g for g in p.gpus}
    opts = []
    for gid, h in (p.to_fit.get(optim) or {}).items():
        for sh in ("fsdp", "zero3"):
            if h.get(sh):
                opts.append((h[sh] * gpus[gid].total_bytes, h[sh], gid, sh))
    opts.sort()
    seen, out = set(), []
    for _, n, gid, sh in opts:
        if gid in seen:
            continue
        seen.add(gid)
        out.append(f"{n}x {gid} ({sh})")
        if len(out) == k:
            break
    return out


def recommend(p: Plan) -> dict:
    """The cheapest fitting choice (lowest $/token where every fitting GPU has a price, else the smallest
    fitting GPU, then most tokens/s) and the fastest: ``{cheapest, cheapest_basis, fastest}`` (rows as dicts),
    or ``{}`` when nothing fits."""
    by_id = {g.id: g for g in p.gpus}
    fit = [r for r in p.rows if r.status == "fits"]
    if not fit:
        return {}
    priced = all(by_id[r.gpu].usd_per_hour is not None and r.tokens_per_s for r in fit)
    if priced:
        cheapest = min(fit, key=lambda r: by_id[r.gpu].usd_per_hour * r.num_gpus / r.tokens_per_s)
        basis = "lowest cost per token (usd_per_hour from the GPU file)"
    else:
        cheapest = min(fit, key=lambda r: (size_key(by_id[r.gpu]), -(r.tokens_per_s or 0), -r.max_micro_batch))
        basis = "the smallest GPU that fits, then the most tokens/s: no prices in the catalog"
    fastest = max(fit, key=lambda r: r.tokens_per_s or 0)
    return {"cheapest": cheapest.to_dict(), "cheapest_basis": basis, "fastest": fastest.to_dict()}


__all__ = ["CHECKED_ON_CPU", "DEFAULT_OPTIMS", "Plan", "PlanRow", "cheapest_to_fit", "memory_vs_gpus",
           "min_gpus_to_fit", "plan", "plan_one", "plan_seq", "recommend", "size_key", "verification_note"]
