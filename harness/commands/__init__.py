"""Subcommands of ``bench``: one module each, with ``register(subparsers)`` and ``main(args) -> int``."""
