"""What the core raises: problems a user can fix, said without naming how this project is run.

The stage shells add the rest: the params key a `SettingError` concerns, and the command that remakes
the input a `FileProblem` names (stages.cli). Anything else the core raises is a bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ValidationError

# The files a FileProblem can be about, by what they hold; stages.cli knows which stage makes each.
Artifact = Literal["raw", "manifest", "processed", "card", "weights", "onnx", "output"]
# missing: not there; damaged: not what its writer writes; outdated: made from other inputs than these;
# inconsistent: at odds with another file of the same input (the message says which, and is complete);
# unwritable: an output folder that cannot be created; unsupported: sound, but newer than what reads it here
# (the message says what to upgrade).
Kind = Literal["missing", "damaged", "outdated", "inconsistent", "unwritable", "unsupported"]


class CoreError(Exception):
    """A problem with the inputs or the settings that the user can fix."""


class SettingError(CoreError):
    """A setting that cannot work here: an absent device, a validation split as large as the data."""


class FileProblem(CoreError):
    """An input file (or output folder) that is missing or not what it should be; `str` is `path: problem`."""

    def __init__(self, path: Path, problem: str, *, artifact: Artifact, kind: Kind) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.artifact, self.kind = path, problem, artifact, kind


def missing(path: Path, artifact: Artifact) -> FileProblem:
    return FileProblem(path, "missing", artifact=artifact, kind="missing")


def damaged(path: Path, problem: str, artifact: Artifact) -> FileProblem:
    return FileProblem(path, problem, artifact=artifact, kind="damaged")


def first_error(error: ValidationError) -> str:
    """`key: what is wrong`, the first problem pydantic found in a JSON file."""
    first = error.errors()[0]
    where = ".".join(map(str, first["loc"])) or "the file"
    return f"{where}: {first['msg']}"
