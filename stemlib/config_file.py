"""Read a method's configuration from a YAML or JSON file, with one-sentence errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import InputError

__all__ = ["read_mapping", "validated", "validation_sentence"]

Model = TypeVar("Model", bound=BaseModel)


def validation_sentence(exc: ValidationError) -> str:
    """The first problem of a pydantic validation error as ``field: message``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "input"
    return f"{where}: {first.get('msg', 'invalid value')}"


def read_mapping(path: str | os.PathLike[str], model: type[BaseModel]) -> dict[str, Any]:
    """The ``field: value`` mapping of ``model``'s fields in a YAML file, or JSON if its name
    ends in ``.json``.

    Raises
    ------
    InputError
        If the file does not exist (or is a folder), is not text (a scan or a mask .npy passed
        by mistake), is not valid YAML/JSON, or does not hold a mapping.
    """
    file = Path(path)
    fields = f"{model.__name__} fields"
    if file.is_dir():
        raise InputError(f"config file {file} is a folder; pass a YAML or JSON file of {fields}.")
    if not file.is_file():
        raise InputError(
            f"config file {file} does not exist; pass a YAML or JSON file of {fields}."
        )
    import yaml

    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"config file {file} is not a text file; pass a YAML or JSON file of {fields}."
        ) from None
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = exc.lineno if isinstance(exc, json.JSONDecodeError) else mark and mark.line + 1
        raise InputError(
            f"config file {file} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}"
            f"{f' (line {line})' if line else ''}; write one `field: value` line per setting."
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"config file {file} does not hold a mapping of {fields}; write `field: value` lines."
        )
    return data


def validated(
    path: str | os.PathLike[str], build: Callable[..., Model], *args: Any, **kwargs: Any
) -> Model:
    """``build(*args, **kwargs)``, its validation error told as one sentence naming ``path``."""
    try:
        return build(*args, **kwargs)
    except ValidationError as exc:
        raise InputError(
            f"config file {path}: {validation_sentence(exc)}; correct it and run again."
        ) from None
