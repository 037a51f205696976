"""``python -m gradience.bench overhead|spectral [...]``: dispatch to a benchmark."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by the first argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m gradience.bench {overhead,spectral} [--help]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "overhead":
        from gradience.bench.overhead import main as run

        return run(rest)
    if name == "spectral":
        from gradience.bench.spectral import main as run_spectral

        return run_spectral(rest)
    print(f"unknown benchmark {name!r}; available: overhead, spectral", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
