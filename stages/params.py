"""Typed, checked parameters: each stage reads one params.yaml section into a frozen pydantic model.

params.yaml is read exactly as DVC reads it (ruamel.yaml's safe loader, YAML 1.2, the call in
dvc/utils/serialize/_yaml.py), so `lr: 2e-3` is the float 0.002 for the stage as for `dvc params diff`;
PyYAML's YAML 1.1 would make it a string. The model lives in the stage's own module (so editing one
stage's params never reruns another) and `dvc.yaml` declares that section for that stage alone. pydantic
checks the types (strict: no string or bool passes as a number, ints widen to floats); this module turns
its first error into one line that names the key and what is allowed.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from stages.cli import StageError

# The device names `train.device` accepts; `auto` means the first of cuda, mps, cpu that is there.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# pydantic's error type -> the type name in our messages.
TYPE_ERRORS = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


class Params(BaseModel):
    """A params section: unknown keys, missing keys and wrong types are refused; `check` adds the ranges."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def check(self) -> None:
        """Range checks of a section, with `require`; run once the types are right."""

    @model_validator(mode="after")
    def _check_ranges(self) -> Params:
        self.check()
        return self


Section = TypeVar("Section", bound=Params)


def read_params_file(params_file: Path) -> Any:
    """The document as DVC reads it: ruamel.yaml, typ="safe" (YAML 1.2), an empty file as {}."""
    from ruamel.yaml import YAML, YAMLError

    try:
        text = params_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"{params_file}: not found; run the stage from the project root") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StageError(f"{params_file}: cannot be read ({error}); restore it from git") from None
    try:
        return YAML(typ="safe").load(text) or {}
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise StageError(f"{params_file}: not valid YAML{where}; fix its syntax") from None


def load_section(params_file: Path, section: str, schema: type[Section]) -> Section:
    """Read `section` of a params file into `schema`, or raise StageError naming the bad key."""
    document = read_params_file(params_file)
    if not isinstance(document, dict) or not isinstance(document.get(section), dict):
        raise StageError(f"{params_file}: no '{section}:' section; add one (see README, Params)")
    return parse_section(section, document[section], schema)


def parse_section(section: str, values: dict[str, Any], schema: type[Section]) -> Section:
    """Check `values` against `schema`; keys are reported as `section.key`."""
    # YAML has lists, not tuples; strict pydantic takes only tuples for the frozen `tuple[...]` fields.
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        raise StageError(_one_line(section, schema, error)) from None


def _one_line(section: str, schema: type[Params], error: ValidationError) -> str:
    """The message of the first problem: unknown keys first, then missing ones, then types and ranges."""
    order = {"extra_forbidden": 0, "missing": 1}
    first = min(error.errors(), key=lambda item: order.get(item["type"], 2))
    kind, location, value = first["type"], first["loc"], first.get("input")
    if kind == "value_error":  # raised by `check`: its message is already the line
        return str(first["ctx"]["error"])
    name = str(location[0])
    if len(location) > 1 and isinstance(location[1], str):  # a member of a union (int | "auto"): name them all
        members = typing.get_args(schema.model_fields[name].annotation)
        allowed = " or ".join(", ".join(typing.get_args(member)) or member.__name__ for member in members)
        return f"{section}.{name}: expected {allowed}, got {value!r}"
    key = f"{section}.{name}" + "".join(f"[{index}]" for index in location[1:])
    if kind == "extra_forbidden":
        return f"{key}: unknown key; allowed keys: {', '.join(schema.model_fields)}"
    if kind == "missing":
        return f"{key}: missing; add it to params.yaml"
    annotation = schema.model_fields[name].annotation
    if kind == "literal_error":
        return f"{key}: got {value!r}; allowed: {', '.join(map(str, typing.get_args(annotation)))}"
    if kind == "tuple_type":
        return f"{key}: expected a list of {typing.get_args(annotation)[0].__name__}, got {value!r}"
    if kind in TYPE_ERRORS:
        return f"{key}: expected {TYPE_ERRORS[kind]}, got {value!r}"
    return f"{key}: {first['msg']}, got {value!r}"


class RangeError(ValueError):
    """Raised by a section's `check`; becomes a StageError naming the key."""


def require(condition: bool, key: str, rule: str) -> None:
    if not condition:
        raise RangeError(f"{key}: {rule}")


def check_share(key: str, size: int | float) -> None:
    """A part of a set: a count (an int >= 1) or a fraction (a float between 0 and 1, both excluded)."""
    if isinstance(size, int):
        require(size >= 1, key, "must be >= 1 (a count of images), or a fraction between 0 and 1")
    else:
        require(0 < size < 1, key, f"{size}: a fraction must be between 0 and 1 (or give a count of images)")


def check_device(key: str, device: str) -> None:
    require(
        DEVICE_PATTERN.fullmatch(device) is not None,
        key,
        f"got {device!r}; allowed: auto, cpu, cuda, cuda:N, mps",
    )
