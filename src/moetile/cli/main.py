"""Entry point of the `moetile` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import audit, bench, bench_ops, info, profile, run

    parser = argparse.ArgumentParser(prog="moetile", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    info.add_parser(sub)
    audit.add_parser(sub)
    for mod in (bench, bench_ops, profile, run):
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
