"""``sfc``: command line entry point.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and a
``run(args)`` function; this file only wires them together, and imports them
lazily so that ``sfc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "catalog": "sfc.cli.catalog",
    "dictionaries": "sfc.cli.dictionaries",
    "discover": "sfc.cli.discover",
    "evaluate": "sfc.cli.evaluate",
    "view": "sfc.cli.view",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfc", description="Sparse feature circuits toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sfc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
