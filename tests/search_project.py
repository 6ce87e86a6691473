"""What the search tests share: a tiny project whose epochs are long enough to be pruned while they run."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from helpers import TINY, TINY_PARAMS, copy_project, dvc, init_repo, register_dataset, run, set_params, write_dataset

SEARCH = (sys.executable, "-m", "stages.commands.search")
# A few tenths of a second an epoch on 2 cores, against the search's reading of the curves every 0.2 s.
SEARCH_PARAMS = TINY_PARAMS | {"train.epochs": 8, "train.batch_size": 10, "train.threads": 1}


def make_search_project(root: Path, reproduce: bool = True, **changes: object) -> Path:
    """A git repository of the project on a synthetic dataset of 4,000 training images; `reproduce`: its
    pipeline run and committed, so that a trial runs train and evaluate only."""
    project = copy_project(root / "project")
    register_dataset(project, TINY, write_dataset(root / "mirror", n_train=4000))
    set_params(project, **SEARCH_PARAMS | changes)
    init_repo(project, "tiny project")
    if reproduce:
        dvc(project, "repro")
        run(project, "git", "add", "-A")
        run(project, "git", "commit", "-qm", "results")
    return project


def space_file(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path
