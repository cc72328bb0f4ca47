"""``bench serve``: the estimator and the planner as a local web page (Gradio, the ``[ui]`` extra).

The page (``harness/ui/``) answers every change of its form with ``bench estimate``'s and ``bench plan``'s
figures and shows the commands that give them; a second tab reads uploaded results files. It binds 127.0.0.1
unless ``--host`` says otherwise, reads no server path from the page (uploads only, size-capped) and never runs
a model's remote code.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import socket

from optimem.estimators import UserError
from optimem.harness.ui.app import launch

EXPOSED = ("0.0.0.0", "::", "")


def register(sub) -> None:
    p = sub.add_parser("serve", help="a local web page: estimates, plans and results with charts (needs the [ui] "
                                     "extra)",
                       description="Serve a web page (Gradio) with the estimator and the planner: pick a model, "
                                   "optimizers, GPUs; see the per-optimizer table, a stacked memory chart against "
                                   "each GPU's memory, the fit, the largest micro-batch and sequence per GPU, the "
                                   "recommendation, and the exact bench command and TrainingArguments. A second "
                                   "tab plots uploaded results files and compares two of them.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves every network "
                        "interface)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port (default 7860)")
    p.set_defaults(func=main)


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}")
    return n


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); give a free "
                            "--port, or an address of this machine as --host") from None


def main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise UserError("bench serve needs Gradio: pip install 'optimem[ui]' (or pip install 'gradio>=5')")
    _check_port(args.host, args.port)
    if args.host in EXPOSED:
        print(f"bench serve: warning: --host {args.host or '0.0.0.0'} serves the page to every network this "
              "machine is on, without authentication", file=sys.stderr)
    shown = "127.0.0.1" if args.host in EXPOSED else args.host
    print(f"bench serve: http://{shown}:{args.port} (Ctrl-C stops it)", flush=True)

    launch(args.host, args.port, block=True)
    return 0


__all__ = ["main", "register"]
