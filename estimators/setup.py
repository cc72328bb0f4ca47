"""The training setup: everything that shapes a Trainer run's memory, in one frozen, validated value.

A :class:`TrainingSetup` is what the estimator predicts for, ``bench run`` trains (the harness's run
configuration extends it), the planner varies and a sweep lists. It is built and checked once at the edge
(:meth:`TrainingSetup.__post_init__` raises :class:`SetupError` naming the field); ``to_dict`` / ``from_dict`` are
its record form (older records read back with the defaults); :data:`CLI` is each field's command-line flag
(``harness/commands/setup_args.py`` builds argparse from it). A ``TrainingArguments`` becomes a setup in
:mod:`optimem.estimators.user_objects`. Sizes are counts (samples, tokens, steps), not bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .adapters import FOUR_BIT, LoraSpec, quantization
from .catalog import DEFAULT_MODEL, ModelSource, resolve
from .errors import UserError
from .inventory import build_inventory
from .model_check import check_model_config
from .offload_config import OFFLOAD_DEVICES, read_deepspeed, read_fsdp
from .optimizers import get_spec, parse_optim_args
from .params import TASK_CLASSES, normalize_dtype
from .setup_fields import ALL_LINEAR, SetupError
from .setup_fields import choice as _choice, mixed_precision as _mixed_precision, named_field as _field
from .setup_fields import positive_int as _positive_int, regex as _regex, targets as _targets
from .vision import check_image_fields, check_keyword_freeze, check_text_length, freeze_pattern

TASKS = tuple(TASK_CLASSES)
"""Model heads a setup can train (``optimem.estimators.params.TASK_CLASSES``): ``causal-lm``, the default, builds the
class the config names (else a causal LM, or a seq2seq LM for an encoder-decoder); the others build
``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification`` / ``AutoModelForSeq2SeqLM``."""
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DEVICES = ("auto", "cuda", "cpu")
"""``auto``: CUDA when there is one (the harness resolves it; the estimator predicts for CUDA)."""
SHARDINGS = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp")
MIXED_PRECISIONS = (None, "bf16", "fp16")
DEFAULT_TARGETS = ALL_LINEAR
"""What GaLore/APOLLO project when no ``optim_target_modules`` are given by a command that fills a default."""

LIGER_OPTIONS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy", "cross_entropy")
"""The ``liger_kernel_config`` keys (the ``apply_liger_kernel_to_<model>`` switches optimem reads)."""
LIGER_MODELLED = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose Liger patch uses only the kernels :mod:`optimem.estimators.trace.liger_rules` rules."""



@dataclass(frozen=True)
class Flag:
    """How one setup field appears on the command line: the flag names, the argparse ``type`` (a
    converter of one string), ``choices``, ``metavar`` and ``help``; ``switch`` for a boolean that takes no
    value (``--gradient-checkpointing``); ``listed`` for a field whose one value is a list of strings
    (``--optim-target-modules a b``)."""

    names: tuple[str, ...]
    help: str
    type: Any = str
    choices: tuple | None = None
    metavar: str | None = None
    switch: bool = False
    listed: bool = False
    commas: bool = False
    """The value may hold commas (``--lora r=16,alpha=32``): a sweep never splits it into several values."""


CLI: dict[str, Flag] = {
    "model": Flag(("--model",), "catalog name, path to a config.json, or Hugging Face Hub id org/name[@REV] "
                  "(config.json only, through the HF cache)", metavar="MODEL"),
    "task": Flag(("--task",), "the model head trained (default causal-lm: the config's own architecture)",
                 choices=TASKS),
    "dtype": Flag(("--dtype",), "dtype the parameters are stored in: fp32, bf16, fp16", metavar="DTYPE"),
    "mixed_precision": Flag(("--mixed-precision",), "Trainer autocast: none, bf16 (TrainingArguments(bf16=True)) "
                            "or fp16; the parameters stay in --dtype", metavar="{none,bf16,fp16}"),
    "batch_size": Flag(("--batch-size",), "per-device batch size", int, metavar="B"),
    "seq_len": Flag(("--seq-len",), "tokens per sample", int, metavar="S"),
    "grad_accum": Flag(("--grad-accum",), "gradient accumulation steps", int, metavar="K"),
    "gradient_checkpointing": Flag(("--gradient-checkpointing",), "the Trainer's gradient checkpointing "
                                   "(non-reentrant, every layer)", switch=True),
    "attn_implementation": Flag(("--attn-implementation",), "attention implementation (sdpa is what the Trainer "
                                "gets)", choices=ATTN_IMPLEMENTATIONS),
    "optim": Flag(("--optim",), "optimizer, as TrainingArguments(optim=...) takes it", metavar="NAME"),
    "optim_args": Flag(("--optim-args",), "the Trainer's optim_args string, e.g. 'rank=16'", metavar="STR"),
    "optim_target_modules": Flag(("--optim-target-modules",), "GaLore/APOLLO targets: names, regexes or "
                                 "all-linear (default for those: all-linear)", metavar="REGEX", listed=True),
    "freeze": Flag(("--freeze",), "freeze the parameters whose name matches this regex; for a vision-language model "
                   "also vision (the vision tower), projector, or vision,projector", metavar="REGEX"),
    "num_processes": Flag(("--nproc", "--num-gpus"), "training processes / GPUs in all (data parallel; the "
                          "Trainer's world size)", int, metavar="N"),
    "num_nodes": Flag(("--nnodes",), "machines the processes are spread over (evenly: --nproc / --nnodes per node); "
                      "host RAM is reported per node", int, metavar="M"),
    "sharding": Flag(("--sharding",), "none (one process), ddp, zero1, zero2, zero3 (DeepSpeed), fsdp "
                     "(FSDP2 full shard)", choices=SHARDINGS),
    "deepspeed": Flag(("--deepspeed",), "the DeepSpeed config JSON you pass to the Trainer "
                      "(TrainingArguments(deepspeed=...)): ZeRO stage, offload_optimizer / offload_param to cpu or "
                      "nvme, pin_memory, bucket sizes; 'auto' resolved as the Trainer does", metavar="CONFIG.json"),
    "fsdp": Flag(("--fsdp",), "the Trainer's fsdp option string, e.g. 'full_shard auto_wrap' or "
                 "'full_shard offload auto_wrap' (FSDP2; offload: CPUOffloadPolicy)", metavar="OPTIONS"),
    "fsdp_config": Flag(("--fsdp-config",), "the Trainer's fsdp_config (JSON file or text)", metavar="JSON"),
    "offload_optimizer": Flag(("--offload-optimizer",), "where the optimizer state and step live (set by --deepspeed "
                              "/ --fsdp; direct use: the planner's offers): none, cpu, nvme", choices=OFFLOAD_DEVICES),
    "offload_param": Flag(("--offload-param",), "where ZeRO-3 / FSDP keep the sharded parameters (set by "
                          "--deepspeed / --fsdp): none, cpu, nvme", choices=OFFLOAD_DEVICES),
    "use_liger_kernel": Flag(("--use-liger-kernel",), "TrainingArguments(use_liger_kernel=True): liger-kernel's "
                             "RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (Llama-family models; the Triton "
                             "kernels are rules from liger's source, not measured)", switch=True),
    "liger_kernel_config": Flag(("--liger-kernel-config",), "TrainingArguments(liger_kernel_config=...) as JSON, e.g. "
                                "'{\"rope\": false}' (keys: rope, rms_norm, swiglu, fused_linear_cross_entropy)",
                                metavar="JSON"),
    "padding_free": Flag(("--padding-free", "--packing"), "padding-free packing (DataCollatorWithFlattening): each "
                         "micro-batch is one row of its samples' tokens with position_ids restarting per sample; "
                         "tokens per micro-batch = batch x seq, or the worst micro-batch of --data", switch=True),
    "group_by_length": Flag(("--group-by-length",), "TrainingArguments(train_sampling_strategy='group_by_length'), "
                            "formerly group_by_length=True: the samples of --data "
                            "padded to the longest of each micro-batch, drawn by LengthGroupedSampler; the estimate is "
                            "for the worst micro-batch, batch x the file's longest sample", switch=True),
    "device": Flag(("--device",), "training device: auto (CUDA if present), cuda or cpu", choices=DEVICES),
    "lora": Flag(("--lora",), "train a peft LoRA adapter instead of the whole model: peft's LoraConfig as "
                 "'r=16,alpha=32,dropout=0.05,target=all-linear' (target: all-linear, a regex fully matching module "
                 "names, or [name,name]; also modules_to_save=[..], dora=true, bias=none|all|lora_only), or none",
                 metavar="SPEC", commas=True),
    "quantize": Flag(("--quantize",), "load the base model quantized by bitsandbytes (BitsAndBytesConfig): nf4 or "
                     "fp4 (4-bit, QLoRA) or int8 (LLM.int8()); needs --lora", metavar="{nf4,fp4,int8}"),
    "double_quant": Flag(("--double-quant",), "4-bit: quantize the absmax constants too "
                         "(bnb_4bit_use_double_quant)", switch=True),
    "quant_compute_dtype": Flag(("--compute-dtype",), "4-bit layers' matmul dtype (bnb_4bit_compute_dtype): fp32 "
                                "(bitsandbytes' default), bf16 or fp16", metavar="DTYPE"),
    "quant_skip_modules": Flag(("--quant-skip-modules",), "modules left unquantized besides the output head "
                               "(llm_int8_skip_modules; replaces the head default, as transformers does)",
                               metavar="NAME", listed=True),
    "prepare_kbit": Flag(("--prepare-kbit",), "call peft's prepare_model_for_kbit_training (fp32 upcast of the "
                         "unquantized parameters; checkpointing follows --gradient-checkpointing); default on "
                         "with --quantize", metavar="{on,off}"),
    "image_size": Flag(("--image-size",), "image-text-to-text: image side in pixels (default: the config's)", int,
                       metavar="PX"),
    "images_per_sample": Flag(("--images-per-sample",), "image-text-to-text: images per sample (default 1; --seq-len "
                              "counts the text tokens)", int, metavar="N"),
}
"""The command-line form of every field (the argparse ``dest`` is the field name)."""


@dataclass(frozen=True)
class TrainingSetup:
    """One training configuration, as far as memory is concerned (see the module doc). Sizes are counts
    (samples, tokens, steps); nothing here is in bytes.

    ``model``: a catalog name or a config.json path (or its directory). ``task``: the head trained.
    ``dtype``: the parameters' storage dtype; ``mixed_precision``: the Trainer's autocast (``bf16``/``fp16``,
    None for none). ``batch_size``: per-device micro-batch; ``seq_len``: tokens per sample;
    ``grad_accum``: micro-batches per optimizer step. ``gradient_checkpointing``: the Trainer's
    non-reentrant checkpointing of every layer. ``attn_implementation``: ``sdpa`` or ``eager``.
    ``optim`` / ``optim_args`` / ``optim_target_modules``: as ``TrainingArguments`` takes them (the name is
    canonicalised; ``optim_args`` is checked against what the optimizer reads). ``freeze``: a regex of
    parameter names that get no gradient. ``num_processes`` / ``sharding``: data-parallel processes and
    how model states are split over them. ``device``: ``auto``, ``cuda`` or ``cpu``. ``num_nodes``: machines the
    processes are spread over evenly. ``deepspeed``: the DeepSpeed config the Trainer takes (a path or JSON text;
    it sets ``sharding`` and the offload fields), ``fsdp`` / ``fsdp_config``: the Trainer's FSDP options (FSDP2
    full shard; ``offload``: CPU offload). ``offload_optimizer`` / ``offload_param``: ``none``, ``cpu`` or
    ``nvme`` (see :mod:`optimem.estimators.offload_config`). ``use_liger_kernel`` / ``liger_kernel_config``: the
    Trainer's Liger patch and its keywords (JSON text). ``padding_free``: ``DataCollatorWithFlattening`` packs each
    micro-batch's samples (``batch_size`` of ``seq_len`` tokens) into one row. ``group_by_length``: the Trainer's
    ``LengthGroupedSampler`` over a data file's samples, each micro-batch padded to its longest (needs ``data``).
    ``lora``: a peft LoRA adapter (:class:`~optimem.estimators.adapters.LoraSpec`; None trains the whole model).
    ``quantize``: the base model loaded by bitsandbytes as ``nf4``/``fp4``/``int8`` (None: not quantized), with
    ``double_quant`` (4-bit absmax quantized again), ``quant_compute_dtype`` (4-bit matmul dtype; None: fp32)
    and ``quant_skip_modules`` (``llm_int8_skip_modules``); ``prepare_kbit``: peft's
    ``prepare_model_for_kbit_training`` (on unless turned off when quantized; None when not quantized).
    ``image_size`` / ``images_per_sample``: an image-text-to-text sample's images (:mod:`optimem.estimators.vision`).
    """

    model: str = DEFAULT_MODEL
    task: str = "causal-lm"
    dtype: str = "fp32"
    mixed_precision: str | None = None
    batch_size: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    optim: str = "adamw_torch"
    optim_args: str | None = None
    optim_target_modules: str | tuple[str, ...] | None = None
    freeze: str | None = None
    num_processes: int = 1
    num_nodes: int = 1
    sharding: str = "none"
    deepspeed: str | None = None
    fsdp: str | None = None
    fsdp_config: str | None = None
    offload_optimizer: str = "none"
    offload_param: str = "none"
    use_liger_kernel: bool = False
    liger_kernel_config: str | None = None
    padding_free: bool = False
    group_by_length: bool = False
    device: str = "auto"
    lora: LoraSpec | None = None
    quantize: str | None = None
    double_quant: bool = False
    quant_compute_dtype: str | None = None
    quant_skip_modules: tuple[str, ...] | None = None
    prepare_kbit: bool | None = None
    image_size: int | None = None
    images_per_sample: int = 1

    # ------------------------------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        with _field("model"):
            if not isinstance(self.model, str) or not self.model.strip():
                raise UserError(f"model must be a catalog name or a path to a config.json, got {self.model!r}")
        with _field("task"):
            put("task", _choice("task", self.task, TASKS))
        with _field("dtype"):
            put("dtype", normalize_dtype(self.dtype))
        with _field("mixed_precision"):
            put("mixed_precision", _mixed_precision(self.mixed_precision))
        for name in ("batch_size", "seq_len", "grad_accum", "num_processes", "num_nodes"):
            with _field(name):
                _positive_int(name, getattr(self, name))
        with _field("gradient_checkpointing"):
            if not isinstance(self.gradient_checkpointing, bool):
                raise UserError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        with _field("attn_implementation"):
            put("attn_implementation", _choice("attn_implementation", self.attn_implementation,
                                               ATTN_IMPLEMENTATIONS))
        with _field("optim"):
            put("optim", get_spec(self.optim).name)
        with _field("optim_args"):
            raw = self.optim_args
            if isinstance(raw, Mapping):
                pairs = {str(k): str(v) for k, v in raw.items()}
            elif isinstance(raw, (str, type(None))):
                pairs = parse_optim_args(raw)
            else:
                raise UserError(f"optim_args must be a 'key=value,...' string or a mapping, got {raw!r}")
            put("optim_args", ",".join(f"{k}={v}" for k, v in pairs.items()) or None)
        with _field("optim_target_modules"):
            put("optim_target_modules", _targets(self.optim_target_modules))
        if self.freeze is not None:
            with _field("freeze"):
                put("freeze", _regex("freeze", freeze_pattern(self.freeze)) or None)
        with _field("images_per_sample"):
            check_image_fields(self.task, None, self.images_per_sample)
        with _field("image_size"):
            check_image_fields(self.task, self.image_size, 1)
        with _field("sharding"):
            put("sharding", _choice("sharding", self.sharding, SHARDINGS))
        self._check_parallel(put)
        with _field("sharding"):
            if self.sharding == "none" and self.num_processes > 1:
                raise UserError(f"{self.num_processes} processes (--nproc {self.num_processes}) need a sharding "
                                "scheme: ddp, zero1, zero2, zero3 or fsdp")
        with _field("device"):
            put("device", _choice("device", self.device, DEVICES))
        self._check_liger(put)
        with _field("padding_free"):
            if not isinstance(self.padding_free, bool):
                raise UserError(f"padding_free must be true or false, got {self.padding_free!r}")
            if self.padding_free and self.task != "causal-lm":
                raise UserError(f"padding-free packing (DataCollatorWithFlattening) trains causal LMs, not {self.task}")
        with _field("group_by_length"):
            if not isinstance(self.group_by_length, bool):
                raise UserError(f"group_by_length must be true or false, got {self.group_by_length!r}")
            if self.group_by_length and self.task != "causal-lm":
                raise UserError(f"--group-by-length pads a data file's text samples for causal LMs, not {self.task}")
        self._check_adapters(put)

    def _check_parallel(self, put) -> None:
        """``num_nodes``, the DeepSpeed config / FSDP options (which set ``sharding`` and the offload fields) and
        the offload fields' combinations."""
        with _field("num_nodes"):
            if self.num_processes % self.num_nodes:
                raise UserError(f"{self.num_processes} processes do not spread evenly over {self.num_nodes} nodes: "
                                "--nproc counts every process (the world size), a multiple of --nnodes")
        for name in ("offload_optimizer", "offload_param"):
            with _field(name):
                put(name, _choice(name, self.offload_optimizer if name == "offload_optimizer" else
                                  self.offload_param, OFFLOAD_DEVICES))
        if self.deepspeed is not None:
            with _field("deepspeed"):
                if isinstance(self.deepspeed, Mapping):
                    put("deepspeed", json.dumps(dict(self.deepspeed), sort_keys=True))
                if self.fsdp:
                    raise UserError("deepspeed and fsdp are both set: the Trainer takes one of them")
                ds = read_deepspeed(self.deepspeed, batch_size=self.batch_size, grad_accum=self.grad_accum,
                                    mixed_precision=self.mixed_precision)
                self._derive(put, ds.sharding, ds.offload_optimizer, ds.offload_param, "--deepspeed")
        elif self.fsdp not in (None, ""):
            with _field("fsdp"):
                fs = read_fsdp(self.fsdp, self.fsdp_config)
                device = "cpu" if fs.offload else "none"
                self._derive(put, "fsdp", device, device, "--fsdp")
        else:
            with _field("fsdp_config"):
                if self.fsdp_config not in (None, ""):
                    raise UserError("fsdp_config without fsdp: give --fsdp 'full_shard auto_wrap' too")
            with _field("offload_optimizer"):
                if self.offload_optimizer != "none" and self.sharding not in ("zero1", "zero2", "zero3", "fsdp"):
                    raise UserError(f"offload_optimizer {self.offload_optimizer} needs DeepSpeed ZeRO (zero1-3) or "
                                    "fsdp sharding")
                if self.offload_optimizer == "nvme" and self.sharding != "zero3":
                    raise UserError("offload_optimizer nvme (ZeRO-Infinity) needs zero3")
            with _field("offload_param"):
                if self.offload_param != "none" and self.sharding not in ("zero3", "fsdp"):
                    raise UserError(f"offload_param {self.offload_param} needs zero3 or fsdp sharding")
                if self.sharding == "fsdp" and (self.offload_param, self.offload_optimizer) not in \
                        (("none", "none"), ("cpu", "cpu")):
                    raise UserError("FSDP offloads parameters, gradients and the optimizer step together: "
                                    "offload_param and offload_optimizer both cpu, or both none")

    def _derive(self, put, sharding: str, optimizer: str, param: str, flag: str) -> None:
        """Sharding and offload as ``flag``'s config says (a different explicit value is refused)."""
        if self.sharding not in ("none", sharding):
            raise UserError(f"--sharding {self.sharding} contradicts {flag}, which means {sharding}: leave "
                            "--sharding out")
        for name, value in (("offload_optimizer", optimizer), ("offload_param", param)):
            if getattr(self, name) not in ("none", value):
                raise UserError(f"{name} {getattr(self, name)} contradicts {flag}, which says {value}")
            put(name, value)
        put("sharding", sharding)

    def _check_liger(self, put) -> None:
        """``use_liger_kernel`` (a bool) and ``liger_kernel_config`` (JSON object of liger's option switches)."""
        with _field("use_liger_kernel"):
            if not isinstance(self.use_liger_kernel, bool):
                raise UserError(f"use_liger_kernel must be true or false, got {self.use_liger_kernel!r}")
            if self.use_liger_kernel and self.device == "cpu":
                raise UserError("Liger's kernels are Triton GPU kernels: no CPU run uses them (estimate for cuda)")
        with _field("liger_kernel_config"):
            cfg = self.liger_kernel_config
            if cfg in (None, "", {}):
                put("liger_kernel_config", None)
                return
            if not self.use_liger_kernel:
                raise UserError("liger_kernel_config configures the Liger patch: it needs use_liger_kernel")
            if isinstance(cfg, str):
                try:
                    cfg = json.loads(cfg)
                except ValueError as exc:
                    raise UserError(f"liger_kernel_config {self.liger_kernel_config!r} is not JSON ({exc}); give an "
                                    "object like '{\"rope\": false}'") from None
            if not isinstance(cfg, Mapping) or not all(isinstance(v, bool) for v in cfg.values()):
                raise UserError(f"liger_kernel_config must be an object of true/false switches, got {cfg!r}")
            unknown = sorted(set(cfg) - set(LIGER_OPTIONS))
            if unknown:
                raise UserError(f"liger_kernel_config key {unknown[0]!r} is not an option of liger's patch: use "
                                f"{', '.join(LIGER_OPTIONS)}")
            if cfg.get("cross_entropy"):
                raise UserError("liger's unfused cross_entropy is not modelled (it swaps torch's cross_entropy "
                                "process-wide): use fused_linear_cross_entropy, liger's default")
            put("liger_kernel_config", json.dumps(dict(cfg), sort_keys=True))

    def _check_adapters(self, put) -> None:
        """The LoRA and quantization fields (values and the combinations that mean nothing)."""
        with _field("lora"):
            put("lora", LoraSpec.parse(self.lora))
            if self.lora is not None and self.freeze:
                raise UserError("freeze cannot be combined with lora: peft freezes every parameter but the "
                                "adapter's; name what trains with lora target / modules_to_save")
        with _field("quantize"):
            put("quantize", quantization(self.quantize))
        with _field("double_quant"):
            if not isinstance(self.double_quant, bool):
                raise UserError(f"double_quant must be true or false, got {self.double_quant!r}")
            if self.double_quant and self.quantize not in FOUR_BIT:
                raise UserError("double_quant quantizes 4-bit absmax constants: it needs quantize nf4 or fp4")
        with _field("quant_compute_dtype"):
            if self.quant_compute_dtype is not None:
                put("quant_compute_dtype", normalize_dtype(self.quant_compute_dtype))
                if self.quantize not in FOUR_BIT:
                    raise UserError("compute dtype is the 4-bit layers' matmul dtype: it needs quantize nf4 or fp4")
        with _field("quant_skip_modules"):
            skip = self.quant_skip_modules
            if skip in (None, "", [], ()):
                put("quant_skip_modules", None)
            else:
                items = (skip,) if isinstance(skip, str) else skip
                if not isinstance(items, Sequence) or not all(isinstance(i, str) and i for i in items):
                    raise UserError(f"quant_skip_modules must be a list of module names, got {skip!r}")
                if self.quantize is None:
                    raise UserError("quant_skip_modules names modules left unquantized: it needs quantize")
                put("quant_skip_modules", tuple(items))
        with _field("prepare_kbit"):
            value = self.prepare_kbit
            if isinstance(value, str):
                value = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False,
                         "0": False, "auto": None}.get(value.strip().lower(), value)
            if value is not None and not isinstance(value, bool):
                raise UserError(f"prepare_kbit must be on or off, got {self.prepare_kbit!r}")
            if value and self.quantize is None:
                raise UserError("prepare_kbit (peft's prepare_model_for_kbit_training) prepares a quantized model: "
                                "it needs quantize")
            # Quantized: on unless turned off; not quantized: None (the default: nothing to prepare).
            put("prepare_kbit", (value is not False) if self.quantize is not None else None)

    def check_trainable(self, inventory=None) -> None:
        """What the Trainer itself refuses for this setup, checked before anything is estimated or run: the
        model config (sizes transformers refuses, or accepts and then fails on in the forward: see
        :mod:`optimem.estimators.model_check`), a sequence longer than the model's learned positions, the optimizer's
        ``optim_args`` (keys it does not read, values it cannot take, what its constructor refuses for these
        parameters), GaLore/APOLLO without targets,
        layer-wise optimizers with gradient accumulation. The dataclass may hold such a setup (a test can
        watch the Trainer refuse it); the estimator and the harness refuse it here, in one line.
        ``inventory``: the model's, when the caller has it (else it is built, or read from the cache)."""
        with _field("model"):
            sizes = check_model_config(self.source)
            inv = inventory if inventory is not None else build_inventory(self.source, task=self.task)
        with _field("freeze"):
            check_keyword_freeze(self.freeze, (r.name for r in inv.rows), self.model)
        with _field("seq_len"):
            check_text_length(inv, self.task, self.seq_len, self.images_per_sample, sizes.get("max_position_embeddings"))
        spec = get_spec(self.optim)
        with _field("optim_args"):
            args = spec.resolve_args(parse_optim_args(self.optim_args))
            if spec.shared is not None:  # the optimizer constructor's own checks see every parameter (flash.py)
                spec.shared(inv.with_dtype(self.dtype).with_frozen(self.freeze), args)
        if spec.needs_target_modules and not self.optim_target_modules:
            with _field("optim_target_modules"):
                raise UserError(f"{spec.name} needs optim_target_modules (e.g. 'all-linear' or a regex such as "
                                "'.*(attn|mlp).*'), as TrainingArguments does")
        if spec.layerwise and self.grad_accum != 1:
            with _field("grad_accum"):
                raise UserError(f"{spec.name} does not support gradient accumulation (the Trainer raises "
                                "'Layerwise ... does not support gradient accumulation!')")
        if self.padding_free and self.source.load().get("is_encoder_decoder"):
            with _field("padding_free"):
                raise UserError("padding-free packing (DataCollatorWithFlattening) packs decoder-only inputs: this "
                                "model is an encoder-decoder")
        if self.use_liger_kernel:
            with _field("use_liger_kernel"):
                check_liger_model(self.source.load().get("model_type"))
        if self.quantize is not None and self.lora is None:
            with _field("quantize"):
                raise UserError("a quantized model trains only through an adapter: add --lora (the Trainer raises "
                                "'You cannot perform fine-tuning on purely quantized models')")
        if self.quantize is not None and self.sharding in ("zero3", "fsdp"):
            with _field("sharding"):
                raise UserError(f"{self.sharding} with quantize shards bitsandbytes' packed storage only with "
                                "bnb_4bit_quant_storage set to the model dtype (FSDP-QLoRA), which optimem does not "
                                "model: use none, ddp, zero1 or zero2")

    # ------------------------------------------------------------------------------------------ derived
    @functools.cached_property
    def source(self) -> ModelSource:
        """The model's source (config, content, in-memory inventory and PEFT config), resolved once per setup:
        every layer below takes this value rather than resolving ``model`` again."""
        return resolve(self.model)

    def with_source(self, source: ModelSource) -> TrainingSetup:
        """This setup with its model's source already resolved (``source.name`` is ``model``)."""
        self.__dict__["source"] = source
        return self

    @property
    def compute_dtype(self) -> str:
        """The dtype matmuls run in: the autocast dtype, else the storage dtype."""
        return self.mixed_precision or self.dtype

    @property
    def peft(self) -> bool:
        """Whether the model the Trainer gets is peft-wrapped or quantized (not the plain model)."""
        return self.lora is not None or self.quantize is not None

    @property
    def sixteen_bit(self) -> bool:
        return self.mixed_precision is not None or self.dtype in ("bf16", "fp16")

    @property
    def estimate_device(self) -> str:
        """The device the estimator predicts for: ``auto`` counts as CUDA."""
        return "cuda" if self.device == "auto" else self.device

    def with_optimizer(self, optim: str, optim_args: str | Mapping | None = None,
                       optim_target_modules: str | Sequence[str] | None = None, *,
                       only_args_read: bool = True) -> TrainingSetup:
        """This setup for another optimizer, as the commands that take several apply shared options:
        ``optim_args`` (with ``only_args_read``, just the keys that optimizer reads; else all of them, so a
        key it does not read is an error) and ``optim_target_modules`` (:data:`DEFAULT_TARGETS` where it needs
        some and none are given), dropped where it takes none."""
        spec = get_spec(optim)
        if only_args_read:
            pairs = parse_optim_args(optim_args) if isinstance(optim_args, (str, type(None))) else dict(optim_args)
            optim_args = ",".join(f"{k}={v}" for k, v in pairs.items() if k in spec.arg_types) or None
        targets = (optim_target_modules or DEFAULT_TARGETS) if spec.needs_target_modules else None
        return replace(self, optim=spec.name, optim_args=optim_args, optim_target_modules=targets)

    # ------------------------------------------------------------------------------------------ records
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, field by field (target tuples as lists)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else str(v) if f.name == "lora" and v is not None else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any):
        """A setup (or a subclass: the harness's run configuration) from :meth:`to_dict`'s form. Keys this
        class does not know are ignored; fields that older records lack take their defaults, and the
        attention implementation older records kept in ``extra`` is read from there."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in dict(data).items() if k in names}
        extra = data.get("extra") or {}
        if "attn_implementation" not in kw and isinstance(extra, Mapping) and extra.get("attn_implementation"):
            kw["attn_implementation"] = extra["attn_implementation"]
            if "extra" in names:
                kw["extra"] = {k: v for k, v in extra.items() if k != "attn_implementation"}
        kw.update(overrides)
        return cls(**kw)

    def setup(self) -> TrainingSetup:
        """Just the training setup (a subclass's run-only fields left out)."""
        if type(self) is TrainingSetup:
            return self
        return TrainingSetup(**{f.name: getattr(self, f.name) for f in fields(TrainingSetup)})

    def non_default(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what identifies a setup beyond the defaults)."""
        return {f.name: v for f, v in ((f, getattr(self, f.name)) for f in fields(self))
                if f.default is dataclasses.MISSING or v != f.default}


# ---------------------------------------------------------------------------------------------- checks
def check_liger_model(model_type: str | None) -> None:
    """UserError (one line) unless liger-kernel patches ``model_type`` and optimem rules every kernel it uses."""
    try:
        # lazy: pulls in torch, transformers, which importing this module does not
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise UserError("use_liger_kernel needs liger-kernel: pip install 'optimem[liger]' (or liger-kernel)") from None
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(f"liger-kernel does not patch model type {model_type!r} (the Trainer would train it "
                        f"unpatched): it patches {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)[:12])}, ...")
    if model_type not in LIGER_MODELLED:
        raise UserError(f"Liger's patch of {model_type!r} uses kernels optimem has no rules for yet: modelled are "
                        f"{', '.join(LIGER_MODELLED)}")


__all__ = ["ALL_LINEAR", "ATTN_IMPLEMENTATIONS", "CLI", "LIGER_MODELLED", "LIGER_OPTIONS", "check_liger_model", "DEFAULT_TARGETS", "DEVICES", "Flag", "MIXED_PRECISIONS",
           "SHARDINGS", "SetupError", "TASKS", "TrainingSetup"]
