"""End to end through `dvc repro` on a tiny synthetic dataset: what runs, what is cached, what is written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import (
    dvc,
    make_tiny_project,
    register_dataset,
    run,
    set_params,
    stages_restored,
    stages_run,
    write_dataset,
)

ALL_STAGES = ["download", "preprocess", "train", "evaluate"]

pytestmark = pytest.mark.e2e


def lock_hashes(project: Path) -> dict[str, str]:
    """Every out's and dep's md5 in dvc.lock, keyed by stage and path."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    hashes = {}
    for stage, entry in lock["stages"].items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []):
                hashes[f"{stage}:{kind}:{item['path']}"] = item["md5"]
    return hashes


@pytest.fixture(scope="module")
def first_repro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny project's first `dvc repro`, once for the module: the project, and what the repro printed."""
    root = tmp_path_factory.mktemp("pipeline")
    project = make_tiny_project(root)
    return project, dvc(project, "repro")


@pytest.fixture
def reproduced(first_repro: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> Path:
    """A copy of that reproduced project (its data mirror stays where the registry names it) for one test."""
    project, _ = first_repro
    return Path(shutil.copytree(project, tmp_path / "project", symlinks=True))


def test_repro_runs_all_stages_then_nothing(first_repro: tuple[Path, subprocess.CompletedProcess]) -> None:
    tiny_project, first = first_repro
    assert stages_run(first) == ALL_STAGES

    second = dvc(tiny_project, "repro")
    assert stages_run(second) == []
    assert "Data and pipelines are up to date." in second.stdout

    report = json.loads((tiny_project / "metrics" / "test.json").read_text())
    assert set(report) == {"accuracy", "loss", "macro_f1", "ece"}
    assert report["accuracy"] > 0.9  # the synthetic classes are easy; chance is 0.1
    card = json.loads((tiny_project / "models" / "model.json").read_text())
    assert card["classes"][0] == "class 0" and card["device"] == "cpu"
    assert sorted(p.name for p in (tiny_project / "data" / "processed").iterdir()) == [
        "meta.json",
        "test.safetensors",
        "train.safetensors",
        "val.safetensors",
    ]


def test_only_what_changed_reruns(reproduced: Path) -> None:
    tiny_project = reproduced
    # A train key that changes the weights: train, then evaluate (the model's bytes changed).
    set_params(tiny_project, **{"train.lr": 0.01})
    assert stages_run(dvc(tiny_project, "repro")) == ["train", "evaluate"]

    # A train key the logreg ignores: train reruns, produces the same bytes, evaluate is skipped.
    set_params(tiny_project, **{"train.hidden": [64, 32]})
    assert stages_run(dvc(tiny_project, "repro")) == ["train"]

    # An evaluate-only key: evaluate alone.
    set_params(tiny_project, **{"evaluate.calibration_bins": 5})
    assert stages_run(dvc(tiny_project, "repro")) == ["evaluate"]

    # An edit to preprocess code that does not change its outputs: preprocess alone.
    preprocess = tiny_project / "stages" / "preprocess.py"
    preprocess.write_text(preprocess.read_text() + "\n# a comment changes the hash, not the output\n")
    assert stages_run(dvc(tiny_project, "repro")) == ["preprocess"]

    # A preprocess change that changes its outputs: everything downstream.
    set_params(tiny_project, **{"preprocess.seed": 1})
    assert stages_run(dvc(tiny_project, "repro")) == ["preprocess", "train", "evaluate"]


def test_switching_dataset_reruns_all_four(reproduced: Path, tmp_path: Path) -> None:
    tiny_project = reproduced
    register_dataset(tiny_project, "tiny2", write_dataset(tmp_path / "mirror2", seed=7))
    run(tiny_project, "git", "commit", "-qam", "second tiny dataset")
    dvc(tiny_project, "repro")  # download reads the registry it changed
    set_params(tiny_project, **{"data.dataset": "tiny2"})
    assert stages_run(dvc(tiny_project, "repro")) == ALL_STAGES


def test_run_cache_restores_train_instead_of_training(tiny_project: Path) -> None:
    set_params(tiny_project, **{"train.lr": 0.002})
    dvc(tiny_project, "repro")
    model_a = (tiny_project / "models" / "model.safetensors").read_bytes()

    set_params(tiny_project, **{"train.lr": 0.02})
    assert "train" in stages_run(dvc(tiny_project, "repro"))

    set_params(tiny_project, **{"train.lr": 0.002})
    third = dvc(tiny_project, "repro")
    assert "train" not in stages_run(third)
    assert "train" in stages_restored(third)
    assert (tiny_project / "models" / "model.safetensors").read_bytes() == model_a


def test_forced_repro_is_byte_identical(reproduced: Path) -> None:
    tiny_project = reproduced
    before = lock_hashes(tiny_project)
    metrics_before = {p.name: p.read_bytes() for p in (tiny_project / "metrics").rglob("*") if p.is_file()}

    # --force reruns every stage; the run-cache is bypassed only if nothing is cached, so drop it too.
    shutil.rmtree(tiny_project / ".dvc" / "cache", ignore_errors=True)
    forced = dvc(tiny_project, "repro", "--force")
    assert stages_run(forced) == ALL_STAGES
    assert lock_hashes(tiny_project) == before
    metrics_after = {p.name: p.read_bytes() for p in (tiny_project / "metrics").rglob("*") if p.is_file()}
    assert metrics_after == metrics_before
