"""The search command: an Optuna study whose trials are DVC experiments of the pipeline, pruned by the curves
train writes, and one line for each bad space, study or database (SQLite here; PostgreSQL and two workers:
tests/test_search_workers.py)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from helpers import dvc, experiments, one_line_error, project_env, run
from search_project import SEARCH, make_search_project, space_file

pytestmark = pytest.mark.e2e

# Log-uniform from a rate at which little is learnt in 8 epochs to one that learns the tiny dataset in one. With
# seed 6 the sampler's first draws are 7.8e-3, 6.6e-6 (stalls: pruned against the first) and 3.1e-3.
STALLING_SPACE = {"train.lr": {"low": 1.0e-7, "high": 0.03, "log": True}}
SEED = "6"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_search_project(tmp_path_factory.mktemp("search"))


def load(project: Path, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{project / 'search.db'}")


def test_each_trial_is_an_experiment_and_the_stalled_one_is_pruned(project: Path) -> None:
    space = space_file(project.parent / "stalling.yaml", STALLING_SPACE)
    # Started as a shell starts a job in the background (`mnist-search ... &`): with SIGINT ignored, which the
    # search must not pass on to the `dvc exp run` it stops with SIGINT.
    in_background = ("sh", "-c", 'trap "" INT && exec "$@"', "sh", *SEARCH)
    result = run(
        project, *in_background, str(space), "--study", "lr", "--trials", "3", "--seed", SEED, "--startup-trials", "1"
    )
    study = load(project, "lr")
    states = {trial.number: trial.state.name for trial in study.trials}
    assert (states[0], states[1]) == ("COMPLETE", "PRUNED"), result.stdout  # trial 2 may be pruned too

    rows = {exp["name"]: exp for exp in experiments(project)}
    listed = {name: row["data"] for name, row in rows.items()}
    for trial in study.trials:
        name = trial.user_attrs["experiment"]
        assert name == f"lr-{trial.number}" + ("-pruned" if trial.state.name == "PRUNED" else "")
        train = listed[name]["params"]["params.yaml"]["data"]["train"]
        assert train["lr"] == trial.params["train.lr"], name
        assert listed[name]["metrics"]["metrics/test.json"]["data"]["accuracy"] == trial.user_attrs["test"]["accuracy"]
        # The curves of the experiment are those the study was told, epoch by epoch.
        assert trial.intermediate_values == dict(enumerate(val_losses(project, rows[name]["rev"]), start=1)), name

    pruned = study.trials[1]
    epochs = pruned.user_attrs["epochs"]
    assert 1 <= epochs < 8 and listed["lr-1-pruned"]["params"]["params.yaml"]["data"]["train"]["stop_after"] == epochs
    # Clearly worse than the first trial where it was stopped, and continued from the killed run's state: the
    # experiment's train stage trained no epoch again.
    assert pruned.intermediate_values[epochs] > 10 * study.trials[0].intermediate_values[epochs]
    assert f"train: resuming after epoch {epochs} of 8" in result.stdout
    best, completed = study.best_trial, list(states.values()).count("COMPLETE")
    assert best.value == min(trial.value for trial in study.trials if trial.value is not None)
    last = result.stdout.splitlines()[-1]
    assert last.startswith(f"search: best of study lr ({completed} completed): trial {best.number}, "), last

    leaderboard = run(project, sys.executable, "-m", "stages.commands.report", "--exp", "--out", "review").stdout
    board = (project / leaderboard.strip()).read_text()
    assert all(f"`{trial.user_attrs['experiment']}`" in board for trial in study.trials), board
    dvc(project, "exp", "apply", best.user_attrs["experiment"])
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"] == best.params["train.lr"]


def val_losses(project: Path, rev: str) -> list[float]:
    """The validation losses of an experiment, one per epoch, from the curves it committed."""
    tsv = run(project, "git", "show", f"{rev}:metrics/training/plots/metrics/val/loss.tsv").stdout
    return [float(line.split("\t")[1]) for line in tsv.splitlines()[1:]]


# The faults of the issue through the command itself; every other spelling, in-process: test_search_space.py.
@pytest.mark.parametrize(
    ("space", "line"),
    [
        ({"train.learning_rate": [0.1]}, "train.learning_rate: unknown key; allowed keys: model, "),
        ({"train.lr": {"low": 0.1, "high": 0.01}}, "train.lr: an empty range (low 0.1 is not below high 0.01)"),
        ({"train.batch_size": [0, 64]}, "train.batch_size: must be >= 1 (the space tries 0)"),
    ],
    ids=["unknown key", "empty range", "refused value"],
)
def test_a_bad_space_is_one_line_and_starts_nothing(project: Path, space: dict, line: str) -> None:
    path = space_file(project.parent / "space.yaml", space)
    before = run(project, "git", "status", "--porcelain").stdout
    result = run(project, *SEARCH, str(path), "--study", "bad", "--trials", "1", check=False)
    assert one_line_error(result, f"search: error: {path}: {line}")
    assert run(project, "git", "status", "--porcelain").stdout == before
    with pytest.raises(KeyError):  # no study was made
        load(project, "bad")


def test_a_study_that_exists_with_another_space_is_refused(project: Path) -> None:
    first = space_file(project.parent / "first.yaml", {"train.lr": [0.01, 0.02]})
    run(project, *SEARCH, str(first), "--study", "other", "--trials", "0")
    second = space_file(project.parent / "second.yaml", {"train.lr": [0.01, 0.03]})
    result = run(project, *SEARCH, str(second), "--study", "other", "--trials", "1", check=False)
    one_line_error(result, 'search: error: --study other: exists with another space ([{"key": "train.lr"')
    assert load(project, "other").trials == []


def test_an_unreachable_database_is_one_line(project: Path) -> None:
    space = space_file(project.parent / "space.yaml", {"train.lr": [0.01, 0.02]})
    storage = "postgresql://search:secret@127.0.0.1:9/studies"  # nothing listens on port 9
    result = run(project, *SEARCH, str(space), "--study", "db", "--trials", "1", "--storage", storage, check=False)
    error = one_line_error(result, "search: error: --storage postgresql://search:***@127.0.0.1:9/studies: ")
    assert "secret" not in error and error.endswith("; start the database or fix the URL, then rerun"), error


def test_a_worker_killed_mid_trial_leaves_the_study_going_on(project: Path) -> None:
    space = space_file(project.parent / "killed.yaml", {"train.lr": [0.001, 0.003, 0.01]})
    command = (*SEARCH, str(space), "--study", "killed", "--trials", "1", "--no-prune")
    live = project / "dvclive"
    shutil.rmtree(live)  # the last test's curves
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    worker = subprocess.Popen(command, cwd=project, env=project_env(), **quiet)
    deadline = time.monotonic() + 300
    while not (live / "plots" / "metrics" / "val" / "loss.tsv").is_file():  # train is in its second epoch
        assert worker.poll() is None and time.monotonic() < deadline, "the trial never started training"
        time.sleep(0.1)
    for process in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)  # the machine is gone: the worker, DVC and train at once
    worker.wait()

    result = run(project, *command)
    assert f"search: warning: trial 0: its worker ({worker.pid}) is gone; marked failed" in result.stderr
    study = load(project, "killed")
    assert [trial.state.name for trial in study.trials] == ["FAIL", "COMPLETE"]
    names = {exp["name"] for exp in experiments(project)}
    assert "killed-1" in names and "killed-0" not in names
    assert json.loads((project / "metrics" / "test.json").read_text()) == study.trials[1].user_attrs["test"]
