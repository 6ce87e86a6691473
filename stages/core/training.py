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
from stages.core.errors import SettingError

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, H, W), int64 labels (B,)


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
    threads: int  # CPU threads for torch's ops; part of the recipe, as the float sums depend on it
    device: str  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"]  # bf16/fp16 autocast on CUDA only
    tf32: bool  # allow TF32 matmuls on Ampere+ GPUs (faster, not bit-identical to fp32)

    def recipe(self) -> dict[str, Any]:
        """What the weights depend on besides the architecture: the card records it, nanoGPT-style.

        `hidden` and `channels` live in the architecture (empty where the model has none) and `device` as
        the device actually used, so
        a change that cannot change the weights (hidden sizes of a logreg, auto -> cpu on a CPU machine)
        leaves the model's bytes, and so the evaluation, untouched.
        """
        return self.model_dump(exclude={"model", "hidden", "channels", "device"})


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


def batches(images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
    """The images and labels in `order`, `batch_size` at a time (the last batch may be smaller)."""
    for batch in order.split(batch_size):
        # index_select copies whole rows; images[batch] takes the generic (and here 10x slower) index path.
        yield images.index_select(0, batch), labels.index_select(0, batch)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Scores:
    """One pass over `batches`, one optimizer (and `scheduler`) step each; the mean loss and accuracy seen."""
    model.train()
    device = next(model.parameters()).device
    # Running sums stay on the device: a .item() per step would synchronise CUDA every batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for inputs, targets in batches:
        with autocast or contextlib.nullcontext():
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
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
        loss_sum += loss.detach().float() * len(targets)
        correct += (logits.detach().argmax(1) == targets).sum()
        count += len(targets)
    return Scores(loss_sum.item() / count, correct.item() / count)


def fit(
    model: nn.Module,
    train_set: Batch,
    val_set: Batch,
    config: TrainConfig,
    autocast: contextlib.AbstractContextManager | None = None,
    resume: dict[str, Any] | None = None,
) -> Iterator[EpochScores]:
    """Train `model` in place for `config.epochs` epochs, yielding the train and validation scores of each.

    With `resume` (an EpochScores.state saved earlier), the model, optimiser, schedule and shuffle continue
    from there, and the epochs after it are the ones an uninterrupted run would have trained, bit for bit.

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
    for epoch in range(first, config.epochs + 1):
        order = epoch_order(len(images), shuffle, images.device)
        train_batches = batches(images, labels, order, config.batch_size)
        train = train_epoch(model, train_batches, optimizer, scheduler, autocast=autocast, scaler=scaler)
        val = score(predict(model, val_set[0]), val_set[1])
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
) -> Stopped:
    """`fit`, each epoch reported and (with `save`) its state saved before the next one starts; leaves the
    weights of the epoch with the lowest validation loss in `model` and says how training ended.

    `resume` is a state `save` was given by an interrupted run of the same inputs: its epochs are reported
    again (seconds None) and training continues after them, to the bytes of an uninterrupted run.
    """
    best, history = BestEpoch(config.early_stopping), []
    if resume is not None:
        best.load_state_dict(resume["best"])
        history = resume["history"]
        for epoch, metrics in enumerate(history, start=1):
            report(EpochLog(epoch, metrics, None))
    stop = best.stops_after(len(history))
    start = time.perf_counter()
    for scores in [] if stop else fit(model, train_set, val_set, config, autocast, resume and resume["fit"]):
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
