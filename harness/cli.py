"""``bench``: the optimem command line.

Each subcommand lives in ``harness/commands/<name>.py`` with ``register(subparsers)`` and ``main(args) -> int``.

Exit status (every command): 0 done; 2 bad input (a ``UserError`` or an argparse error: one line on stderr
saying what was wrong and what would be right, before any work starts); 130 interrupted; 1 anything else
(an internal error: one line naming the command and the cause; ``--debug`` or ``OPTIMEM_DEBUG=1`` prints
the traceback too). ``bench run`` adds 3 for a run that ran out of memory, ``bench compare`` uses 1 for a
regression (see their ``--help``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

COMMANDS = ("estimate", "optims", "run", "sweep", "plan", "plot", "compare", "serve")
DEBUG_ENV = "OPTIMEM_DEBUG"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts with '-' and a digit ('-1x2', '-5GB', '-3') is a value, never an option (no bench
        # option looks like that), so '--shape -1x2' reaches the check that says what is wrong with it.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # one line, exit 2
        if "expected one argument" in message or "expected at least one argument" in message:
            message += " (a value that starts with '-' goes as --flag=VALUE)"
        self.exit(EXIT_USAGE, f"bench: error: {message} (see '{self.prog} --help')\n")


def _quiet() -> None:
    """Keep library chatter (torchao's missing CUDA kernels, deprecation notes) off the user's screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("torchao", "torch._dynamo", "torch.utils._pytree", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _named_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word, when that is a known command), else None."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``bench`` parser. When ``argv`` names a command only that command's module is imported and
    registered (a cached ``bench estimate`` pays for nothing else); otherwise (``bench --help``, an unknown
    command) all of them are."""
    parser = _Parser(prog="bench", description="optimem: memory estimates and measurements for "
                                               "transformers.Trainer optimizers",
                     epilog="Exit status: 0 done, 2 bad input, 1 internal error, 130 interrupted (run and "
                            "compare add their own: see their --help).")
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an internal error (or set "
                                                             f"{DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    named = _named_command(argv) if argv is not None else None
    for name in (named,) if named else COMMANDS:
        importlib.import_module(f"optimem.harness.commands.{name}").register(sub)
    for p in sub.choices.values():  # '--debug' after the command works too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _flagged(exc: Exception) -> str:
    """A bad setup field's message, led by the flag that sets it (``--batch-size: ...``)."""
    from optimem.estimators.setup import CLI, SetupError

    if isinstance(exc, SetupError):
        names = CLI[exc.field].names if exc.field in CLI else (f"--{exc.field.replace('_', '-')}",)
        return f"{'/'.join(names)}: {exc}"
    return str(exc)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    _quiet()
    from optimem.estimators.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip().lower() not in (
        "", "0", "no", "false", "off")
    if getattr(args, "no_cache", False):
        from optimem.estimators import cache

        cache.disable()
    try:
        from optimem.harness.commands.setup_args import apply_revision

        apply_revision(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"bench {args.command}: error: {_flagged(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"bench {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            import traceback

            traceback.print_exc()
        hint = "" if debug else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"bench {args.command}: internal error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    """The ``bench`` executable: :func:`main`, then exit without the interpreter's teardown.

    Tearing down torch and transformers' module graph takes 1-2 s on an idle machine (far more on a busy
    one), after everything has been printed and every record written. Output streams are flushed first;
    nothing else is left to do (records are appended with ``fsync``, worker processes are waited for)."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (bench ... | head)
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
