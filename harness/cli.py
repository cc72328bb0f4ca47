"""``bench``: the optimem command line.

Each subcommand lives in ``harness/commands/<name>.py`` with ``register(subparsers)`` and ``main(args) -> int``.
Bad input (a ``UserError``, an argparse error) prints one line on stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

COMMANDS = ("estimate", "optims", "run", "sweep", "plan", "plot", "compare")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"bench: error: {message} (see '{self.prog} --help')\n")


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
                                               "transformers.Trainer optimizers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    named = _named_command(argv) if argv is not None else None
    for name in (named,) if named else COMMANDS:
        importlib.import_module(f"harness.commands.{name}").register(sub)
    return parser


def _flagged(exc: Exception) -> str:
    """A bad setup field's message, led by the flag that sets it (``--batch-size: ...``)."""
    from estimators.setup import CLI, SetupError

    if isinstance(exc, SetupError) and exc.field in CLI:
        return f"{'/'.join(CLI[exc.field].names)}: {exc}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    _quiet()
    from estimators.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "no_cache", False):
        from estimators import cache

        cache.disable()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"bench {args.command}: error: {_flagged(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


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
