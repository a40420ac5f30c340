"""Argument types and options shared by the subcommands."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from stemlib.errors import InputError

__all__ = [
    "int_pair",
    "float_pair",
    "positive_int",
    "region",
    "symmetry",
    "SYMMETRIES",
    "flag_error",
    "add_recompute_argument",
]


def int_pair(text: str) -> tuple[int, int]:
    """Parse ``"RX,RY"`` into two integers."""
    try:
        a, b = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two integers like 64,64, got {text!r}"
        ) from None
    return a, b


def positive_int(text: str) -> int:
    """Parse a count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def region(text: str) -> str:
    """Parse a rectangle of scan indices ``"RX0:RX1,RY0:RY1"`` (kept as text; the scan's size
    is checked where it is read)."""
    from stemlib.reference import check_rectangle

    try:
        check_rectangle(text, flag="")
    except InputError:
        raise argparse.ArgumentTypeError(
            f"expected RX0:RX1,RY0:RY1 with RX0 < RX1 and RY0 < RY1 (e.g. 0:64,0:64), got {text!r}"
        ) from None
    return text.strip()


def float_pair(text: str) -> tuple[float, float]:
    """Parse ``"X,Y"`` into two floats."""
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers like 64.0,64.0, got {text!r}"
        ) from None
    return a, b


#: ``--symmetry``'s choices (after :func:`symmetry`).
SYMMETRIES = ("auto", 2, 4, 6)


def symmetry(text: str) -> str | int:
    """Parse ``--symmetry``: ``"auto"``, or n of the n-fold lattice symmetry (checked against
    :data:`SYMMETRIES` by argparse)."""
    return text if text == "auto" else int(text)


def flag_error(exc: ValidationError, flags: dict[str, str] | None = None) -> InputError:
    """A flag's bad value as one sentence naming the flag, where pydantic names the field:
    ``--field-name``, or ``flags[field]`` for a field whose flag is named otherwise."""
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else "input"
    flag = (flags or {}).get(field, "--" + field.replace("_", "-"))
    return InputError(f"{flag}: {first.get('msg', 'invalid value')}; correct it and run again.")


def add_recompute_argument(group: argparse._ActionsContainer) -> None:
    """``--recompute``: compute again what an earlier run finished with the same settings."""
    group.add_argument(
        "--recompute",
        action="store_true",
        help="compute the strain again even where an earlier run finished it with the same "
        "settings (after an upgrade of stemflow, say); CC-ST-AE trains anew",
    )
