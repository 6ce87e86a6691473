"""Training and scoring on whole tensors: no DataLoader, no per-sample transforms.

The dataset lives on the device as uint8; a batch is an index gather from a seeded permutation, and the
model normalises it. Nothing the size of the dataset is allocated per epoch except the permutation itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from stages.core.contract import PREDICT_BATCH, Stopped
from stages.core.distributed import SINGLE, World, all_reduce_sum, data_parallel, shard
from stages.core.errors import SettingError

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, H, W), int64 labels (B,)
# This process's part of a batch (all of it in one process), and the size of the whole batch.
Part = tuple[torch.Tensor, torch.Tensor, int]


class TrainConfig(BaseModel):
    """Everything a training run is given, built once (nanoGPT's GPTConfig); the card keeps its `recipe`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: Literal["logreg", "mlp", "cnn"]
    hidden: tuple[int, ...]  # hidden layer widths of the mlp, and of the cnn after its convolutions
    channels: tuple[int, ...]  # the cnn's convolution widths (3x3 conv, batch norm, ReLU, 2x2 max-pool each)
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    lr_schedule: Literal["constant", "cosine"]  # per step; cosine decays lr to 0 by the last step
    momentum: float  # sgd only
    weight_decay: float
    batch_size: int
    epochs: int
    early_stopping: int  # patience: stop when validation loss has not improved for this many epochs; 0 = off
    seed: int  # initial weights and shuffling
    # CPU threads for the matrix products, per process; auto = this process's share of its cores. A speed
    # knob only: the bytes do not depend on it, so the recipe leaves it out.
    threads: int | Literal["auto"]
    processes: int  # processes training together, each on its part of every batch (torch.distributed)
    device: str  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"]  # bf16/fp16 autocast on CUDA only
    tf32: bool  # allow TF32 matmuls on Ampere+ GPUs (faster, not bit-identical to fp32)

    def recipe(self) -> dict[str, Any]:
        """What the weights depend on besides the architecture: the card records it, nanoGPT-style.

        `hidden` and `channels` live in the architecture (empty where the model has none) and `device` as
        the device actually used, so
        a change that cannot change the weights (hidden sizes of a logreg, auto -> cpu on a CPU machine, the
        thread count) leaves the model's bytes, and so the evaluation, untouched. `processes` is recorded only when
        several trained the model, so that a one-process card keeps the bytes it had before the key.
        """
        recipe = self.model_dump(exclude={"model", "hidden", "channels", "device", "processes", "threads"})
        if self.processes > 1:
            recipe["processes"] = self.processes
        return recipe


@dataclasses.dataclass(frozen=True)
class Scores:
    loss: float  # mean cross-entropy
    accuracy: float


@dataclasses.dataclass(frozen=True)
class EpochScores:
    epoch: int  # from 1
    train: Scores  # seen while training, as the weights moved
    val: Scores  # of the weights at the end of the epoch
    # What `fit(..., resume=state)` continues from: weights, optimiser, schedule, scaler, shuffle generator.
    # The tensors are the live ones (state_dict()s): save them before asking for the next epoch.
    state: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


class BestEpoch:
    """The weights of the epoch with the lowest validation loss, and whether `patience` epochs passed
    without a lower one (patience 0: never stop early)."""

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
        return self.stops_after(epoch)

    def stops_after(self, epoch: int) -> bool:
        return self.patience > 0 and epoch - self.epoch >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss": self.loss, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.loss, self.weights = state["epoch"], state["loss"], state["weights"]


def make_optimizer(name: str, parameters, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    # fused: one kernel for the whole update instead of a dozen per step (the model is small enough for
    # per-op overhead to dominate); same arithmetic, deterministic, on the CPU and CUDA alike.
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {name!r}")


def make_schedule(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning rate per step: `constant` (no scheduler), or `cosine` from lr down to 0 over `total_steps`.

    Decaying to 0 lets the last steps average out the minibatch noise instead of bouncing around the
    minimum: on Fashion-MNIST a logreg ends 2 epochs ~0.004 more accurate than at a constant rate.
    CosineAnnealingLR steps by a recursive formula, whose float64 lr differs from the closed form
    lr * (1 + cos(pi t / T)) / 2 in the last bit at most steps; rounded to float32, the weights' precision,
    every one is the closed form's (tests/test_units.py), and the weights trained with it were bit-identical
    to the closed form's in every config tried (the committed params, sgd, an adamw mlp, 1,100 steps).
    """
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ValueError(f"unknown lr schedule {name!r}")


def epoch_order(num_images: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The shuffled image order for one epoch.

    Drawn on the CPU from a CPU generator whatever the device, so that a GPU run visits the images in
    exactly the order a CPU run does (CUDA generators give other permutations), then copied over.
    """
    return torch.randperm(num_images, generator=generator).to(device, non_blocking=True)


def batches(
    images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int, world: World = SINGLE
) -> Iterator[Part]:
    """The images and labels in `order`, `batch_size` at a time (the last batch may be smaller): this
    process's part of each batch (`shard`), and the size of the whole batch."""
    for batch in order.split(batch_size):
        part = shard(batch, world)
        # index_select copies whole rows; images[batch] takes the generic (and here 10x slower) index path.
        yield images.index_select(0, part), labels.index_select(0, part), len(batch)


def batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, batch_size: int, processes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to backpropagate for this process's part of a batch of `batch_size`, and the sum of its
    cross-entropies (for the epoch's mean).

    One process: the batch's mean cross-entropy. Several: DistributedDataParallel averages their gradients,
    so each part's summed cross-entropy is scaled by processes / batch_size, and the average is the gradient
    of the mean over the whole batch, however unevenly the last batch is split (a part may be empty).
    """
    if processes == 1:
        loss = F.cross_entropy(logits, targets)
        return loss, loss.detach().float() * len(targets)
    total = F.cross_entropy(logits, targets, reduction="sum")
    return total * (processes / batch_size), total.detach().float()


def train_epoch(
    model: nn.Module,
    batches: Iterable[Part],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    world: World = SINGLE,
) -> Scores:
    """One pass over `batches`, one optimizer (and `scheduler`) step each; the mean loss and accuracy seen
    (by all processes of `world`)."""
    model.train()
    device = next(model.parameters()).device
    # Running sums stay on the device: a .item() per step would synchronise CUDA every batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for inputs, targets, batch_size in batches:
        with autocast or contextlib.nullcontext():
            logits = model(inputs)
            loss, summed = batch_loss(logits, targets, batch_size, world.size)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += summed
        correct += (logits.detach().argmax(1) == targets).sum()
        count += len(targets)
    if world.size > 1:
        counts = torch.tensor(float(count), dtype=torch.float64, device=device)
        totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), counts]), world)
        return Scores(totals[0].item() / totals[2].item(), totals[1].item() / totals[2].item())
    return Scores(loss_sum.item() / count, correct.item() / count)


def fit(
    model: nn.Module,
    train_set: Batch,
    val_set: Batch,
    config: TrainConfig,
    autocast: contextlib.AbstractContextManager | None = None,
    resume: dict[str, Any] | None = None,
    world: World = SINGLE,
) -> Iterator[EpochScores]:
    """Train `model` in place for `config.epochs` epochs, yielding the train and validation scores of each.

    With `resume` (an EpochScores.state saved earlier), the model, optimiser, schedule and shuffle continue
    from there, and the epochs after it are the ones an uninterrupted run would have trained, bit for bit.

    In a `world` of several processes, each runs this on its part of every batch through
    DistributedDataParallel; all of them get the same scores (sums over all parts), so they agree on when
    to stop.

    Raises SettingError when training diverges: checked once per epoch (a check per step would synchronise
    CUDA every batch), as NaN weights never recover and a model with NaN metrics must not pass for a result.
    """
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    images, labels = train_set
    steps_per_epoch = -(-len(images) // config.batch_size)  # the last batch may be smaller
    scheduler = make_schedule(config.lr_schedule, optimizer, config.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    shuffle = torch.Generator().manual_seed(config.seed)
    first = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(resume["scaler"])
        shuffle.set_state(resume["shuffle"])
        first = resume["epoch"] + 1
    network = data_parallel(model, world)  # `model` itself for one process
    for epoch in range(first, config.epochs + 1):
        order = epoch_order(len(images), shuffle, images.device)
        train_batches = batches(images, labels, order, config.batch_size, world)
        train = train_epoch(network, train_batches, optimizer, scheduler, autocast=autocast, scaler=scaler, world=world)
        val = score(predict(model, val_set[0]), val_set[1]) if world.size == 1 else shared_score(model, val_set, world)
        if not (math.isfinite(train.loss) and math.isfinite(val.loss)):
            raise SettingError(f"training diverged in epoch {epoch} (loss {train.loss}, validation loss {val.loss})")
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        state["shuffle"] = shuffle.get_state()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        yield EpochScores(epoch, train, val, state)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """Logits (N, classes) in float32 for all `images`, `batch_size` at a time."""
    model.eval()
    return torch.cat([model(batch).float() for batch in images.split(batch_size)])


def score(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return Scores(loss, accuracy)


def shared_score(model: nn.Module, dataset: Batch, world: World) -> Scores:
    """`score` of `model` on `dataset`, each process of `world` predicting its part: the same on all of them."""
    images, labels = dataset
    part = shard(torch.arange(len(images), device=images.device), world)
    logits = predict(model, images.index_select(0, part))
    correct = (logits.argmax(1) == labels.index_select(0, part)).sum().double()
    loss = F.cross_entropy(logits, labels.index_select(0, part), reduction="sum").double()
    loss, correct = all_reduce_sum(torch.stack([loss, correct]), world).tolist()
    return Scores(loss / len(images), correct / len(images))


@dataclasses.dataclass(frozen=True)
class EpochLog:
    """What is logged of one epoch: its scores by DVCLive name, and how long it took."""

    epoch: int  # from 1
    metrics: dict[str, float]  # train/loss, train/accuracy, val/loss, val/accuracy
    seconds: float | None  # None: an epoch the resumed run had trained, logged again for the curves


def epoch_metrics(scores: EpochScores) -> dict[str, float]:
    metrics = {}
    for split, split_scores in (("train", scores.train), ("val", scores.val)):
        metrics[f"{split}/loss"] = round(split_scores.loss, 6)
        metrics[f"{split}/accuracy"] = round(split_scores.accuracy, 6)
    return metrics


def train_best(
    model: nn.Module,
    train_set: Batch,
    val_set: Batch,
    config: TrainConfig,
    autocast: contextlib.AbstractContextManager | None,
    *,
    report: Callable[[EpochLog], None],
    resume: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    world: World = SINGLE,
) -> Stopped:
    """`fit`, each epoch reported and (with `save`) its state saved before the next one starts; leaves the
    weights of the epoch with the lowest validation loss in `model` and says how training ended.

    `resume` is a state `save` was given by an interrupted run of the same inputs: its epochs are reported
    again (seconds None) and training continues after them, to the bytes of an uninterrupted run. In a
    `world` of several processes every one trains (and must be given the same `resume`); the caller gives
    `report` and `save` to rank 0 alone.
    """
    best, history = BestEpoch(config.early_stopping), []
    if resume is not None:
        best.load_state_dict(resume["best"])
        history = resume["history"]
        for epoch, metrics in enumerate(history, start=1):
            report(EpochLog(epoch, metrics, None))
    stop = best.stops_after(len(history))
    start = time.perf_counter()
    trained = [] if stop else fit(model, train_set, val_set, config, autocast, resume and resume["fit"], world)
    for scores in trained:
        history.append(epoch_metrics(scores))
        stop = best.update(scores.epoch, scores.val.loss, model)
        if save is not None:
            save({"fit": scores.state, "best": best.state_dict(), "history": history})
        # Reported after the state is saved: a run killed once an epoch is reported resumes after it.
        report(EpochLog(scores.epoch, history[-1], time.perf_counter() - start))
        start = time.perf_counter()
        if stop:
            break
    model.load_state_dict(best.weights)
    if stop:
        reason = f"validation loss not lower for {config.early_stopping} epochs (early stopping)"
    else:
        reason = f"all {config.epochs} epochs done"
    return Stopped(epoch=len(history), best_epoch=best.epoch, reason=reason)
