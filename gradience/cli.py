"""The ``gradience`` console script: one subcommand per tool, each owning its own argument parser.

``gradience demo ARGS`` hands ARGS unchanged to :func:`gradience.demo.main`, so ``gradience demo --help``
shows the demo's own options. This module owns only the dispatch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gradience import __version__


def _demo(argv: list[str]) -> int:
    from gradience import demo  # imports torch/transformers only when the subcommand runs

    return demo.main(argv, prog="gradience demo")


# name -> (one-line help, handler taking the remaining arguments and returning an exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "demo": ("train a tiny GPT-2, inject a fault, report what the guard did", _demo),
}


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; only used for ``--help``, ``--version`` and unknown commands."""
    p = argparse.ArgumentParser(prog="gradience", description="Training-integrity insurance for PyTorch.")
    p.add_argument("--version", action="version", version=f"gradience {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradience`` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Forward before argparse sees the rest: a subcommand's own flags (and its --help) must reach it verbatim.
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][1](argv[1:])
    parser = build_parser()
    parser.parse_args(argv)  # exits for --help, --version and unknown commands
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
