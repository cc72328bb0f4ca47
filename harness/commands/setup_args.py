"""The training setup on the command line: one argparse group, built from :data:`optimem.estimators.setup.CLI`.

Every command that takes a :class:`~optimem.estimators.setup.TrainingSetup` (``estimate``, ``run``, ``sweep``,
``plan``) calls :func:`add_setup_arguments` with its own defaults, and :func:`setup_kwargs` turns the parsed
namespace back into the setup's keyword arguments. A command that takes several values of a field (``sweep``'s
grid axes, the optimizers of ``estimate`` and ``plan``) names it in ``multi``: the flag then takes one or more
values (repeatable; comma-separated works too), and a switch takes ``on``, ``off`` or ``both``.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from optimem.estimators.hub import pin_revision
from optimem.estimators.setup import CLI, SetupError, TrainingSetup

SWITCH_VALUES = ("off", "on", "both")


def field_defaults(cls: type = TrainingSetup) -> dict[str, Any]:
    """The defaults of a setup class's fields (``TrainingSetup`` or a subclass that changes some)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def add_setup_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                        defaults: Mapping[str, Any] | None = None, multi: Iterable[str] = (),
                        exclude: Iterable[str] = (), required: Iterable[str] = (),
                        help_suffix: Mapping[str, str] | None = None) -> None:
    """Add one argument per setup field (minus ``exclude``), each defaulting to ``defaults[field]`` (shown in
    the help; fields it lacks default to None, so the setup class's own default applies). ``multi``: fields
    that take one or more values. ``--mixed-precision`` gets the ``--bf16`` / ``--fp16`` shorthands where it
    takes one value. ``required``: fields the command cannot do without. ``help_suffix``: extra help text
    per field."""
    defaults = dict(defaults or {})
    multi, exclude, required, suffix = set(multi), set(exclude), set(required), dict(help_suffix or {})
    for field, flag in CLI.items():
        if field in exclude:
            continue
        default = defaults.get(field)
        text = flag.help + (f" {suffix[field]}" if field in suffix else "")
        if field == "model":
            parser.add_argument("--revision", dest="revision", default=None, metavar="REV",
                                help="for a Hugging Face Hub model: the branch, tag or commit hash of its config.json "
                                     "(the same as --model org/name@REV; default: the repo's default branch)")
        if flag.listed:
            parser.add_argument(*flag.names, dest=field, nargs="+", default=default, metavar=flag.metavar, help=text)
            continue
        if field in multi:
            kw: dict[str, Any] = dict(nargs="+", action="extend", dest=field, default=None,
                                      metavar=flag.metavar or field.upper(), required=field in required)
            if flag.switch:
                kw.update(choices=SWITCH_VALUES, metavar=None)
            elif flag.choices:
                kw.update(choices=flag.choices, metavar=None)
            else:
                kw["type"] = flag.type
            shown = "off" if flag.switch and not default else default
            parser.add_argument(*flag.names, help=text + (f" (default {shown})" if shown is not None else ""), **kw)
            continue
        if flag.switch:
            parser.add_argument(*flag.names, dest=field, action="store_true", default=bool(default), help=text)
            continue
        kw = dict(dest=field, default=default, type=flag.type, required=field in required)
        if flag.choices:
            kw["choices"] = flag.choices
        else:
            kw["metavar"] = flag.metavar
        shown = "none" if field == "mixed_precision" and default is None else default
        text += f" (default {shown})" if shown is not None else ""
        if field != "mixed_precision":
            parser.add_argument(*flag.names, help=text, **kw)
            continue
        one_of = parser.add_mutually_exclusive_group()
        one_of.add_argument(*flag.names, help=text, **kw)
        for name in ("bf16", "fp16"):
            one_of.add_argument(f"--{name}", action="store_const", const=name, dest=field,
                                help=f"short for --mixed-precision {name} (TrainingArguments({name}=True))")


def flagged(exc: Exception) -> str:
    """A bad setup field's message, led by the flag that sets it (``--batch-size: ...``)."""
    if isinstance(exc, SetupError):
        names = CLI[exc.field].names if exc.field in CLI else (f"--{exc.field.replace('_', '-')}",)
        return f"{'/'.join(names)}: {exc}"
    return str(exc)


def apply_revision(args: argparse.Namespace) -> None:
    """Fold ``--revision REV`` into the model name(s): ``org/name`` becomes ``org/name@REV``, the one form the
    setup, the estimator and the records know (UserError for a model that is not a Hub id)."""
    revision = getattr(args, "revision", None)
    if revision is None:
        return
    model = getattr(args, "model", None)
    if isinstance(model, list):
        args.model = [pin_revision(m, revision) for m in model]
    else:
        args.model = pin_revision(model if model is not None else "", revision)


def setup_kwargs(args: argparse.Namespace, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The setup fields the namespace holds, as keyword arguments (fields left at None are left out, so the
    setup class's default applies; ``optim_target_modules`` lists of one element become the element)."""
    out = {}
    exclude = set(exclude)
    for field in CLI:
        if field in exclude or getattr(args, field, None) is None:
            continue
        value = getattr(args, field)
        if field == "optim_target_modules" and isinstance(value, list):
            value = value[0] if len(value) == 1 else tuple(value)
        out[field] = value
    return out


__all__ = ["SWITCH_VALUES", "add_setup_arguments", "apply_revision", "field_defaults", "setup_kwargs"]
