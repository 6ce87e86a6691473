"""Two workers of one study on two machines: each its own clone of the team's origin with its own DVC cache,
the study in a real PostgreSQL server on 127.0.0.1, the experiments shared through `dvc exp push` / `pull`
(the git origin and the default DVC remote under a `~` of the test's own)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
from helpers import dvc, experiments, project_env, run
from postgres_server import postgres, server_binaries
from search_project import SEARCH, make_search_project, space_file
from team import clone, fingerprint

pytestmark = [pytest.mark.e2e, pytest.mark.server]

SPACE = {"train.lr": {"low": 1.0e-3, "high": 0.03, "log": True}, "train.batch_size": [10, 20]}
TRIALS = 2  # one each: both workers start their first trial at once


@pytest.fixture(scope="module")
def storage() -> str:
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("needs PostgreSQL's server (Debian's postgresql: make test installs it)")
    with postgres(binaries) as url:
        yield url


@pytest.fixture
def origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The team's bare origin of the search project, with no results yet: each machine's first trial runs the
    whole pipeline into its own cache. The default DVC remote is under this test's `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project = make_search_project(tmp_path, reproduce=False, **{"train.epochs": 2})
    origin = tmp_path / "origin.git"
    run(tmp_path, "git", "clone", "-q", "--bare", str(project), str(origin))
    return origin


def test_two_workers_share_one_study_and_each_others_experiments(storage: str, origin: Path) -> None:
    space = space_file(origin.parent / "space.yaml", SPACE)
    machines = {name: clone(origin, origin.parent / name) for name in ("a", "b")}
    options = ("--study", "team", "--trials", str(TRIALS), "--storage", storage, "--push", "origin", "--no-prune")
    command = (*SEARCH, str(space), *options)
    workers = {
        name: subprocess.Popen(
            [*command, "--seed", str(seed)],
            cwd=machine,
            env=project_env(stage_server=True),
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed, (name, machine) in enumerate(machines.items())
    }
    outputs = {name: worker.communicate(timeout=900)[0] for name, worker in workers.items()}
    assert all(worker.returncode == 0 for worker in workers.values()), outputs

    study = optuna.load_study(study_name="team", storage=storage)
    trials = study.trials
    assert TRIALS <= len(trials) <= TRIALS + 1 and all(trial.state.name == "COMPLETE" for trial in trials), outputs
    names = {trial.user_attrs["experiment"] for trial in trials}
    assert names == {f"team-{trial.number}" for trial in trials}
    # No trial ran twice: each machine holds the experiments its worker ran, and the two share none.
    ran = {name: {exp["name"] for exp in experiments(machine)} for name, machine in machines.items()}
    assert ran["a"] | ran["b"] == names and not ran["a"] & ran["b"] and ran["a"] and ran["b"], ran
    pids = {name: worker.pid for name, worker in workers.items()}
    for trial in trials:
        ran_on = next(name for name in machines if trial.user_attrs["experiment"] in ran[name])
        assert trial.user_attrs["worker"]["pid"] == pids[ran_on]

    best = study.best_trial.user_attrs["experiment"]
    for name, machine in machines.items():
        dvc(machine, "exp", "pull", "origin")  # the other's experiments, their outputs into this cache
        listed = {exp["name"]: exp["data"] for exp in experiments(machine)}
        assert set(listed) == names, name
        for trial in trials:
            data = listed[trial.user_attrs["experiment"]]
            assert data["params"]["params.yaml"]["data"]["train"]["lr"] == trial.params["train.lr"]
            assert data["metrics"]["metrics/test.json"]["data"] == trial.user_attrs["test"]
        # The same best from both: the last line of a run that has nothing left to do.
        last = run(machine, *command, "--trials", "0").stdout.splitlines()[-1]
        assert f"trial {study.best_trial.number}, experiment {best}: " in last, last
        dvc(machine, "exp", "apply", best)
        assert json.loads((machine / "metrics" / "test.json").read_text()) == study.best_trial.user_attrs["test"]
    assert fingerprint(machines["a"], ("models",)) == fingerprint(machines["b"], ("models",))
