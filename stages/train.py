"""Stage `train`: fit the model named by `train.model` on the train split; write `models/`.

Writes the weights (safetensors), a model card (architecture, classes, normalisation, the recipe and the
device used) and the training curves and summary through DVCLive, all into one folder that appears
only when training has finished.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from stages.artifacts import atomic_directory
from stages.cli import StageError, argument_parser, numerics_in_effect, run
from stages.model import TRAINING_LOG, Classifier, architecture_for, save_model
from stages.params import Params, check_device, load_section, require
from stages.runtime import autocast_for, make_deterministic, resolve_device, set_cpu_threads
from stages.splits import load_meta, load_split
from stages.training import epoch_order, make_optimizer, make_schedule, predict, score, train_epoch

EVAL_BATCH = 8192  # validation forward passes; the size changes memory use only, not results


class TrainParams(Params):
    """`train`: the model, the optimiser and where it runs."""

    model: Literal["logreg", "mlp"]
    hidden: tuple[int, ...]  # hidden layer widths of the mlp; ignored by logreg
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    lr_schedule: Literal["constant", "cosine"]  # per step; cosine decays lr to 0 by the last step
    momentum: float  # sgd only
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int  # initial weights and shuffling
    threads: int  # CPU threads for torch's ops; part of the recipe, as the float sums depend on it
    device: str  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"]  # bf16/fp16 autocast on CUDA only
    tf32: bool  # allow TF32 matmuls on Ampere+ GPUs (faster, not bit-identical to fp32)

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
    device = resolve_device(params.device, "train.device")
    autocast = autocast_for(device, params.precision, "train.precision")
    make_deterministic(params.tf32)
    warn_if_oversubscribed(params.threads)
    set_cpu_threads(params.threads)
    numerics = numerics_in_effect()

    meta = load_meta(args.data)
    train_set = load_split(args.data, "train", device)
    val_set = load_split(args.data, "val", device)
    architecture = architecture_for(params.model, params.hidden, meta)

    from dvclive import Live  # imported here: it is the slowest import of the stage

    with atomic_directory(args.out) as folder:
        with Live(str(folder / TRAINING_LOG), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            model = fit(params, architecture, train_set, val_set, device, autocast, live)
            live.summary["device"] = str(device)
        card = {
            "architecture": architecture,
            "classes": meta["classes"],
            "dataset": meta["dataset"],
            "device": str(device),
            "numerics": numerics,
            "recipe": recipe(params),
        }
        save_model(folder, model, card)


def fit(
    params: TrainParams,
    architecture: dict[str, Any],
    train_set: tuple[torch.Tensor, torch.Tensor],
    val_set: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    autocast,
    live,
) -> Classifier:
    """Train for `params.epochs` epochs, logging train and validation loss/accuracy after each."""
    # Initial weights are drawn on the CPU, so they are the same whichever device trains.
    torch.manual_seed(params.seed)
    model = Classifier(architecture).to(device)
    optimizer = make_optimizer(
        params.optimizer,
        model.parameters(),
        lr=params.lr,
        momentum=params.momentum,
        weight_decay=params.weight_decay,
    )
    images, labels = train_set
    steps_per_epoch = -(-len(images) // params.batch_size)  # the last batch may be smaller
    scheduler = make_schedule(params.lr_schedule, optimizer, params.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if params.precision == "fp16" else None
    shuffle = torch.Generator().manual_seed(params.seed)
    for epoch in range(1, params.epochs + 1):
        order = epoch_order(len(images), shuffle, device)
        train_scores = train_epoch(
            model, images, labels, order, params.batch_size, optimizer, scheduler, autocast, scaler
        )
        val_scores = score(predict(model, val_set[0], EVAL_BATCH), val_set[1])
        # Checked once per epoch (a check per step would synchronise CUDA every batch): NaN weights never
        # recover, and a model that writes NaN metrics must not pass for a result.
        if not (math.isfinite(train_scores.loss) and math.isfinite(val_scores.loss)):
            raise StageError(
                f"train.lr: training diverged in epoch {epoch} (loss {train_scores.loss}, validation loss "
                f"{val_scores.loss}); lower train.lr (now {params.lr}); nothing was written"
            )
        for split, scores in (("train", train_scores), ("val", val_scores)):
            live.log_metric(f"{split}/loss", round(scores.loss, 6))
            live.log_metric(f"{split}/accuracy", round(scores.accuracy, 6))
        live.next_step()
    return model


def warn_if_oversubscribed(threads: int) -> None:
    """More threads than cores only makes them wait for each other; say so, but run as asked."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads > cores:
        print(
            f"train: warning: train.threads: {threads} threads on {cores} CPU cores here; each thread "
            f"beyond {cores} waits for the others (set train.threads: {cores} or fewer)",
            file=sys.stderr,
        )


def recipe(params: TrainParams) -> dict[str, Any]:
    """What the weights depend on besides the architecture: the card records it, nanoGPT-style.

    `hidden` lives in the architecture (empty for logreg) and `device` as the device actually used, so
    a change that cannot change the weights (hidden sizes of a logreg, auto -> cpu on a CPU machine)
    leaves the model's bytes, and so the evaluate stage, untouched.
    """
    fields = params.model_dump()
    for key in ("model", "hidden", "device"):
        fields.pop(key)
    return fields


if __name__ == "__main__":
    run(main)
