"""The GPU campaign's priority list, as data: what to measure first when a GPU is lent for a few minutes.

:func:`campaign_jobs` returns the jobs in the order the campaign runs them (:mod:`optimem.harness.campaign` runs them
until its budget is spent); each job is a ``bench run``-equivalent :class:`~optimem.harness.run_config.RunConfig`
(or, for tier 1, the CUDA-only pytest files). The tiers are issue 26's list:

1. the CUDA-only tests (``test_gpu_state_exact.py`` and the CUDA tracker tests);
2. every registered optimizer x a ~0.5B model x one shape, fp32 weights + bf16 autocast, then pure bf16
   (one optimizer per family in both precisions first, then the rest of the registry likewise: a short campaign
   still covers every family);
3. the optimizer families x a ~1.5B model x two shapes, checkpointing on/off, ``--fp16`` once, eager attention once;
4. LoRA and QLoRA (nf4, double quant) on the ~1.5B model;
5. the published setups (BERT-large rows of the transformers single-GPU guide, peft's MetaMathQA LoRA rows):
   read from ``results/published_gpu.json`` when it exists, else from :data:`PUBLISHED_FALLBACK`, which names the
   same setups and holds no figure;
6. with time left: a 3B model for the families.

With ``rehearse=True`` every model is replaced by a tiny config of the same family (:data:`REHEARSAL_MODEL`) and
every shape by a small one, so the whole list runs on a CPU in seconds: the GPU run cannot then fail on a typo, a
missing package or an import. No torch import here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimem.estimators import REGISTRY
from optimem.estimators.catalog import catalog, resolve
from optimem.estimators.errors import UserError
from optimem.harness.env_facts import REPO_ROOT
from optimem.harness.run_config import RunConfig

SMALL, MID, BIG = "Qwen/Qwen2.5-0.5B", "Qwen/Qwen3-1.7B", "meta-llama/Llama-3.2-3B"
"""The ~0.5B, ~1.5B and 3B models of tiers 2, 3 and 6 (bundled catalog configs: no download)."""

REHEARSAL_MODEL = {SMALL: "tiny-qwen2", MID: "tiny-qwen3", BIG: "tiny-llama", "bert-large-uncased": "tiny-bert",
                   "google-bert/bert-large-uncased": "tiny-bert"}
"""What each model of the list becomes in a rehearsal (a tiny config of the same architecture)."""

SHAPES = {2: [(4, 512)], 3: [(4, 512), (8, 1024)], 4: [(4, 512)], 6: [(4, 512)]}
"""(batch, sequence) per tier on the GPU."""
REHEARSAL_SHAPE = (2, 32)
GPU_STEPS, GPU_WARMUP = 3, 1
REHEARSAL_STEPS, REHEARSAL_WARMUP = 2, 1

PUBLISHED_JSON = REPO_ROOT / "results" / "published_gpu.json"
"""Written by issue 22 (results/published_gpu.md's data): a list of rows (or ``{"rows": [...]}``), each with
``id``, ``model`` and the setup's fields (``task``, ``batch_size``, ``seq_len``, ``grad_accum``,
``gradient_checkpointing``, ``dtype``, ``mixed_precision``, ``optim``, ``lora``), plus ``source`` and the
published figure (``published``)."""

_BERT_GUIDE = ("transformers docs v4.21 'Efficient Training on a Single GPU' (perf_train_gpu_one): bert-large-uncased, "
               "sequence classification, random tokens, seq 512")
_PEFT_MMQA = ("huggingface/peft method_comparison/MetaMathQA: Llama-3.2-3B in bf16, batch 4, max_seq_length 768, "
              "AdamW; LoRA target_modules null = peft's default for Llama (q_proj, v_proj); peft pads to the longest "
              "sample of a batch and trains in its own loop, we train the Trainer on full 768-token rows")
PUBLISHED_FALLBACK: tuple[dict[str, Any], ...] = (
    {"id": "bert-large-vanilla", "model": "bert-large-uncased", "task": "sequence-classification", "batch_size": 4,
     "seq_len": 512, "optim": "adamw_torch", "source": _BERT_GUIDE},
    {"id": "bert-large-grad-accum", "model": "bert-large-uncased", "task": "sequence-classification",
     "batch_size": 1, "grad_accum": 4, "seq_len": 512, "optim": "adamw_torch", "source": _BERT_GUIDE},
    {"id": "bert-large-checkpointing", "model": "bert-large-uncased", "task": "sequence-classification",
     "batch_size": 1, "grad_accum": 4, "gradient_checkpointing": True, "seq_len": 512, "optim": "adamw_torch",
     "source": _BERT_GUIDE},
    {"id": "bert-large-fp16", "model": "bert-large-uncased", "task": "sequence-classification", "batch_size": 1,
     "grad_accum": 4, "gradient_checkpointing": True, "mixed_precision": "fp16", "seq_len": 512,
     "optim": "adamw_torch", "source": _BERT_GUIDE},
    {"id": "bert-large-adafactor", "model": "bert-large-uncased", "task": "sequence-classification",
     "batch_size": 1, "grad_accum": 4, "gradient_checkpointing": True, "mixed_precision": "fp16", "seq_len": 512,
     "optim": "adafactor", "source": _BERT_GUIDE},
    {"id": "bert-large-8bit-adam", "model": "bert-large-uncased", "task": "sequence-classification",
     "batch_size": 1, "grad_accum": 4, "gradient_checkpointing": True, "mixed_precision": "fp16", "seq_len": 512,
     "optim": "adamw_bnb_8bit", "source": _BERT_GUIDE},
    {"id": "peft-mmqa-lora-r32", "model": BIG, "dtype": "bf16", "batch_size": 4, "seq_len": 768,
     "optim": "adamw_torch", "lora": "r=32,alpha=64,dropout=0.0,target=[q_proj,v_proj]", "source": _PEFT_MMQA},
    {"id": "peft-mmqa-lora-r64", "model": BIG, "dtype": "bf16", "batch_size": 4, "seq_len": 768,
     "optim": "adamw_torch", "lora": "r=64,alpha=128,dropout=0.0,target=[q_proj,v_proj]", "source": _PEFT_MMQA},
)
"""The published setups when ``results/published_gpu.json`` is absent: the same rows, no published figure (the
figures are issue 22's, in results/published_gpu.md)."""

PYTEST_FILES = ("test_harness_trackers.py", "test_gpu_state_exact.py")
PYTEST_SELECT = "test_gpu_state_exact or cuda or nvml"
"""Tier 1: these test files, in this order (the tracker file's three CUDA tests are quick; the state exactness file
trains every GPU-only optimizer) found anywhere under tests/, ``-k`` this
selection (pytest matches the module's name too: test_gpu_state_exact.py runs whole, the tracker file its CUDA and
NVML tests)."""


@dataclass(frozen=True)
class Job:
    """One item of the list: ``kind`` ``run`` (``config``) or ``pytest`` (``argv``). ``tier`` 1-6, ``name`` a
    stable id, ``published`` the published setup's row (tier 5), ``unresolved`` why it cannot run here (a model
    that is not in the offline catalog: the GPU machine reaches no Hub)."""

    tier: int
    name: str
    kind: str = "run"
    config: RunConfig | None = None
    argv: tuple[str, ...] = ()
    published: dict[str, Any] | None = None
    unresolved: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "name": self.name, "kind": self.kind,
                "config": self.config.to_dict() if self.config is not None else None, "argv": list(self.argv),
                "published": self.published, "unresolved": self.unresolved, "note": self.note}


def cuda_optimizers() -> list[str]:
    """Every registered optimizer optimem estimates and a CUDA Trainer can run, one per family first (registry
    order), then the rest."""
    names = [s.name for s in REGISTRY.values() if s.availability == "ok"]
    seen, first, rest = set(), [], []
    for n in names:
        fam = REGISTRY[n].family
        (rest if fam in seen else first).append(n)
        seen.add(fam)
    return first + rest


def family_representatives() -> list[str]:
    """The first optimizer of each family (registry order): tiers 3 and 6."""
    return cuda_optimizers()[:len({REGISTRY[n].family for n in cuda_optimizers()})]


def _optim_fields(optim: str, dtype: str, mixed: str | None) -> dict[str, Any]:
    """What an optimizer needs to run in this precision: target modules for GaLore/APOLLO (all-linear), and
    FlashOptim's ``master_weight_bits=None`` for fp32 parameters (it refuses all-fp32 parameters otherwise)."""
    spec = REGISTRY[optim]
    out: dict[str, Any] = {"optim": optim}
    if spec.needs_target_modules:
        out["optim_target_modules"] = "all-linear"
    if dtype == "fp32" and spec.defaults.get("master_weight_bits") is not None:
        out["optim_args"] = "master_weight_bits=None"
    return out


def _run(tier: int, name: str, rehearse: bool, **kw: Any) -> Job:
    model = kw.pop("model")
    if rehearse:
        kw["model"] = REHEARSAL_MODEL.get(model, "tiny-llama")
        kw["batch_size"], kw["seq_len"] = REHEARSAL_SHAPE
        kw["steps"], kw["warmup"] = REHEARSAL_STEPS, REHEARSAL_WARMUP
        kw["device"] = "cpu"
        if kw.get("grad_accum", 1) > 1:
            kw["grad_accum"] = 2
    else:
        kw["model"] = model
        kw.setdefault("steps", GPU_STEPS)
        kw.setdefault("warmup", GPU_WARMUP)
        kw["device"] = "cuda"
    unresolved = None
    try:
        resolve(kw["model"]) if kw["model"] in catalog() or rehearse else _offline_only(kw["model"])
        cfg = RunConfig(**{k: v for k, v in kw.items() if v is not None})
    except UserError as exc:
        unresolved, cfg = str(exc), None
    return Job(tier, name, "run", cfg, unresolved=unresolved)


def _offline_only(model: str) -> None:
    """A model that the GPU machine can build: a catalog name or a local config (it reaches no Hub)."""
    if not Path(model).exists() and model not in catalog() and model.split("/")[-1] not in \
            {k.split("/")[-1] for k in catalog()}:
        raise UserError(f"{model}: not in the bundled catalog and not a local config.json (the GPU machine reaches "
                        "no Hugging Face Hub): add its config to estimators/configs/")
    resolve(model)


def published_setups(path: Path = PUBLISHED_JSON) -> tuple[list[dict[str, Any]], str]:
    """(rows, where they came from): ``results/published_gpu.json``'s rows when the file exists and reads,
    else :data:`PUBLISHED_FALLBACK` (and the sentence says so)."""
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            rows = data.get("rows", data.get("setups")) if isinstance(data, dict) else data
            if isinstance(rows, list) and rows and all(isinstance(r, dict) and r.get("model") for r in rows):
                return [dict(r) for r in rows], f"read from {path.name}"
            why = "it holds no list of rows with a 'model' each"
        except (OSError, ValueError) as exc:
            why = f"it does not read ({exc})"
        return list(PUBLISHED_FALLBACK), f"{path.name} is not usable ({why}): the module's own table of the same setups"
    return list(PUBLISHED_FALLBACK), (f"{path.name} does not exist yet (issue 22): the module's own table naming the "
                                      "same setups, without published figures")


_SETUP_KEYS = ("task", "dtype", "mixed_precision", "batch_size", "seq_len", "grad_accum", "gradient_checkpointing",
               "attn_implementation", "optim", "optim_args", "optim_target_modules", "lora", "quantize",
               "double_quant", "quant_compute_dtype")


def campaign_jobs(rehearse: bool = False, *, published_path: Path = PUBLISHED_JSON) -> list[Job]:
    """The whole list, in priority order (tier, then the order within the tier); see the module docstring."""
    jobs: list[Job] = [_pytest_job()]
    families = family_representatives()
    rest = [o for o in cuda_optimizers() if o not in families]
    precisions = (("bf16-autocast", "fp32", "bf16"), ("bf16", "bf16", None))
    passes = [(group, *p) for group in (families, rest) for p in precisions]
    for optims, precision, dtype, mixed in passes:  # every family in both precisions first, then the rest
        for b, s in SHAPES[2]:
            for o in optims:
                jobs.append(_run(2, f"t2/{o}/{precision}/{b}x{s}", rehearse, model=SMALL, dtype=dtype,
                                 mixed_precision=mixed, batch_size=b, seq_len=s, **_optim_fields(o, dtype, mixed)))
    for b, s in SHAPES[3]:
        for gc in (False, True):
            for o in families:
                jobs.append(_run(3, f"t3/{o}/bf16-autocast/{b}x{s}/gc={int(gc)}", rehearse, model=MID, dtype="fp32",
                                 mixed_precision="bf16", batch_size=b, seq_len=s, gradient_checkpointing=gc,
                                 **_optim_fields(o, "fp32", "bf16")))
    b, s = SHAPES[3][0]
    jobs.append(_run(3, f"t3/adamw_torch/fp16-autocast/{b}x{s}", rehearse, model=MID, dtype="fp32",
                     mixed_precision="fp16", batch_size=b, seq_len=s, optim="adamw_torch"))
    jobs.append(_run(3, f"t3/adamw_torch/bf16-autocast/{b}x{s}/eager", rehearse, model=MID, dtype="fp32",
                     mixed_precision="bf16", batch_size=b, seq_len=s, attn_implementation="eager", optim="adamw_torch"))
    for b, s in SHAPES[4]:
        jobs.append(_run(4, f"t4/lora/{b}x{s}", rehearse, model=MID, dtype="bf16", batch_size=b, seq_len=s,
                         optim="adamw_torch", lora="r=16,alpha=32,target=all-linear"))
        jobs.append(_run(4, f"t4/qlora-nf4-dq/{b}x{s}", rehearse, model=MID, dtype="bf16", mixed_precision="bf16",
                         batch_size=b, seq_len=s, optim="adamw_torch", lora="r=16,alpha=32,target=all-linear",
                         quantize="nf4", double_quant=True, quant_compute_dtype="bf16"))
    rows, source = published_setups(published_path)
    for row in rows:
        job = _run(5, f"t5/{row.get('id') or row['model']}", rehearse, model=row["model"],
                   **{k: row[k] for k in _SETUP_KEYS if row.get(k) is not None})
        jobs.append(replace(job, published=row, note=f"published setups {source}"))
    for b, s in SHAPES[6]:
        for o in families:
            jobs.append(_run(6, f"t6/{o}/bf16-autocast/{b}x{s}", rehearse, model=BIG, dtype="fp32",
                             mixed_precision="bf16", batch_size=b, seq_len=s, **_optim_fields(o, "fp32", "bf16")))
    return jobs


def _pytest_job() -> Job:
    tests = REPO_ROOT / "tests"
    found = [sorted(tests.rglob(name)) for name in PYTEST_FILES]
    missing = [n for n, f in zip(PYTEST_FILES, found) if not f]
    files = [str(f[0].relative_to(REPO_ROOT)) for f in found if f]
    # -v: one line per test as it ends, so a run cut off by the budget still says which tests passed
    argv = ("-m", "pytest", "-o", "addopts=", "-v", "-rs", "-p", "no:cacheprovider", "-k", PYTEST_SELECT, *files) if files else ()
    return Job(1, "t1/cuda-tests", "pytest", argv=argv,
               unresolved=f"test files not found under tests/: {', '.join(missing)}" if missing else None)


__all__ = ["BIG", "MID", "PUBLISHED_FALLBACK", "PUBLISHED_JSON", "REHEARSAL_MODEL", "SMALL", "Job", "campaign_jobs",
           "cuda_optimizers", "family_representatives", "published_setups"]
