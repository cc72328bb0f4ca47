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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description="optimem: memory estimates and measurements for "
                                               "transformers.Trainer optimizers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
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

    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
