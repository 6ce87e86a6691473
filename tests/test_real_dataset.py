"""The default pipeline on the real Fashion-MNIST, offline from Debian's package: the accuracy floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import copy_project, dvc, init_repo, stages_run

DEBIAN_MIRROR = Path("/usr/share/datasets/fashion-mnist")
# The Fashion-MNIST paper's LogisticRegression baseline (benchmark/baselines.json in its repository).
ACCURACY_FLOOR = 0.842

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not DEBIAN_MIRROR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it via apt)"
    ),
]


def test_default_pipeline_reaches_the_logistic_regression_baseline(tmp_path: Path) -> None:
    project = init_repo(copy_project(tmp_path / "project"), "fresh clone")

    first = dvc(project, "repro")
    assert stages_run(first) == ["download", "preprocess", "train", "evaluate"]
    report = json.loads((project / "metrics" / "test.json").read_text())
    card = json.loads((project / "models" / "model.json").read_text())
    assert card["dataset"] == "fashion-mnist" and card["architecture"]["model"] == "logreg"
    assert report["accuracy"] >= ACCURACY_FLOOR, report

    meta = json.loads((project / "data" / "processed" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 55000, "val": 5000, "test": 10000}
    assert stages_run(dvc(project, "repro")) == []
