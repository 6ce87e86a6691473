"""Stage `train`: fit the model named by `train.model` on the train split; write `models/`.

Writes the weights (safetensors), a model card (architecture, classes, normalisation, the recipe and the
device used) and the training curves and summary through DVCLive, all into one folder that appears
only when training has finished.
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.cli import argument_parser, explained, numerics_in_effect, run, warn
from stages.core.artifacts import atomic_directory
from stages.core.files import TRAINING_LOG
from stages.core.model import Card, architecture_for, init_model, save_model
from stages.core.runtime import autocast_for, make_deterministic, resolve_device, set_cpu_threads
from stages.core.splits import load_split, read_meta
from stages.core.training import EpochScores, TrainConfig, fit
from stages.params import Params, check_device, load_section, require


class TrainParams(Params, TrainConfig):
    """`train`: the model, the optimiser and where it runs (the keys: TrainConfig)."""

    def check(self) -> None:
        require(self.lr > 0, "train.lr", "must be > 0")
        require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
        require(self.threads >= 1, "train.threads", "must be >= 1")
        require(all(width >= 1 for width in self.hidden), "train.hidden", "widths must be >= 1")
        require(self.model != "mlp" or len(self.hidden) >= 1, "train.hidden", "the mlp needs at least one width")
        check_device("train.device", self.device)


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by the preprocess stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and its training log")
    args = parser.parse_args()
    params = load_section(args.params, "train", TrainParams)
    with explained("train.device"):
        device = resolve_device(params.device)
    with explained("train.precision"):
        autocast = autocast_for(device, params.precision)
    make_deterministic(params.tf32)
    warn_if_oversubscribed(params.threads)
    set_cpu_threads(params.threads)
    numerics = numerics_in_effect()

    meta = read_meta(args.data)
    train_set, val_set = load_split(args.data, "train", device), load_split(args.data, "val", device)
    architecture = architecture_for(params.model, params.hidden, meta)
    model = init_model(architecture, params.seed, device)

    from dvclive import Live  # imported here: it is the slowest import of the stage

    with atomic_directory(args.out) as folder:
        with Live(str(folder / TRAINING_LOG), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            with explained("train.lr", fix=f"lower train.lr (now {params.lr}); nothing was written"):
                for scores in fit(model, train_set, val_set, params, autocast):
                    log_epoch(live, scores)
            live.summary["device"] = str(device)
        card = Card(
            architecture=architecture,
            classes=meta.classes,
            dataset=meta.dataset,
            device=str(device),
            numerics=numerics,
            recipe=params.recipe(),
        )
        save_model(folder, model, card)


def log_epoch(live, scores: EpochScores) -> None:
    """One DVCLive step: train and validation loss and accuracy."""
    for split, split_scores in (("train", scores.train), ("val", scores.val)):
        live.log_metric(f"{split}/loss", round(split_scores.loss, 6))
        live.log_metric(f"{split}/accuracy", round(split_scores.accuracy, 6))
    live.next_step()


def warn_if_oversubscribed(threads: int) -> None:
    """More threads than cores only makes them wait for each other; say so, but run as asked."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads > cores:
        warn(
            f"train.threads: {threads} threads on {cores} CPU cores here; each thread "
            f"beyond {cores} waits for the others (set train.threads: {cores} or fewer)"
        )


if __name__ == "__main__":
    run(main)
