"""The tests' stage server (tests/stage_server.py), against the real programs: a stage it forks writes the same
bytes, prints the same lines and exits with the same status as `python -m stages.X` started on its own; what could
compute otherwise (a numerics variable the server did not start with) runs the real interpreter."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import dvc, project_env, set_params

pytestmark = pytest.mark.e2e

TRAIN = ("python", "-m", "stages.train", "--data", "data/processed", "--live", "dvclive")


def both(project: Path, command: tuple[str, ...], extra_env: dict[str, str] | None = None) -> list:
    """`command` run by the real interpreter and by the server, the second writing into `--out forked`."""
    return [
        subprocess.run(
            [*command, "--out", out],
            cwd=project,
            env=project_env(stage_server=forked) | (extra_env or {}),
            capture_output=True,
            text=True,
        )
        for out, forked in (("real", False), ("forked", True))
    ]


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_forked_stage_computes_prints_and_exits_as_a_real_one(tiny_project: Path) -> None:
    dvc(tiny_project, "repro", "preprocess")
    real, forked = both(tiny_project, TRAIN)
    assert real.returncode == forked.returncode == 0, real.stderr + forked.stderr
    assert files(tiny_project / "real") == files(tiny_project / "forked")
    # Each epoch's line ends in its seconds; the lines before them are the same.
    assert real.stderr.split("train: epoch")[0] == forked.stderr.split("train: epoch")[0]

    set_params(tiny_project, **{"train.lr": -1})
    real, forked = both(tiny_project, TRAIN)
    assert real.returncode == forked.returncode == 1
    assert real.stderr == forked.stderr and real.stderr.count("\n") == 1, real.stderr


def test_a_numerics_variable_the_server_did_not_start_with_runs_the_real_interpreter(tiny_project: Path) -> None:
    dvc(tiny_project, "repro", "preprocess")
    real, forked = both(tiny_project, TRAIN, {"OPENBLAS_CORETYPE": "SkylakeX"})
    warning = "train: warning: OPENBLAS_CORETYPE=SkylakeX from the environment ignored"
    assert real.returncode == forked.returncode == 0
    assert warning in real.stderr and warning in forked.stderr, forked.stderr
