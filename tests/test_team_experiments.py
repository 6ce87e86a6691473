"""Experiments past one machine: two teammates' grids shared through git and the team's DVC remote and read on a
third machine, which gets the best model without training; and a queue whose workers each train on the device
their experiment names, as one worker per GPU would (two CPU workers here). The remotes and the origin are
conftest.py's."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import dvc, experiments, queue_statuses, run, stages_run, start_queue, stop_workers
from team import LocalRemote, S3Remote, assert_clean, fingerprint, object_key, object_md5, teammate

pytestmark = pytest.mark.e2e

# Learning rates small enough that two epochs on the tiny dataset leave every experiment a different test accuracy.
GRIDS = {"a": ("0.0002", "0.0006"), "b": ("0.0004", "0.0008")}  # machine: its `-S train.lr=...` values
QUEUED_LRS = ("0.0002", "0.0004", "0.0006", "0.0008")
WORKERS = 2


@dataclass(frozen=True)
class Seen:
    """What the machine that ran an experiment saw in its workspace right after `dvc exp run`."""

    lr: float
    metrics: dict
    models: dict[str, str]  # team.fingerprint of models/


def run_grid(machine: Path, prefix: str, lrs: tuple[str, ...]) -> dict[str, Seen]:
    """One `dvc exp run` per learning rate, in the workspace, each named `<prefix>-lr-<lr>`."""
    seen = {}
    for lr in lrs:
        name = f"{prefix}-lr-{lr}"
        dvc(machine, "exp", "run", "--name", name, "-S", f"train.lr={lr}")
        metrics = json.loads((machine / "metrics" / "test.json").read_text())
        seen[name] = Seen(float(lr), metrics, fingerprint(machine, ("models",)))
    return seen


def test_experiments_from_two_machines_are_shown_and_applied_on_a_third(
    remote: LocalRemote | S3Remote, origin: Path, tmp_path: Path
) -> None:
    seen: dict[str, Seen] = {}
    for machine, lrs in GRIDS.items():
        clone = teammate(remote, origin, tmp_path / machine)
        seen |= run_grid(clone, machine, lrs)
        pushed = dvc(clone, "exp", "push", "origin")  # git refs to origin, and the outputs to the DVC remote
        assert "Pushed experiment" in pushed.stdout, pushed.stdout

    c = teammate(remote, origin, tmp_path / "c")
    dvc(c, "exp", "pull", "origin")
    listed = {exp["name"]: exp["data"] for exp in experiments(c)}
    assert set(listed) == set(seen)
    for name, data in listed.items():
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == seen[name].lr, name
        assert data["metrics"]["metrics/test.json"]["data"] == seen[name].metrics, name
    accuracies = {name: seen[name].metrics["accuracy"] for name in seen}
    assert len(set(accuracies.values())) == len(seen), accuracies  # so that "the best" is one experiment

    best = min(listed, key=lambda name: (-listed[name]["metrics"]["metrics/test.json"]["data"]["accuracy"], name))
    assert not (c / "models").exists()
    dvc(c, "exp", "apply", best)
    dvc(c, "pull")
    assert fingerprint(c, ("models",)) == seen[best].models  # the bytes its machine trained
    assert json.loads((c / "metrics" / "test.json").read_text()) == seen[best].metrics
    assert_clean(c)
    assert stages_run(dvc(c, "repro")) == []  # nothing trains on C


def test_queue_workers_each_train_on_the_device_their_experiment_names(tiny_project: Path, tmp_path: Path) -> None:
    # The baseline's data in the cache: each queued experiment reruns only train and evaluate.
    dvc(tiny_project, "repro")
    run(tiny_project, "git", "add", "-A")
    run(tiny_project, "git", "commit", "-qm", "baseline")
    # One device per experiment, as `-S train.device=cuda:K` pins one per GPU; on CPU every device is `cpu`,
    # and one thread each keeps the two workers off each other's cores.
    asked = {f"q-lr-{lr}": ("cpu", float(lr)) for lr in QUEUED_LRS}
    for name, (device, lr) in asked.items():
        settings = [f"train.device={device}", "train.threads=1", f"train.lr={lr}"]
        dvc(tiny_project, "exp", "run", "--queue", "--name", name, *(arg for s in settings for arg in ("-S", s)))

    started = start_queue(tiny_project, WORKERS, tmp_path / "queue-start.log")
    assert f"Started '{WORKERS}' new experiments task queue workers." in started, started
    busiest = 0
    try:
        for status in queue_statuses(tiny_project, timeout=480):
            if found := re.search(r"Worker status: (\d+) active", status):
                busiest = max(busiest, int(found[1]))
    finally:
        stop_workers(tiny_project)
    assert status.count("Success") == len(asked), status
    assert busiest == WORKERS, f"never saw {WORKERS} workers running at once; the last status:\n{status}"

    listed = {exp["name"]: exp["data"] for exp in experiments(tiny_project)}
    assert set(listed) == set(asked)
    for name, (device, lr) in asked.items():
        card_md5 = object_md5(tiny_project, listed[name]["outs"]["models"]["hash"], "model.json")
        card = json.loads((tiny_project / ".dvc" / "cache" / object_key(card_md5)).read_text())
        assert (card["device"], card["recipe"]["lr"]) == (device, lr), name
