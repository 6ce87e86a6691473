"""Stage `train`: fit the model named by `train.model` on the train split; write `models/`.

Writes the weights (safetensors), a model card (architecture, classes, normalisation, the recipe and the
device used) and the training curves and summary through DVCLive, all into one folder that appears
only when training has finished.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stages.artifacts import atomic_directory
from stages.cli import StageError, argument_parser, numerics_in_effect, run
from stages.model import TRAINING_LOG, architecture_for, build_model, save_model
from stages.params import Params, check_device, load_section, require
from stages.resume import input_key, load_state, remove_state, save_state
from stages.runtime import autocast_for, make_deterministic, resolve_device, set_cpu_threads
from stages.splits import load_meta, load_split
from stages.training import epoch_order, make_optimizer, make_schedule, predict, score, train_epoch

EVAL_BATCH = 8192  # validation forward passes; the size changes memory use only, not results


class TrainParams(Params):
    """`train`: the model, the optimiser and where it runs."""

    model: Literal["logreg", "mlp", "cnn"]
    hidden: tuple[int, ...]  # hidden layer widths of the mlp, and of the cnn after its convolutions
    channels: tuple[int, ...]  # the cnn's convolution widths, one 3x3 conv + 2x2 max-pool each
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    lr_schedule: Literal["constant", "cosine"]  # per step; cosine decays lr to 0 by the last step
    momentum: float  # sgd only
    weight_decay: float
    batch_size: int
    epochs: int
    early_stopping: int  # patience: stop when validation loss has not improved for this many epochs; 0 = off
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
        require(self.early_stopping >= 0, "train.early_stopping", "must be >= 0 (0 = off)")
        require(all(width >= 1 for width in self.channels), "train.channels", "widths must be >= 1")
        require(self.model != "cnn" or len(self.channels) >= 1, "train.channels", "the cnn needs at least one width")
        require(self.threads >= 1, "train.threads", "must be >= 1")
        require(all(width >= 1 for width in self.hidden), "train.hidden", "widths must be >= 1")
        require(self.model != "mlp" or len(self.hidden) >= 1, "train.hidden", "the mlp needs at least one width")
        check_device("train.device", self.device)


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by the preprocess stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and its training log")
    parser.add_argument("--live", type=Path, help="DVCLive folder, readable while training runs (default: none)")
    parser.add_argument("--resume", type=Path, help="folder for the state after each epoch (default: not saved)")
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
    architecture = architecture_for(params.model, params.hidden, meta, params.channels)
    state_folder = args.resume / input_key(params.model_dump(mode="json"), args.data) if args.resume else None

    from dvclive import Live  # imported here: it is the slowest import of the stage

    with atomic_directory(args.out) as folder:
        # With --live, the curves are readable there as each epoch ends (dvc.yaml's folder is no output, so
        # DVC never deletes it and train's run-cache stays on) and are copied into the model folder at the end.
        log = args.live or folder / TRAINING_LOG
        with Live(str(log), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            model, stopped = fit(params, architecture, train_set, val_set, device, autocast, live, state_folder)
            live.summary["device"] = str(device)
        if args.live:
            shutil.copytree(args.live, folder / TRAINING_LOG)
        card = {
            "architecture": architecture,
            "classes": meta["classes"],
            "dataset": meta["dataset"],
            "device": str(device),
            "numerics": numerics,
            "recipe": recipe(params),
            "stopped": stopped,
        }
        save_model(folder, model, card)
    if state_folder:
        remove_state(state_folder)


class BestEpoch:
    """The weights of the epoch with the lowest validation loss, and whether `patience` epochs passed without
    a lower one (patience 0: never stop early)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.epoch = 0
        self.loss = math.inf
        self.weights: dict[str, torch.Tensor] = {}

    def update(self, epoch: int, loss: float, model: nn.Module) -> bool:
        """Record epoch `epoch`'s validation loss; True when training should stop."""
        if loss < self.loss:  # a tie keeps the earlier epoch
            self.epoch, self.loss = epoch, loss
            self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return self.patience > 0 and epoch - self.epoch >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss": self.loss, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.loss, self.weights = state["epoch"], state["loss"], state["weights"]


def fit(
    params: TrainParams,
    architecture: dict[str, Any],
    train_set: tuple[torch.Tensor, torch.Tensor],
    val_set: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    autocast,
    live,
    state_folder: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train for up to `params.epochs` epochs, logging train and validation loss/accuracy after each.

    Returns the weights of the best validation epoch and what the card records about the stop. With a
    `state_folder`, the state after each epoch is saved there, and a run finding one continues from it.
    """
    # Initial weights are drawn on the CPU, so they are the same whichever device trains.
    torch.manual_seed(params.seed)
    model = build_model(architecture).to(device)
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
    best = BestEpoch(params.early_stopping)
    history: list[dict[str, float]] = []
    saved = load_state(state_folder) if state_folder else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        shuffle.set_state(saved["shuffle"])
        best.load_state_dict(saved["best"])
        history = saved["history"]
        print(f"train: resuming after epoch {len(history)} of {params.epochs} (state in {state_folder})", flush=True)
        for row in history:  # the curves of the epochs already done, as the killed run logged them
            log_epoch(live, row)
    epoch = len(history)
    stopping = epoch > 0 and best.patience > 0 and epoch - best.epoch >= best.patience
    while epoch < params.epochs and not stopping:
        epoch += 1
        start = time.perf_counter()
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
        row = {
            "train/loss": round(train_scores.loss, 6),
            "train/accuracy": round(train_scores.accuracy, 6),
            "val/loss": round(val_scores.loss, 6),
            "val/accuracy": round(val_scores.accuracy, 6),
        }
        history.append(row)
        log_epoch(live, row)
        stopping = best.update(epoch, val_scores.loss, model)
        if state_folder is not None:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "shuffle": shuffle.get_state(),
                "best": best.state_dict(),
                "history": history,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_state(state_folder, state)
        # After the state is saved: a run killed once this line is out resumes after this epoch.
        print(
            f"train: epoch {epoch}/{params.epochs}: train loss {row['train/loss']:.4f} accuracy "
            f"{row['train/accuracy']:.4f}, val loss {row['val/loss']:.4f} accuracy {row['val/accuracy']:.4f}, "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
    model.load_state_dict(best.weights)
    if stopping:
        reason = f"validation loss not lower for {params.early_stopping} epochs (train.early_stopping)"
    else:
        reason = f"all {params.epochs} epochs done (train.epochs)"
    return model, {"epoch": epoch, "best_epoch": best.epoch, "reason": reason}


def log_epoch(live, row: dict[str, float]) -> None:
    for name, value in row.items():
        live.log_metric(name, value)
    live.next_step()


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

    `hidden` and `channels` live in the architecture (empty where the model has none) and `device` as the
    device actually used, so
    a change that cannot change the weights (hidden sizes of a logreg, auto -> cpu on a CPU machine)
    leaves the model's bytes, and so the evaluate stage, untouched.
    """
    fields = params.model_dump()
    for key in ("model", "hidden", "channels", "device"):
        fields.pop(key)
    return fields


if __name__ == "__main__":
    run(main)
