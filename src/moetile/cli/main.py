"""Entry point of the `moetile` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import audit, info

    parser = argparse.ArgumentParser(prog="moetile", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    info.add_parser(sub)
    audit.add_parser(sub)
    for name in ("bench", "profile", "run"):
        try:
            mod = __import__(f"moetile.cli.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
