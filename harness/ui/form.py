"""The page's form as ``bench`` command lines: built from the one flag table, parsed by ``bench``'s own parser.

A :class:`Form` holds what the page's inputs hold (setup fields by their ``TrainingSetup`` names, the GPUs, an
uploaded config.json). :func:`estimate_argv` and :func:`plan_argv` spell it as the arguments of ``bench estimate``
and ``bench plan`` with the flags of ``optimem.estimators.setup.CLI``; :func:`parse` reads them back with the
very parser ``bench`` uses, so the command the page shows is the command that was answered. A bad value is a
:class:`FormError` naming the field (its label and flag), never a traceback. The page never reads a server
path: ``model`` must be a catalog name or a Hub id, and a config of one's own comes as an upload.
"""
from __future__ import annotations

import argparse
import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimem.estimators.errors import UserError
from optimem.estimators.setup import CLI, SetupError
from optimem.harness.commands.setup_args import field_defaults
from optimem.harness.cli import build_parser

FORM_FIELDS = ("model", "task", "dtype", "mixed_precision", "batch_size", "seq_len", "grad_accum",
               "gradient_checkpointing", "lora", "quantize", "optim", "num_processes", "sharding")
"""The setup fields the page asks for, in the page's order (every other field keeps its default)."""
LABELS = {"model": "Model", "task": "Task", "dtype": "Weights dtype", "mixed_precision": "Mixed precision",
          "batch_size": "Micro-batch", "seq_len": "Sequence length", "grad_accum": "Gradient accumulation",
          "gradient_checkpointing": "Gradient checkpointing", "lora": "LoRA", "quantize": "Quantize base",
          "optim": "Optimizers", "num_processes": "GPUs", "sharding": "Sharding",
          "gpus": "GPU types (--gpus)", "config": "config.json upload"}
"""What the page calls each input (the flag is shown beside it: :func:`label`)."""
NUMBERS = ("batch_size", "seq_len", "grad_accum", "num_processes")
MAX_CONFIG_BYTES = 1 << 20
"""An uploaded config.json may hold at most 1 MiB (real configs hold a few KiB)."""


def flag(name: str) -> str:
    """The command-line flag of a setup field (its last, longest-lived name: ``--num-gpus``)."""
    return CLI[name].names[-1]


def label(name: str) -> str:
    """``Micro-batch (--batch-size)``: how a field is named on the page and in its messages."""
    if name in CLI:
        return f"{LABELS.get(name, name)} ({flag(name)})"
    return LABELS.get(name, name)


class FormError(UserError):
    """A bad form value: ``field`` names the input (a setup field, ``gpus`` or ``config``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{label(self.field)}: {self.args[0]}"


@dataclass
class Form:
    """What the page's inputs hold. ``values``: setup fields by name (``optim`` a list of names; numbers as the
    page gives them, None when empty); ``gpus``: catalog GPU ids; ``config``: the path of an uploaded config.json
    (Gradio's upload copy) and ``config_name`` its original file name."""

    values: dict[str, Any]
    gpus: list[str] = field(default_factory=list)
    config: str | None = None
    config_name: str | None = None

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


def _whole(name: str, value: Any) -> int:
    if value is None or value == "":
        raise FormError(name, "give a whole number (at least 1)")
    if isinstance(value, bool):
        raise FormError(name, f"give a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FormError(name, f"give a whole number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise FormError(name, f"give a whole number, got {value!r}")
    return int(number)


def model_value(form: Form) -> tuple[str, str]:
    """``(what --model gets, what the shown command says)``: the uploaded config.json, else the typed name,
    which must be a catalog name or a Hub id (a path on the server is refused: the page reads no server file)."""
    if form.config:
        path = Path(form.config)
        try:
            size = path.stat().st_size
        except OSError:
            raise FormError("config", "the upload is gone; upload the config.json again") from None
        if size > MAX_CONFIG_BYTES:
            raise FormError("config", f"{size} bytes is more than a config.json holds (at most "
                                      f"{MAX_CONFIG_BYTES} bytes); upload the model's config.json")
        return str(path), form.config_name or "config.json"
    text = str(form.get("model") or "").strip()
    if not text:
        raise FormError("model", "give a catalog name (e.g. tiny-llama) or a Hugging Face Hub id (org/name), "
                                 "or upload a config.json")
    if text.startswith(("/", ".", "~", "\\")) or text.lower().endswith(".json") or "\\" in text or \
            text.count("/") > 1 or Path(text).expanduser().exists():
        raise FormError("model", f"{text!r} looks like a path; the page never reads files on the server: give "
                                 "a catalog name or a Hub id (org/name), or upload the config.json")
    return text, text


def _optims(form: Form) -> list[str]:
    chosen = [str(o).strip() for o in (form.get("optim") or []) if str(o).strip()]
    if not chosen:
        raise FormError("optim", "pick at least one optimizer")
    return chosen


def _setup_args(form: Form, names: tuple[str, ...], shown: bool) -> list[str]:
    """``[--flag, value, ...]`` for the fields ``names`` that differ from the setup defaults (switches as
    bare flags). ``shown``: the model as the shown command spells it."""
    defaults = field_defaults()
    out: list[str] = []
    for name in names:
        if name == "model":
            out += ["--model", model_value(form)[1 if shown else 0]]
            continue
        value = form.get(name)
        if name in NUMBERS:
            value = _whole(name, value)
        if CLI[name].switch:
            if value:
                out.append(flag(name))
            continue
        if value in (None, "", "none") and name in ("lora", "quantize", "mixed_precision"):
            continue
        if value is None or value == defaults.get(name):
            continue
        out += [flag(name), str(value)]
    return out


_ESTIMATE_FIELDS = ("model", "task", "dtype", "mixed_precision", "batch_size", "seq_len", "grad_accum",
                    "gradient_checkpointing", "lora", "quantize")
_PLAN_FIELDS = ("model", "task", "dtype", "mixed_precision", "seq_len", "grad_accum", "lora", "quantize",
                "num_processes", "sharding")


def estimate_argv(form: Form, *, shown: bool = False) -> list[str]:
    """The arguments of ``bench estimate`` for the form (one device: the planner's rows carry the sharding)."""
    return _setup_args(form, _ESTIMATE_FIELDS, shown) + ["--optim", *_optims(form)]


def plan_argv(form: Form, *, max_seq: bool = False, shown: bool = False) -> list[str]:
    """The arguments of ``bench plan`` for the form's GPUs: the largest micro-batch at the sequence length, or
    (``max_seq``) the longest sequence at the micro-batch. Checkpointing is the form's (on/off, not searched);
    MFU is the assumed one (``--no-calibrate``: the page reads no results file of the server's)."""
    gpus = [g for g in form.gpus if g]
    if not gpus:
        raise FormError("gpus", "pick at least one GPU type")
    names = _PLAN_FIELDS
    if _whole("num_processes", form.get("num_processes")) > 1 and form.get("sharding") in (None, "none"):
        raise FormError("sharding", "several GPUs need a sharding scheme: ddp, zero1, zero2, zero3 or fsdp")
    argv = _setup_args(form, names, shown)
    if max_seq:
        i = argv.index(flag("seq_len")) if flag("seq_len") in argv else -1
        if i >= 0:
            del argv[i:i + 2]
        argv += ["--max-seq", flag("batch_size"), str(_whole("batch_size", form.get("batch_size")))]
    ckpt = "on" if form.get("gradient_checkpointing") else "off"
    return argv + ["--optim", *_optims(form), "--gpus", ",".join(gpus), "--gradient-checkpointing", ckpt,
                   "--no-calibrate"]


def command_line(command: str, argv: list[str]) -> str:
    """``bench COMMAND ARGS`` as a shell would take it."""
    return shlex.join(["bench", command, *argv])


@functools.cache
def _parser(command: str) -> argparse.ArgumentParser:
    """``bench COMMAND``'s own argparse parser, its errors raised (not printed and exited)."""
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]

    def error(message: str):
        raise argparse.ArgumentError(None, message)

    sub.error = error
    return sub


_FLAG_IN_MESSAGE = re.compile(r"argument (--[\w-]+)")


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` read by ``bench COMMAND``'s parser (a :class:`FormError` naming the field for a bad value)."""
    try:
        return _parser(command).parse_args(argv)
    except argparse.ArgumentError as exc:
        text = str(exc)
        m = _FLAG_IN_MESSAGE.search(text)
        names = {n: f for f, fl in CLI.items() for n in fl.names}
        if m and m.group(1) in names:
            raise FormError(names[m.group(1)], text.split(": ", 1)[-1]) from None
        raise UserError(f"bench {command}: {text}") from None


def field_error(exc: UserError) -> FormError | UserError:
    """A setup check's error as the form's (a ``SetupError`` names its field)."""
    if isinstance(exc, SetupError) and exc.field in LABELS:
        return FormError(exc.field, str(exc))
    return exc


__all__ = ["FORM_FIELDS", "Form", "FormError", "LABELS", "MAX_CONFIG_BYTES", "command_line", "estimate_argv",
           "field_error", "flag", "label", "model_value", "parse", "plan_argv"]
