"""Stage `train`: fit the model named by `train.model` on the train split; write `models/`.

Writes the weights (safetensors), a model card (architecture, classes, normalisation, the recipe and the
device used) and the training curves and summary (in DVCLive's layout), all into one folder that appears
only when training has finished.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from stages.cli import argument_parser, explained, memory_set_by, numerics_in_effect, run, warn, when_interrupted
from stages.core.artifacts import atomic_directory, copy_folder, named_as, remove_stale_temporaries_below
from stages.core.contract import BUILT_IN, Architecture
from stages.core.curves import write_curves
from stages.core.distributed import SINGLE, World, from_rank_zero, joined
from stages.core.export import save_with_onnx
from stages.core.files import ONNX, TRAINING_LOG
from stages.core.model import Card, architecture_for, init_model
from stages.core.resume import Checkpoint, input_key
from stages.core.runtime import make_deterministic, set_cpu_threads
from stages.core.splits import Meta, load_split, read_meta
from stages.core.training import EpochLog, TrainConfig, TrainState, fit
from stages.launcher import (
    Nodes,
    device_here,
    fits_in_memory,
    guard_worker,
    launch,
    nodes_of,
    record_failure,
    threads_here,
    world_of,
)
from stages.params import Params, check_device, load_section, require


class TrainParams(Params, TrainConfig):
    """`train`: the model, the optimiser and where it runs (the keys: TrainConfig)."""

    def check(self) -> None:
        require(
            self.model in BUILT_IN or ":" in self.model,
            "train.model",
            f"got {self.model!r}; allowed: {', '.join(BUILT_IN)}, or your own network: FILE.py:NAME or MODULE:NAME",
        )
        require(self.lr > 0, "train.lr", "must be > 0")
        require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
        require(self.early_stopping >= 0, "train.early_stopping", "must be >= 0 (0 = off)")
        epochs = f"must be 0 (all epochs) to {self.epochs} (train.epochs)"
        require(0 <= self.stop_after <= self.epochs, "train.stop_after", epochs)
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
    world, nodes = world_of(params.processes), nodes_of(args.nodes, args.node_rank, args.rendezvous, params.processes)
    device = device_here(params.device, params.precision, params.processes, world, nodes)
    threads = threads_here(params.threads, params.processes, world, nodes)
    if world is None and params.processes > 1:
        launch_processes(params, args, nodes)  # each runs this main() with its own world
        return
    world = world or SINGLE  # decided here, once: the loop below only wraps the model and shards each batch
    if world.size > 1:
        guard_worker()
    make_deterministic(params.tf32)
    set_cpu_threads(threads)
    numerics, config = numerics_in_effect(), params.fit_config()
    meta = read_meta(args.data)
    train_set, val_set = load_split(args.data, "train", device), load_split(args.data, "val", device)
    architecture, model = new_model(params, meta, device)
    checkpoint, resume = open_checkpoint(args.resume, params, architecture, args.data, world)
    with (
        joined(world, device, args.peer_timeout),
        explained("train.lr", fix=f"lower train.lr (now {params.lr}); nothing was written"),
        memory_set_by("train.batch_size"),
    ):
        resume = from_rank_zero(resume, world)  # every process continues from the state rank 0 found
        if world.rank > 0:  # trains its part of each batch; rank 0 reports, saves the state, writes the model
            fit(model, train_set, val_set, config, world, resume=resume)
            return
        used = str(device) if world.size == 1 else device.type  # several processes: one GPU each
        recorded = {"device": used, "numerics": numerics, "recipe": params.recipe()}
        card = Card(architecture=architecture, classes=meta.classes, dataset=meta.dataset, frame=meta.frame, **recorded)
        with atomic_directory(args.out) as folder:
            with epoch_log(folder / TRAINING_LOG, args.live, params.epochs, used) as report:
                save = checkpoint.save if checkpoint else None
                stopped = fit(model, train_set, val_set, config, world, resume=resume, report=report, save=save)
            write_model(folder, args.out, model, card.model_copy(update={"stopped": stopped}))
    if checkpoint:
        checkpoint.remove()


def launch_processes(params: TrainParams, args: argparse.Namespace, nodes: Nodes) -> None:
    """This machine's share of train.processes, once they fit in its memory (one line, before any starts).
    Rank 0, started here on node 0, saves the state after each epoch: an interruption says where it left it."""
    meta = read_meta(args.data)
    fits_in_memory(params.processes // nodes.count, meta)
    if args.resume and nodes.rank == 0:
        checkpoint = checkpoint_of(args.resume, params, architecture_of(params, meta), args.data)
        when_interrupted(checkpoint.next_run_as_saved)
    launch(params.processes, ["-m", "stages.train", *sys.argv[1:]], nodes, args.peer_timeout)


def checkpoint_of(folder: Path, params: TrainParams, architecture: Architecture, data: Path) -> Checkpoint:
    """The state folder of a run of these exact inputs, under `folder`."""
    # Where to stop does not change the epochs before it: a run cut short continues the whole run's state.
    inputs = params.model_dump(mode="json", exclude={"stop_after"}) | {
        "architecture": architecture.model_dump(mode="json")
    }
    return Checkpoint(folder / input_key(inputs, data))


def write_model(folder: Path, out: Path, model: torch.nn.Module, card: Card) -> None:
    """The weights, the network as ONNX and the card into `folder` (`out` once switched in); a warning when ONNX
    cannot express the network."""
    unexported = save_with_onnx(folder, model, card)
    if unexported:
        warn(f"{out / ONNX} not written: {unexported}; the weights and the card are: evaluate runs them, predict not")


def new_model(params: TrainParams, meta: Meta, device: torch.device) -> tuple[Architecture, torch.nn.Module]:
    """The network `train.model` names, with its seeded initial weights; a network of the user's that cannot
    be imported, built, or run on the images is refused in one line naming the key."""
    architecture = architecture_of(params, meta)
    with explained("train.model"):
        return architecture, init_model(architecture, params.seed, device)


def architecture_of(params: TrainParams, meta: Meta) -> Architecture:
    """What `train.model` names; a network of the user's that cannot be imported is refused in one line."""
    with explained("train.model"):
        return architecture_for(params.model, params.hidden, meta, params.channels, params.model_args)


@contextlib.contextmanager
def epoch_log(folder: Path, live_folder: Path | None, epochs: int, device: str) -> Iterator[Callable[[EpochLog], None]]:
    """The curves and summary in `folder` (DVCLive's files), rewritten as each epoch ends, and a line on the
    terminal for each epoch trained now (not one replayed on resume).

    With `live_folder` (--live), the curves go there, where they are readable while training runs, in a
    folder DVC never deletes (not an output, so train's run-cache stays on), and are copied at the end.
    """
    history: list[dict[str, float]] = []
    if live_folder:  # a killed run's half-written curves there would be copied into the model's folder
        remove_stale_temporaries_below(live_folder)

    def report(log: EpochLog) -> None:
        history.append(log.metrics)
        write_curves(live_folder or folder, history)
        if log.seconds is not None:
            m = log.metrics
            print(
                f"train: epoch {log.epoch}/{epochs}: train loss {m['train/loss']:.4f} accuracy "
                f"{m['train/accuracy']:.4f}, val loss {m['val/loss']:.4f} accuracy {m['val/accuracy']:.4f}, "
                f"{log.seconds:.1f} s",
                flush=True,
            )

    with named_as(live_folder or folder):
        yield report
        write_curves(live_folder or folder, history, {"device": device})
    if live_folder:
        copy_folder(live_folder, folder)


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
    # Where the processes run is a deployment, not the recipe: the card and the bytes are train.processes'.
    nodes = parser.add_argument_group("several machines (nodes): train.processes counts all their processes")
    nodes.add_argument("--nodes", type=int, default=1, help="machines that train together (default: 1, this one)")
    nodes.add_argument("--node-rank", type=int, default=0, help="this machine's number, 0 .. nodes - 1 (default: 0)")
    nodes.add_argument("--rendezvous", metavar="HOST:PORT", help="node 0's address and a free port there")
    return parser.parse_args()


def open_checkpoint(
    folder: Path | None, params: TrainParams, architecture: Architecture, data: Path, world: World
) -> tuple[Checkpoint | None, TrainState | None]:
    """The state folder of this run's exact inputs (none without --resume; a network of the user's by its
    source too), and what an interrupted run of the same inputs saved there. Rank 0's alone: it saves the
    state, and sends it to the other processes, which may run on machines that have no such folder."""
    if folder is None or world.rank > 0:
        return None, None
    checkpoint = checkpoint_of(folder, params, architecture, data)
    when_interrupted(checkpoint.next_run)
    resume = checkpoint.load()
    if resume and resume.epoch > (params.stop_after or params.epochs):
        resume = None  # saved past where this run stops: start over
    if resume:
        print(
            f"train: resuming after epoch {resume.epoch} of {params.epochs} (state in {checkpoint.folder})", flush=True
        )
    return checkpoint, resume


if __name__ == "__main__":
    run(main, record=record_failure)
