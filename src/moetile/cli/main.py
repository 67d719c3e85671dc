"""Entry point of the `moetile` console script: parses, runs one command, turns a user's mistake
into one line on stderr (exit 2; ``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "moetile runs the routed-MoE layers of GGUF-quantized models (Q4_K, Q2_K, IQ2_XXS, Q8_0) with Triton "
    "kernels. `moetile run` is the main job (info, audit, bench, profile). Without a CUDA GPU the commands run "
    "the real kernels through Triton's interpreter on small shapes: what bench times there is the interpreter, "
    "not performance; profile and bench-ops need a GPU and say so."
)
# what a user's mistake raises (a missing file, a layer the file lacks, a bad value or env var, CUDA absent)
USER_ERRORS = (OSError, ValueError, LookupError, RuntimeError)


class _Help(argparse.HelpFormatter):
    """Adds each option's default to its help unless the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default not in (None, False)
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from . import audit, bench, bench_ep, bench_ops, info, profile, run

    parser = argparse.ArgumentParser(prog="moetile", description=DESCRIPTION, formatter_class=_Help)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for mod in (info, audit, bench, bench_ops, bench_ep, profile, run):
        mod.add_parser(sub)
    for action in sub._choices_actions:  # each command's --help opens with its one-line summary
        p = sub.choices[action.dest]
        p.formatter_class = _Help
        p.description = p.description or action.help
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._env import prepare

    prepare()  # before any kernel module is imported: sets the interpreter when there is no GPU
    args = build_parser().parse_args(argv)
    try:
        from ..schedule import deterministic_from_env, tile_max_from_env

        tile_max_from_env()  # a bad MOETILE_TILE_MAX or MOETILE_DETERMINISTIC fails now, not minutes into a run
        deterministic_from_env()
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"moetile {args.cmd}: error: {exc} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
