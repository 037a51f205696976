"""The ``gradience`` console script: one subcommand per tool, each owning its own argument parser.

``gradience demo ARGS`` hands ARGS unchanged to :func:`gradience.demo.main`, so ``gradience demo --help``
shows the demo's own options; ``gradience report OUT_DIR`` calls :func:`gradience.report.build_report` and
prints its summary table. This module owns only the dispatch and the printing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gradience import __version__


def _demo(argv: list[str]) -> int:
    from gradience import demo  # imports torch/transformers only when the subcommand runs

    return demo.main(argv, prog="gradience demo")


def _report(argv: list[str]) -> int:
    # Printing belongs here; gradience.report only reads the run, writes files and returns data.
    p = argparse.ArgumentParser(prog="gradience report",
                                description="Write report.html (self-contained, opens offline) and report.png for "
                                "the run in OUT_DIR, and print a summary. Reads only the files the run wrote, so it "
                                "works on a copy of OUT_DIR and on a run in progress.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the run's out_dir (telemetry*.jsonl, summary*.json)")
    p.add_argument("-o", "--output-dir", metavar="DIR", default=None,
                   help="write report.html and report.png here instead of OUT_DIR (e.g. when OUT_DIR is read-only)")
    args = p.parse_args(argv)
    from gradience.report import MissingDependency, ReportError, build_report
    from gradience.report.terminal import summary_table

    try:
        result = build_report(args.out_dir, dest=args.output_dir)
    except ReportError as e:
        print(f"gradience report: error: {e}", file=sys.stderr)
        return 2
    except (MissingDependency, OSError) as e:  # OSError: the report files could not be written
        print(f"gradience report: error: {e}", file=sys.stderr)
        return 1
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file or pipe: never fold a path across lines
    console.print(summary_table(result))
    for warning in result.run.warnings:
        console.print(f"note: {warning}", markup=False, highlight=False)
    return 0


# name -> (one-line help, handler taking the remaining arguments and returning an exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "demo": ("train a tiny GPT-2, inject a fault, report what the guard did", _demo),
    "report": ("write report.html and report.png for a run's out_dir, and print a summary", _report),
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
