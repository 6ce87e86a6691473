"""What pruning saves: a search of the mlp's space pruned, the same study whole, and a grid of the same epochs.

Run by hand, never in CI, from the project root (needs Debian's dataset-fashion-mnist):

    python -m benchmarks.search_speed [--trials 16] [--epochs 8]

Three throw-away clones of the project on the real Fashion-MNIST, each its own DVC cache (no run-cache shared):
- pruned: `mnist-search` over the mlp's space (learning rate, batch size, width), --trials, TPE with seed 0;
- whole: the same study, same sampler and seed, `--no-prune`;
- grid: a `dvc queue` grid of the same space, as many points as the pruned study's epochs pay for.
Epochs used are the epochs each trial trained (a pruned trial's up to where it was stopped); a study's best is
the highest validation accuracy (of the epoch train keeps) among its whole trials, the grid's among its points.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml

from benchmarks.results import figure, ratio, recorded
from tests.helpers import copy_project, dvc, experiments, init_repo, run, set_params, start_queue, wait_for_queue

SPACE = {
    "train.lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
    "train.batch_size": [128, 256, 512, 1024],
    "train.hidden": [[64], [128], [256], [512]],
}
GRID_BATCHES, GRID_WIDTHS = (256, 1024), ([128], [512])  # with learning rates log-spaced over SPACE's range
TARGETS = {"epochs": "<= 0.6x", "accuracy": ">= -0.002", "grid": ">= -0.002"}


def project(root: Path, epochs: int) -> Path:
    """A clone of this checkout set to the mlp, its data downloaded and preprocessed into its own cache."""
    folder = copy_project(root)
    set_params(folder, **{"train.model": "mlp", "train.epochs": epochs, "train.threads": "auto"})
    init_repo(folder, "mlp")
    dvc(folder, "repro", "preprocess")
    run(folder, "git", "add", "-A")
    run(folder, "git", "commit", "-qm", "data")
    return folder


def study(folder: Path, trials: int, prune: bool) -> dict:
    space = folder.parent / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    options = ["--study", "bench", "--trials", str(trials), "--seed", "0", *([] if prune else ["--no-prune"])]
    started = time.perf_counter()
    run(folder, sys.executable, "-m", "stages.commands.search", str(space), *options, timeout=24 * 3600)
    seconds = time.perf_counter() - started
    found = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder / 'search.db'}")
    whole = [trial for trial in found.trials if trial.state.name == "COMPLETE"]
    return {
        "epochs": sum(trial.user_attrs["epochs"] for trial in found.trials if "epochs" in trial.user_attrs),
        "best": max(trial.user_attrs["val_accuracy"] for trial in whole),
        "pruned": sum(trial.state.name == "PRUNED" for trial in found.trials),
        "seconds": seconds,
    }


def grid(folder: Path, epochs: int, budget: int) -> dict:
    """The grid of as many points as `budget` epochs pay for, queued and run by one `dvc queue` worker."""
    learning_rates = max(1, budget // epochs // (len(GRID_BATCHES) * len(GRID_WIDTHS)))
    low, high = SPACE["train.lr"]["low"], SPACE["train.lr"]["high"]
    # The middles of equal log-spaced cells, as a user lays a grid: never the range's ends alone.
    middles = np.geomspace(low, high, 2 * learning_rates + 1)[1::2]
    points = list(itertools.product(middles, GRID_BATCHES, GRID_WIDTHS))
    for lr, batch, width in points:
        settings = [f"train.lr={float(lr)!r}", f"train.batch_size={batch}", f"train.hidden={width}"]
        dvc(folder, "exp", "run", "--queue", *(arg for setting in settings for arg in ("-S", setting)))
    started = time.perf_counter()
    start_queue(folder, 1, folder.parent / "queue.log")
    wait_for_queue(folder, timeout=24 * 3600)
    seconds = time.perf_counter() - started
    best = max(kept_accuracy(folder, exp["rev"]) for exp in experiments(folder))
    return {"epochs": len(points) * epochs, "points": len(points), "best": best, "seconds": seconds}


def kept_accuracy(folder: Path, rev: str) -> float:
    """The validation accuracy of the epoch train kept (the lowest validation loss), from the curves committed."""

    def curve(name: str) -> list[float]:
        text = run(folder, "git", "show", f"{rev}:metrics/training/plots/metrics/val/{name}.tsv").stdout
        return [float(line.split("\t")[1]) for line in text.splitlines()[1:]]

    losses = curve("loss")
    return curve("accuracy")[losses.index(min(losses))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of each study (default: 16)")
    parser.add_argument("--epochs", type=int, default=8, help="train.epochs of every trial (default: 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="search-speed-") as temp:
        root = Path(temp)
        pruned = study(project(root / "pruned" / "project", args.epochs), args.trials, prune=True)
        whole = study(project(root / "whole" / "project", args.epochs), args.trials, prune=False)
        gridded = grid(project(root / "grid" / "project", args.epochs), args.epochs, pruned["epochs"])
    epochs, accuracy, versus_grid = (
        pruned["epochs"] / whole["epochs"],
        pruned["best"] - whole["best"],
        pruned["best"] - gridded["best"],
    )
    print(f"{args.trials} trials of {args.epochs} epochs each; mlp on Fashion-MNIST")
    for name, result in (("pruned", pruned), ("whole", whole), ("grid", gridded)):
        best, seconds = result["best"], result["seconds"]
        print(f"{name:<7} {result['epochs']:>4} epochs, best val accuracy {best:.4f}, {seconds:.0f} s")
    with recorded("search_speed") as figures:
        detail = f"{pruned['epochs']} / {whole['epochs']} epochs, {pruned['pruned']} of {args.trials} trials pruned"
        figures["epochs"] = ratio("epochs, pruned study / whole study", epochs, 2, TARGETS["epochs"], detail)
        figures["accuracy"] = figure(
            "best val accuracy, pruned - whole", round(accuracy, 4), f"{accuracy:+.4f}", TARGETS["accuracy"]
        )
        figures["grid"] = figure(
            "best val accuracy, pruned study - grid (same epochs)",
            round(versus_grid, 4),
            f"{versus_grid:+.4f}",
            TARGETS["grid"],
            f"grid of {gridded['points']} points, {gridded['epochs']} epochs",
        )


if __name__ == "__main__":
    main()
