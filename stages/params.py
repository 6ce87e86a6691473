"""Typed, checked parameters: each stage reads one params.yaml section into a frozen dataclass.

The dataclass lives in the stage's own module (so editing one stage's params never reruns another) and
`dvc.yaml` declares that section for that stage alone. Unknown keys, missing keys, wrong types and
out-of-range values are rejected with a message that names the key and what is allowed, before the stage
writes anything.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from stages.cli import StageError

Section = TypeVar("Section")

# The device names `train.device` accepts; `auto` means the first of cuda, mps, cpu that is there.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def load_section(params_file: Path, section: str, schema: type[Section]) -> Section:
    """Read `section` of a params file into `schema`, or raise StageError naming the bad key."""
    try:
        with open(params_file, encoding="utf-8") as stream:
            document = yaml.safe_load(stream)
    except FileNotFoundError:
        raise StageError(f"{params_file}: not found; run the stage from the project root") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise StageError(f"{params_file}: not valid YAML{where}; fix its syntax") from None
    if not isinstance(document, dict) or not isinstance(document.get(section), dict):
        raise StageError(f"{params_file}: no '{section}:' section; add one (see README, Params)")
    return parse_section(section, document[section], schema)


def parse_section(section: str, values: dict[str, Any], schema: type[Section]) -> Section:
    """Check `values` against the dataclass `schema`; keys are reported as `section.key`."""
    hints = typing.get_type_hints(schema)
    names = [field.name for field in dataclasses.fields(schema)]
    for key in values:
        if key not in hints:
            raise StageError(f"{section}.{key}: unknown key; allowed keys: {', '.join(names)}")
    for name in names:
        if name not in values:
            raise StageError(f"{section}.{name}: missing; add it to params.yaml")
    checked = {name: _check_type(f"{section}.{name}", values[name], hints[name]) for name in names}
    try:
        return schema(**checked)
    except RangeError as error:
        raise StageError(str(error)) from None


class RangeError(ValueError):
    """Raised by a params dataclass's __post_init__; becomes a StageError naming the key."""


def require(condition: bool, key: str, rule: str) -> None:
    if not condition:
        raise RangeError(f"{key}: {rule}")


def check_device(key: str, device: str) -> None:
    require(
        DEVICE_PATTERN.fullmatch(device) is not None,
        key,
        f"got {device!r}; allowed: auto, cpu, cuda, cuda:N, mps",
    )


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Return `value` as `expected` (lists become tuples, ints widen to floats) or raise StageError."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        allowed = typing.get_args(expected)
        if value not in allowed:
            raise StageError(f"{key}: got {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        item_type = typing.get_args(expected)[0]
        if not isinstance(value, list):
            raise StageError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return tuple(_check_type(f"{key}[{index}]", item, item_type) for index, item in enumerate(value))
    # bool is an int in Python; a YAML `true` must not pass as a number, nor a number as a flag.
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise StageError(f"{key}: expected {expected.__name__}, got {value!r}")
