"""LoRA and bitsandbytes quantization as setup values: what ``--lora`` and ``--quantize`` mean (no torch import).

:class:`LoraSpec` is a LoRA adapter in peft's ``LoraConfig`` terms, parsed from the command line's
``r=16,alpha=32,dropout=0.05,target=all-linear`` (or a mapping, or a ``peft.LoraConfig``). Its names and
semantics are peft's:

* ``r`` (rank), ``alpha`` (``lora_alpha``; peft's default 8), ``dropout`` (``lora_dropout``, default 0);
* ``target`` (``target_modules``): ``all-linear`` (every ``nn.Linear``/``Conv1D`` but the output head), a
  string (a regex that must *fully* match a module's qualified name), or a list ``[q_proj,v_proj]`` (names
  matched as suffixes of qualified names); left out, peft's default for the model type (``q_proj,v_proj``
  for Llama);
* ``modules_to_save``: a list of modules trained in full (peft keeps a trainable copy beside the frozen one);
* ``dora`` (``use_dora``): weight-decomposed LoRA (a trainable magnitude vector per adapted layer);
* ``bias``: ``none``, ``all`` or ``lora_only`` (which biases peft marks trainable).

``QUANTIZATIONS`` are bitsandbytes' ``BitsAndBytesConfig`` modes as transformers applies them:
``nf4``/``fp4`` (``load_in_4bit=True, bnb_4bit_quant_type=...``) and ``int8`` (``load_in_8bit=True``,
LLM.int8()). :func:`bnb_config_kwargs` is the ``BitsAndBytesConfig(**kwargs)`` of a setup.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .vision import LM_LINEAR
from .errors import UserError
from .params import torch_dtype

ALL_LINEAR = "all-linear"
LORA_BIASES = ("none", "all", "lora_only")
QUANTIZATIONS = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
_OFF = ("", "none", "no", "off", "false")
_ALIASES = {"r": "r", "rank": "r", "alpha": "alpha", "lora_alpha": "alpha", "dropout": "dropout",
            "lora_dropout": "dropout", "target": "target", "target_modules": "target", "targets": "target",
            "modules_to_save": "modules_to_save", "save": "modules_to_save", "dora": "dora", "use_dora": "dora",
            "bias": "bias"}
_EXAMPLE = "r=16,alpha=32,dropout=0.05,target=all-linear"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA adapter (see the module doc). ``alpha`` None is peft's default (8); ``target`` None is peft's
    default target modules for the model type; a tuple ``target`` is a list of names, a string a regex (or
    ``all-linear``)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    dora: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"lora r (the rank) must be a positive integer, got {self.r!r}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
                raise UserError(f"lora alpha must be a positive number, got {self.alpha!r}")
            put("alpha", int(self.alpha) if float(self.alpha).is_integer() else float(self.alpha))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"lora dropout must be a probability in [0, 1), got {self.dropout!r}")
        put("dropout", float(self.dropout))
        put("target", _target(self.target))
        put("modules_to_save", _names("modules_to_save", self.modules_to_save))
        if not isinstance(self.dora, bool):
            raise UserError(f"lora dora must be true or false, got {self.dora!r}")
        if self.bias not in LORA_BIASES:
            raise UserError(f"lora bias must be one of {', '.join(LORA_BIASES)}, got {self.bias!r}")

    # ------------------------------------------------------------------------------------------ forms
    @classmethod
    def parse(cls, value: Any) -> LoraSpec | None:
        """A spec from ``'r=16,alpha=32,...'``, a mapping of the same keys (peft's names work too:
        ``lora_alpha``, ``target_modules``, ``use_dora``...), a ``peft.LoraConfig``, or a spec; ``none``/None
        for no LoRA. Unknown keys and bad values raise UserError."""
        if value is None or isinstance(value, LoraSpec):
            return value
        if isinstance(value, str):
            if value.strip().lower() in _OFF:
                return None
            return cls.from_mapping(_split(value), text=value)
        if isinstance(value, Mapping):
            return cls.from_mapping(value)
        if type(value).__name__ == "LoraConfig" and hasattr(value, "target_modules"):
            return cls.from_peft(value)
        raise UserError(f"lora must be a 'key=value,...' string such as '{_EXAMPLE}', a mapping or a "
                        f"peft LoraConfig, got {value!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, text: str | None = None) -> LoraSpec:
        kw: dict[str, Any] = {}
        for key, raw in data.items():
            name = _ALIASES.get(str(key).strip().lower().replace("-", "_"))
            if name is None:
                raise UserError(f"lora: unknown key {key!r} in {text or dict(data)!r}; known: r, alpha, dropout, "
                                "target, modules_to_save, dora, bias (peft's LoraConfig names work too)")
            if name in kw:
                raise UserError(f"lora: {name} given twice in {text or dict(data)!r}")
            kw[name] = _convert(name, raw)
        return cls(**kw)

    @classmethod
    def from_peft(cls, config) -> LoraSpec:
        """The spec of a ``peft.LoraConfig`` (the fields memory depends on)."""
        targets = config.target_modules
        if isinstance(targets, (set, frozenset)):
            targets = tuple(sorted(targets))
        return cls(r=int(config.r), alpha=config.lora_alpha, dropout=float(config.lora_dropout),
                   target=targets, modules_to_save=tuple(config.modules_to_save) if config.modules_to_save else None,
                   dora=bool(config.use_dora), bias=str(config.bias))

    def __str__(self) -> str:
        """The canonical command-line form (``r`` always, the rest where not at peft's default)."""
        parts = [f"r={self.r}"]
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        if self.target is not None:
            parts.append(f"target={_list_text(self.target)}")
        if self.modules_to_save:
            parts.append(f"modules_to_save={_list_text(self.modules_to_save)}")
        if self.dora:
            parts.append("dora=true")
        if self.bias != "none":
            parts.append(f"bias={self.bias}")
        return ",".join(parts)

    def lora_config_kwargs(self, task_type: str | None = None) -> dict[str, Any]:
        """``peft.LoraConfig(**kwargs)`` for this spec (``task_type``: ``CAUSAL_LM``, ``SEQ_2_SEQ_LM``...)."""
        target = self.target
        kw: dict[str, Any] = dict(r=self.r, lora_dropout=self.dropout, use_dora=self.dora, bias=self.bias,
                                  target_modules=list(target) if isinstance(target, tuple) else target)
        if self.alpha is not None:
            kw["lora_alpha"] = self.alpha
        if self.modules_to_save:
            kw["modules_to_save"] = list(self.modules_to_save)
        if task_type:
            kw["task_type"] = task_type
        return kw


def _split(text: str) -> dict[str, str]:
    """``'r=16,target=[q_proj,v_proj]'`` -> ``{'r': '16', 'target': '[q_proj,v_proj]'}``: commas inside
    brackets belong to a list value."""
    out: dict[str, str] = {}
    depth, item = 0, ""
    items: list[str] = []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
        else:
            item += ch
    items.append(item)
    if depth != 0:
        raise UserError(f"lora {text!r}: unbalanced brackets; a list is written [a,b]")
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            hint = (f"; to target several modules write target=[{out['target']},{item}]"
                    if sep == "" and "target" in out else "")
            raise UserError(f"lora {text!r}: {item!r} is not key=value (e.g. '{_EXAMPLE}'){hint}")
        key = key.strip()
        if key in out:
            raise UserError(f"lora {text!r}: {key} given twice")
        out[key] = value.strip()
    if not out:
        raise UserError(f"lora {text!r} is empty: give e.g. '{_EXAMPLE}' (or none)")
    return out


def _convert(name: str, raw: Any) -> Any:
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(raw, list) else raw
    text = raw.strip()
    try:
        if name == "r":
            return int(text)
        if name in ("alpha", "dropout"):
            return float(text)
    except ValueError:
        what = "a positive integer" if name == "r" else "a number"
        raise UserError(f"lora {name}={raw!r}: expected {what}") from None
    if name == "dora":
        v = text.lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise UserError(f"lora dora={raw!r}: expected true or false")
    if name == "bias":
        return text.lower()
    if text.startswith("[") and text.endswith("]"):
        return tuple(s.strip() for s in text[1:-1].split(",") if s.strip())
    if name == "modules_to_save":
        return (text,)
    return text


def _target(value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().replace("_", "-").lower() == ALL_LINEAR:
            return ALL_LINEAR
        if value.strip().lower() == "lm":  # a vision-language model's language model only (estimators/vision.py)
            return LM_LINEAR
        try:
            re.compile(value)
        except re.error as exc:
            raise UserError(f"lora target {value!r} is not a valid regex ({exc}); a list is written [a,b]") from None
        return value
    names = _names("target", value)
    if not names:
        raise UserError("lora target is an empty list: give names, a regex or all-linear")
    return names


def _names(what: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"lora {what} must be a list of module names, got {value!r}")
    return tuple(v.strip() for v in value) or None


def _list_text(value: str | tuple[str, ...]) -> str:
    return value if isinstance(value, str) else "[" + ",".join(value) + "]"


# ---------------------------------------------------------------------------------------------- quantization
def quantization(value: Any) -> str | None:
    """``--quantize``: nf4, fp4, int8 (or none)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    key = str(value).strip().lower().replace("-", "").replace("_", "")
    key = {"4bit": "nf4", "8bit": "int8", "llmint8": "int8"}.get(key, key)
    if key not in QUANTIZATIONS:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZATIONS)} (or none), got {value!r}")
    return key


def bnb_config_kwargs(quantize: str, *, double_quant: bool = False, compute_dtype: str | None = None,
                      skip_modules: Sequence[str] | None = None) -> dict[str, Any]:
    """``transformers.BitsAndBytesConfig(**kwargs)`` for a setup's quantization (``compute_dtype``: the 4-bit
    layers' matmul dtype, fp32/bf16/fp16; None: bitsandbytes' default, fp32)."""
    kw: dict[str, Any] = {}
    if quantize == "int8":
        kw["load_in_8bit"] = True
    else:
        kw.update(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=bool(double_quant))
        if compute_dtype is not None:
            kw["bnb_4bit_compute_dtype"] = torch_dtype(compute_dtype)
    if skip_modules:
        kw["llm_int8_skip_modules"] = list(skip_modules)
    return kw


__all__ = ["ALL_LINEAR", "FOUR_BIT", "LORA_BIASES", "LoraSpec", "QUANTIZATIONS", "bnb_config_kwargs", "quantization"]
