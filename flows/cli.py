"""The ``stemflow`` command line.

Each subcommand lives in its own module under :mod:`flows.commands` with a ``register``
function. A user's mistake (:class:`stemlib.errors.StemflowError`) is printed as one sentence on
stderr with exit status 2 and no traceback; Ctrl-C exits with 130 and publishes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from stemlib.errors import StemflowError

__all__ = ["main", "build_parser"]

#: Subcommand modules, in the order ``stemflow --help`` lists them.
COMMANDS = ("run", "demo", "ingest", "simulate", "noise", "strain", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemflow",
        description="4D-STEM scans to strain, shear and rotation maps (CC-ST-AE and py4DSTEM).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"flows.commands.{name}").register(sub)
    return parser


def _validation_sentence(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "input"
    return f"{where}: {first.get('msg', 'invalid value')}; correct it and run again."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except StemflowError as exc:
        print(f"stemflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"stemflow {args.command}: error: {_validation_sentence(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemflow {args.command}: interrupted; nothing was published.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
