"""A search space as a user writes it in YAML, and what a search trial draws from it.

Each entry names a params key (`section.key`) and what to try: a list of values, or a range
`{low: 0.0001, high: 0.1, log: true}` (integers when both ends are; `step` for a grid of them). This module
checks the shape of the file; whether each value is one the key accepts is the params models' to say.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from stages.core.errors import SettingError

RANGE_FIELDS = ("low", "high", "log", "step")
# The values Optuna stores as a choice as they are; any other (a list of widths) is stored as its JSON.
PLAIN = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One key of the space: its `choices`, or a range from `low` to `high` (log-uniform with `log`)."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def values_to_check(self) -> tuple[Any, ...]:
        """The values the key must accept for every draw to be valid: each choice, or both ends."""
        return self.choices or (self.low, self.high)

    def describe(self) -> dict[str, Any]:
        """What the study records of this dimension, to tell a later run with another space."""
        fields = {name: value for name, value in dataclasses.asdict(self).items() if value not in ((), None, False)}
        return json.loads(json.dumps(fields))  # as the study stores it: lists, not tuples

    def draw(self, trial: Any) -> Any:
        """This dimension's value for an Optuna `trial`."""
        if self.choices:
            stored = [value if isinstance(value, PLAIN) else json.dumps(value) for value in self.choices]
            picked = trial.suggest_categorical(self.key, stored)
            return self.choices[stored.index(picked)]
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)


def read_space(document: Any) -> list[Dimension]:
    """The dimensions of a space file's YAML `document`; SettingError names the first entry that is wrong."""
    if not isinstance(document, dict) or not document:
        raise SettingError("expected a mapping of params keys (section.key) to a list or a range {low, high}")
    return [dimension(str(key), spec) for key, spec in document.items()]


def dimension(key: str, spec: Any) -> Dimension:
    if isinstance(spec, list):
        if not spec:
            raise SettingError(f"{key}: an empty list; give the values to try")
        if len({json.dumps(value, sort_keys=True) for value in spec}) < len(spec):
            raise SettingError(f"{key}: a value is listed twice; list each once")
        return Dimension(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise SettingError(f"{key}: got {spec!r}; give a list of values or a range {{low: ..., high: ...}}")
    unknown = [field for field in spec if field not in RANGE_FIELDS]
    if unknown:
        raise SettingError(f"{key}: unknown field {unknown[0]!r}; a range has {', '.join(RANGE_FIELDS)}")
    low, high, log, step = (spec.get(field) for field in RANGE_FIELDS)
    numbers = [value for value in (low, high) if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if len(numbers) < 2:
        raise SettingError(f"{key}: a range needs numbers low and high, got low {low!r}, high {high!r}")
    if not low < high:
        raise SettingError(f"{key}: an empty range (low {low} is not below high {high}); widen it")
    if log not in (None, True, False) or (log and low <= 0):
        raise SettingError(f"{key}: log must be true or false, and a log range needs low > 0 (got low {low})")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or log):
        raise SettingError(f"{key}: step must be a number > 0, and not with log, got {step!r}")
    return Dimension(key, low=low, high=high, log=bool(log), step=step)


def as_override(value: Any) -> str:
    """`value` as DVC's `-S key=value` reads it (YAML): lists in flow style, floats round-tripped."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_override(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
