"""Stage `train`: fit the model named by `train.model` on the train split; write `models/`.

Writes the weights (safetensors), a model card (architecture, classes, normalisation, the recipe and the
device used) and the training curves and summary through DVCLive, all into one folder that appears
only when training has finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from torch import nn

from stages.cli import argument_parser, explained, numerics_in_effect, run, warn
from stages.core.artifacts import atomic_directory
from stages.core.contract import Stopped
from stages.core.files import TRAINING_LOG
from stages.core.model import Card, architecture_for, init_model, save_model
from stages.core.resume import input_key, load_state, remove_state, save_state
from stages.core.runtime import autocast_for, make_deterministic, resolve_device, set_cpu_threads
from stages.core.splits import load_split, read_meta
from stages.core.training import Batch, BestEpoch, EpochScores, TrainConfig, fit
from stages.params import Params, check_device, load_section, require


class TrainParams(Params, TrainConfig):
    """`train`: the model, the optimiser and where it runs (the keys: TrainConfig)."""

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
    args = arguments()
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
    architecture = architecture_for(params.model, params.hidden, meta, params.channels)
    model = init_model(architecture, params.seed, device)
    state = args.resume / input_key(params.model_dump(mode="json"), args.data) if args.resume else None

    from dvclive import Live  # imported here: it is the slowest import of the stage

    with atomic_directory(args.out) as folder:
        # --live: curves readable as each epoch ends, in a folder DVC never deletes (no output: train's
        # run-cache stays on); copied into the model folder at the end.
        with Live(str(args.live or folder / TRAINING_LOG), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            with explained("train.lr", fix=f"lower train.lr (now {params.lr}); nothing was written"):
                stopped = train_epochs(model, train_set, val_set, params, autocast, live, state)
            live.summary["device"] = str(device)
        if args.live:
            shutil.copytree(args.live, folder / TRAINING_LOG)
        recorded = {"device": str(device), "numerics": numerics, "recipe": params.recipe(), "stopped": stopped}
        card = Card(architecture=architecture, classes=meta.classes, dataset=meta.dataset, **recorded)
        save_model(folder, model, card)
    if state:
        remove_state(state)


def arguments() -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by the preprocess stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and its training log")
    parser.add_argument("--live", type=Path, help="DVCLive folder, readable while training runs (default: none)")
    parser.add_argument("--resume", type=Path, help="folder for the state after each epoch (default: not saved)")
    return parser.parse_args()


def train_epochs(
    model: nn.Module, train_set: Batch, val_set: Batch, params: TrainParams, autocast, live, state: Path | None
) -> Stopped:
    """fit's epochs, each logged, printed as one line and (with a `state` folder) saved for a resume; leaves
    the best validation epoch's weights in `model`, and says how training ended."""
    best, history, saved = BestEpoch(params.early_stopping), [], load_state(state) if state else None
    if saved is not None:
        best.load_state_dict(saved["best"])
        history = saved["history"]
        print(f"train: resuming after epoch {len(history)} of {params.epochs} (state in {state})", flush=True)
        for row in history:  # the curves of the epochs already done, as the killed run logged them
            log_epoch(live, row)
    stop, start = saved is not None and best.stops_after(len(history)), time.perf_counter()
    for scores in [] if stop else fit(model, train_set, val_set, params, autocast, saved and saved["fit"]):
        history.append(epoch_row(scores))
        log_epoch(live, history[-1])
        stop = best.update(scores.epoch, scores.val.loss, model)
        if state:
            save_state(state, {"fit": scores.state, "best": best.state_dict(), "history": history})
        # After the state is saved: a run killed once this line is out resumes after this epoch.
        print(epoch_line(scores, params.epochs, time.perf_counter() - start), flush=True)
        start = time.perf_counter()
        if stop:
            break
    model.load_state_dict(best.weights)
    if stop:
        reason = f"validation loss not lower for {params.early_stopping} epochs (train.early_stopping)"
    else:
        reason = f"all {params.epochs} epochs done (train.epochs)"
    return Stopped(epoch=len(history), best_epoch=best.epoch, reason=reason)


def epoch_row(scores: EpochScores) -> dict[str, float]:
    """One DVCLive step's metrics: train and validation loss and accuracy."""
    row = {}
    for split, split_scores in (("train", scores.train), ("val", scores.val)):
        row[f"{split}/loss"] = round(split_scores.loss, 6)
        row[f"{split}/accuracy"] = round(split_scores.accuracy, 6)
    return row


def log_epoch(live, row: dict[str, float]) -> None:
    for name, value in row.items():
        live.log_metric(name, value)
    live.next_step()


def epoch_line(scores: EpochScores, epochs: int, seconds: float) -> str:
    return (
        f"train: epoch {scores.epoch}/{epochs}: train loss {scores.train.loss:.4f} "
        f"accuracy {scores.train.accuracy:.4f}, val loss {scores.val.loss:.4f} "
        f"accuracy {scores.val.accuracy:.4f}, {seconds:.1f} s"
    )


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
