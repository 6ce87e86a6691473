"""Stage `train`: fit the model named by `train.model` on the train split; write `models/`.

Writes the weights (safetensors), a model card (architecture, classes, normalisation, the recipe and the
device used) and the training curves and summary through DVCLive, all into one folder that appears
only when training has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from stages.cli import StageError, argument_parser, explained, numerics_in_effect, run, warn
from stages.core.artifacts import atomic_directory
from stages.core.contract import Stopped
from stages.core.distributed import (
    SINGLE,
    World,
    from_rank_zero,
    guard_worker,
    joined,
    launch,
    process_device,
    world_from_environment,
)
from stages.core.files import TRAINING_LOG
from stages.core.model import Card, architecture_for, init_model, save_model
from stages.core.resume import Checkpoint, input_key
from stages.core.runtime import (
    autocast_for,
    available_cores,
    make_deterministic,
    resolve_device,
    resolve_threads,
    set_cpu_threads,
)
from stages.core.splits import load_split, read_meta
from stages.core.training import EpochLog, TrainConfig, train_best
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
        require(self.threads == "auto" or self.threads >= 1, "train.threads", "must be auto or >= 1")
        require(self.processes >= 1, "train.processes", "must be >= 1 (1 = this process alone)")
        require(all(width >= 1 for width in self.hidden), "train.hidden", "widths must be >= 1")
        require(self.model != "mlp" or len(self.hidden) >= 1, "train.hidden", "the mlp needs at least one width")
        check_device("train.device", self.device)


def main() -> None:
    args = arguments()
    params = load_section(args.params, "train", TrainParams)
    world = world_of(params)
    device, autocast = place(params, world)
    local_processes = world.local_size if world else params.processes
    threads = resolve_threads(params.threads, local_processes)
    if world is None or world.local_rank == 0:
        warn_if_oversubscribed(threads, local_processes)
    if world is None and params.processes > 1:
        read_meta(args.data)  # a missing input is one line from here, before any process starts
        launch(params.processes, ["-m", "stages.train", *sys.argv[1:]])
        return
    world = world or SINGLE
    if world.size > 1:
        guard_worker()
    make_deterministic(params.tf32)
    set_cpu_threads(threads)
    numerics = numerics_in_effect()

    meta = read_meta(args.data)
    train_set, val_set = load_split(args.data, "train", device), load_split(args.data, "val", device)
    architecture = architecture_for(params.model, params.hidden, meta, params.channels)
    model = init_model(architecture, params.seed, device)
    checkpoint, resume = open_checkpoint(args.resume, params, args.data, world)
    diverged = f"lower train.lr (now {params.lr}); nothing was written"
    with joined(world, device, args.peer_timeout), explained("train.lr", fix=diverged):
        resume = from_rank_zero(resume, world)  # every process continues from the state rank 0 found
        train = functools.partial(train_best, model, train_set, val_set, params, autocast, resume=resume, world=world)
        if world.rank > 0:  # trains its part of each batch; rank 0 reports, saves the state, writes the model
            train(report=lambda log: None)
            return
        used = str(device) if world.size == 1 else device.type  # several processes: one GPU each
        recorded = {"device": used, "numerics": numerics, "recipe": params.recipe()}
        card = Card(architecture=architecture, classes=meta.classes, dataset=meta.dataset, frame=meta.frame, **recorded)
        write_model(args.out, args.live, model, card, train, checkpoint.save if checkpoint else None)
    if checkpoint:
        checkpoint.remove()


def write_model(
    out: Path,
    live_folder: Path | None,
    model: torch.nn.Module,
    card: Card,
    train: Callable[..., Stopped],
    save: Callable[[dict], None] | None,
) -> None:
    """Train (`train`: train_best with its model and data), logging each epoch and (with `save`) saving the
    state after it, then write the model of the best epoch and its `card` into `out`, all at once."""
    from dvclive import Live  # imported here: it is the slowest import of the stage

    with atomic_directory(out) as folder:
        # --live: curves readable as each epoch ends, in a folder DVC never deletes (no output: train's
        # run-cache stays on); copied into the model folder at the end.
        with Live(str(live_folder or folder / TRAINING_LOG), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            stopped = train(report=functools.partial(report_epoch, live, card.recipe["epochs"]), save=save)
            live.summary["device"] = card.device
        if live_folder:
            shutil.copytree(live_folder, folder / TRAINING_LOG)
        save_model(folder, model, card.model_copy(update={"stopped": stopped}))


def arguments() -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by the preprocess stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and its training log")
    parser.add_argument("--live", type=Path, help="DVCLive folder, readable while training runs (default: none)")
    parser.add_argument("--resume", type=Path, help="folder for the state after each epoch (default: not saved)")
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=300.0,
        help="with train.processes > 1: seconds a process waits for the others, to meet and at each exchange, "
        "before the run fails (default: 300)",
    )
    return parser.parse_args()


def world_of(params: TrainParams) -> World | None:
    """This process's place among the training processes (None: not started by torchrun or the launcher)."""
    world = world_from_environment()
    if world is not None and world.size != params.processes:
        raise StageError(
            f"train.processes: {params.processes}, but {world.size} processes were started (WORLD_SIZE); set "
            f"train.processes: {world.size}, the processes on all machines together"
        )
    return world


def place(params: TrainParams, world: World | None) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """This process's device (one GPU each when several processes train on CUDA) and its autocast."""
    with explained("train.device"):
        device = resolve_device(params.device)
    with explained("train.processes", fix="lower train.processes, or change train.device"):
        device = process_device(device, params.processes, world)
    with explained("train.precision"):
        autocast = autocast_for(device, params.precision)
    return device, autocast


def open_checkpoint(
    folder: Path | None, params: TrainParams, data: Path, world: World
) -> tuple[Checkpoint | None, dict | None]:
    """The state folder of this run's exact inputs (none without --resume), and what an interrupted run of
    the same inputs saved there. Rank 0's alone: it saves the state, and sends it to the other processes,
    which may run on machines that have no such folder."""
    if folder is None or world.rank > 0:
        return None, None
    checkpoint = Checkpoint(folder / input_key(params.model_dump(mode="json"), data))
    resume = checkpoint.load()
    if resume:
        done = len(resume["history"])
        print(f"train: resuming after epoch {done} of {params.epochs} (state in {checkpoint.folder})", flush=True)
    return checkpoint, resume


def report_epoch(live, epochs: int, log: EpochLog) -> None:
    """One DVCLive step, and one line on the terminal for an epoch trained now (not one replayed on resume)."""
    for name, value in log.metrics.items():
        live.log_metric(name, value)
    live.next_step()
    if log.seconds is not None:
        m = log.metrics
        print(
            f"train: epoch {log.epoch}/{epochs}: train loss {m['train/loss']:.4f} accuracy {m['train/accuracy']:.4f}, "
            f"val loss {m['val/loss']:.4f} accuracy {m['val/accuracy']:.4f}, {log.seconds:.1f} s",
            flush=True,
        )


def warn_if_oversubscribed(threads: int, processes: int = 1) -> None:
    """More threads than cores (`threads` in each of `processes` processes on this machine) only makes them
    wait for each other; say so, but run as asked."""
    cores = available_cores()
    if processes == 1 and threads > cores:
        warn(
            f"train.threads: {threads} threads on {cores} CPU cores here; each thread "
            f"beyond {cores} waits for the others (set train.threads: {cores} or fewer)"
        )
    elif threads * processes > cores:
        fix = f"train.threads: {cores // processes} or fewer" if cores >= processes else f"train.processes: {cores}"
        warn(
            f"train.threads: {processes} processes x {threads} threads on {cores} CPU cores here; each thread "
            f"beyond {cores} waits for the others (set {fix})"
        )


if __name__ == "__main__":
    run(main)
