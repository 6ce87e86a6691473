"""The training loop, on whole tensors: no DataLoader, no per-sample transforms.

The dataset lives on the device as uint8; a batch is an index gather from a seeded permutation, normalised
by the model's own `normalise` one batch ahead, and its network takes the step. Nothing the size of the
dataset is allocated per epoch except the permutation itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from stages.core.contract import Stopped
from stages.core.distributed import SINGLE, World, all_reduce_sum, data_parallel, shard
from stages.core.errors import SettingError
from stages.core.metrics import Scores, predict, score
from stages.core.model import Normalised
from stages.core.pinning import pinned_cpu
from stages.core.runtime import autocast_for
from stages.core.splits import Split


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """What the training loop reads, and nothing else."""

    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    lr_schedule: Literal["constant", "cosine"]  # per step; cosine decays lr to 0 by the last step
    momentum: float  # sgd only
    weight_decay: float
    batch_size: int
    epochs: int
    early_stopping: int  # patience: stop when validation loss has not improved for this many epochs; 0 = off
    seed: int  # shuffling
    precision: Literal["fp32", "bf16", "fp16"]  # bf16/fp16 autocast on CUDA only
    # Stop after this epoch, the schedule still spanning `epochs` (0: train them all): a run cut short where
    # a search pruned it, whose first epochs are those of the whole run.
    stop_after: int = 0


class TrainConfig(BaseModel):
    """Everything a training run is given, built once (nanoGPT's GPTConfig); the card keeps its `recipe`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str  # logreg | mlp | cnn, or a network of the user's: FILE.py:NAME or MODULE:NAME
    model_args: dict[str, Any] = {}  # the keyword arguments of a network of the user's (pydantic copies it)
    hidden: tuple[int, ...]  # hidden layer widths of the mlp, and of the cnn after its convolutions
    channels: tuple[int, ...]  # the cnn's convolution widths (3x3 conv, batch norm, ReLU, 2x2 max-pool each)
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    lr_schedule: Literal["constant", "cosine"]
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    early_stopping: int
    stop_after: int  # 0, or the last epoch trained of the `epochs`-epoch schedule
    seed: int  # initial weights and shuffling
    # CPU threads for the matrix products, per process; auto = this process's share of its cores. A speed
    # knob only: the bytes do not depend on it, so the recipe leaves it out.
    threads: int | Literal["auto"]
    processes: int  # processes training together, each on its part of every batch (torch.distributed)
    device: str  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"]
    tf32: bool  # allow TF32 matmuls on Ampere+ GPUs (faster, not bit-identical to fp32)

    def fit_config(self) -> FitConfig:
        return FitConfig(**{field.name: getattr(self, field.name) for field in dataclasses.fields(FitConfig)})

    def recipe(self) -> dict[str, Any]:
        """What the weights depend on besides the architecture, for the card.

        `model_args`, `hidden`, `channels` and `device` are recorded elsewhere (the architecture, the device actually
        used), and `threads` not at all, so that a change that cannot change the weights leaves the model's
        bytes untouched; `processes` only when several trained, so that a one-process card keeps its bytes.
        """
        recorded_elsewhere = {
            "model",
            "model_args",
            "hidden",
            "channels",
            "device",
            "processes",
            "threads",
            "stop_after",
        }
        recipe = self.model_dump(exclude=recorded_elsewhere)
        if self.processes > 1:
            recipe["processes"] = self.processes
        if self.stop_after:
            recipe["stop_after"] = self.stop_after
        return recipe


@dataclasses.dataclass
class BestEpoch:
    """The weights of the epoch with the lowest validation loss, and whether `patience` epochs passed
    without a lower one (patience 0: never stop early)."""

    patience: int
    epoch: int = 0
    loss: float = math.inf
    weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def update(self, epoch: int, loss: float, model: nn.Module) -> bool:
        """Record epoch `epoch`'s validation loss; True when training should stop."""
        if loss < self.loss:  # a tie keeps the earlier epoch
            self.epoch, self.loss = epoch, loss
            self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return self.stops_after(epoch)

    def stops_after(self, epoch: int) -> bool:
        return self.patience > 0 and epoch - self.epoch >= self.patience


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What an interrupted run continues from, after its last finished epoch, to the bytes of an
    uninterrupted run. The tensors are the live ones: save them before the next epoch starts."""

    history: list[dict[str, float]]  # each finished epoch's metrics, by DVCLive name
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    shuffle: torch.Tensor  # the shuffle generator's state
    best: BestEpoch
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        """The last epoch finished."""
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, tensors and numbers: what torch.load(weights_only=True) reads back."""
        saved = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return saved | {"best": dict(vars(self.best))}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**saved | {"best": BestEpoch(**saved["best"])})


@dataclasses.dataclass(frozen=True)
class EpochLog:
    """What is logged of one epoch: its scores by DVCLive name, and how long it took."""

    epoch: int  # from 1
    metrics: dict[str, float]  # train/loss, train/accuracy, val/loss, val/accuracy
    seconds: float | None  # None: an epoch the resumed run had trained, logged again for the curves


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

    Decaying to 0 lets the last steps average out the minibatch noise. CosineAnnealingLR's recursive
    formula equals the closed form once rounded to float32, the weights' precision (tests/test_units.py).
    """
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ValueError(f"unknown lr schedule {name!r}")


def epoch_order(num_images: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The shuffled image order for one epoch, drawn on the CPU whatever the device, so that a GPU run visits
    the images in a CPU run's order (CUDA generators give other permutations)."""
    return torch.randperm(num_images, generator=generator).to(device, non_blocking=True)


def batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, batch_size: int, processes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to backpropagate for this process's part of a batch of `batch_size`, and the sum of its
    cross-entropies (for the epoch's mean).

    Several processes: DistributedDataParallel averages their gradients, so each part's summed
    cross-entropy is scaled by processes / batch_size, and the average is the gradient of the mean over the
    whole batch, however unevenly the last batch is split (a part may be empty).
    """
    if processes == 1:
        loss = F.cross_entropy(logits, targets)
        return loss, loss.detach().float() * len(targets)
    total = F.cross_entropy(logits, targets, reduction="sum")
    return total * (processes / batch_size), total.detach().float()


@dataclasses.dataclass
class Stepper:
    """What moves the weights, step by step: the optimizer, its learning-rate schedule, the fp16 loss scaler
    (CUDA only), and the generator that shuffles each epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    shuffle: torch.Generator

    @classmethod
    def build(cls, model: nn.Module, config: FitConfig, steps_per_epoch: int) -> Stepper:
        optimizer = make_optimizer(
            config.optimizer,
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        scheduler = make_schedule(config.lr_schedule, optimizer, config.epochs * steps_per_epoch)
        scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        return cls(optimizer, scheduler, scaler, torch.Generator().manual_seed(config.seed))

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` and take one optimizer and schedule step."""
        # optimizer.zero_grad(set_to_none=True) without its profiler record and dynamo guard, which cost
        # 30 times the loop itself: a fortieth of a logreg step.
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def state(self, history: list[dict[str, float]], model: nn.Module, best: BestEpoch) -> TrainState:
        return TrainState(
            history,
            model.state_dict(),
            self.optimizer.state_dict(),
            self.shuffle.get_state(),
            best,
            self.scheduler and self.scheduler.state_dict(),
            self.scaler and self.scaler.state_dict(),
        )

    def restore(self, state: TrainState, model: nn.Module) -> None:
        """Put the model, optimizer, schedule, scaler and shuffle where `state` left them."""
        model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.shuffle.set_state(state.shuffle)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None:
            self.scaler.load_state_dict(state.scaler)


@pinned_cpu()  # on the CPU, any network's products and convolutions: the same bytes on every machine
def fit(
    model: Normalised,
    train_set: Split,
    val_set: Split,
    config: FitConfig,
    world: World = SINGLE,
    *,
    resume: TrainState | None = None,
    report: Callable[[EpochLog], None] = lambda log: None,
    save: Callable[[TrainState], None] | None = None,
) -> Stopped:
    """Train `model` in place; leave in it the weights of the epoch with the lowest validation loss.

    Each epoch is `report`ed after its state is `save`d, so a run killed once an epoch is reported resumes
    after it; `resume`'s epochs are reported again (seconds None). In a `world` of several processes each
    trains its part of every batch through DistributedDataParallel and all see the same scores.
    Raises SettingError when training diverges, checked once per epoch: NaN weights never recover.
    """
    images = train_set[0]
    network = data_parallel(model.net, world)  # the network alone takes the steps; evaluate and save `model`
    stepper = Stepper.build(model, config, steps_per_epoch=-(-len(images) // config.batch_size))
    autocast = autocast_for(images.device, config.precision)
    best, history = BestEpoch(config.early_stopping), []
    if resume is not None:
        stepper.restore(resume, model)
        best, history = dataclasses.replace(resume.best, patience=config.early_stopping), list(resume.history)
    for epoch, metrics in enumerate(history, start=1):
        report(EpochLog(epoch, metrics, None))
    stop = best.stops_after(len(history))
    for epoch in range(len(history) + 1, (config.stop_after or config.epochs) + 1):
        if stop:
            break
        start = time.perf_counter()
        network.train()
        # The running loss and correct count stay on the device (an .item() per step would make the host
        # wait for every batch). Counted per step, not from the epoch's logits kept until its end: small
        # tensors kept among each step's large temporaries stop freed memory being reused (cnn: +300 MB).
        loss_sum = torch.zeros((), device=images.device)
        correct = torch.zeros((), dtype=torch.int64, device=images.device)
        batches = epoch_order(len(images), stepper.shuffle, images.device).split(config.batch_size)
        for batch, (inputs, targets) in zip(batches, gathered(train_set, batches, world, model.normalise), strict=True):
            with autocast:
                logits = network(inputs)
                loss, summed = batch_loss(logits, targets, len(batch), world.size)
            stepper.step(loss)
            loss_sum += summed
            correct += (logits.detach().argmax(1) == targets).sum()
        train = _mean_scores(loss_sum, correct, len(images), world)
        val = score(predict(model, val_set[0]), val_set[1])  # every process predicts all: the same scores
        if not (math.isfinite(train.loss) and math.isfinite(val.loss)):
            raise SettingError(f"training diverged in epoch {epoch} (loss {train.loss}, validation loss {val.loss})")
        history.append(_metrics(train, val))
        stop = best.update(epoch, val.loss, model)
        if save is not None:
            save(stepper.state(history, model, best))
        report(EpochLog(epoch, history[-1], time.perf_counter() - start))
    model.load_state_dict(best.weights)
    return Stopped(epoch=len(history), best_epoch=best.epoch, reason=why_stopped(config, len(history), stop))


def why_stopped(config: FitConfig, epochs_trained: int, early: bool) -> str:
    if early:
        return f"validation loss not lower for {config.early_stopping} epochs (early stopping)"
    if epochs_trained < config.epochs:
        return f"stopped after epoch {epochs_trained} of {config.epochs}, as asked (a pruned search trial)"
    return f"all {config.epochs} epochs done"


def gathered(
    split: Split, batches: tuple[torch.Tensor, ...], world: World, normalise: Callable[..., torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's part of each batch of `split`, its images normalised (float (B, 1, H, W)) and its labels,
    prepared one batch ahead on a helper thread: copying rows from all over the dataset waits on memory, and
    normalising is a pass over every pixel, which the step before overlaps.

    The pixels and the maps go into two buffers each, in turn (memory that the helper thread allocated afresh
    for each batch cost a page fault per 4 KiB), so a batch's maps are valid until the next batch is taken.
    """
    if not batches:
        return
    images, labels = split
    rows = len(shard(batches[0], world))  # the first batch is whole, and its first part the largest
    pixels = [images.new_empty((rows, *images.shape[1:])) for _ in range(2)]
    maps = [images.new_empty((rows, 1, *images.shape[1:]), dtype=torch.float32) for _ in range(2)]

    def gather(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        part, buffer = shard(batches[index], world), index % 2
        # index_select copies whole rows; images[part] takes the generic (and here 10x slower) index path.
        inputs = torch.index_select(images, 0, part, out=pixels[buffer][: len(part)])
        return normalise(inputs, out=maps[buffer][: len(part)]), labels.index_select(0, part)

    with ThreadPoolExecutor(1, thread_name_prefix="gather") as helper:
        ahead = helper.submit(gather, 0)
        for index in range(1, len(batches)):
            current, ahead = ahead, helper.submit(gather, index)
            yield current.result()
        yield ahead.result()


def _metrics(train: Scores, val: Scores) -> dict[str, float]:
    """An epoch's scores by their DVCLive names."""
    return {
        "train/loss": round(train.loss, 6),
        "train/accuracy": round(train.accuracy, 6),
        "val/loss": round(val.loss, 6),
        "val/accuracy": round(val.accuracy, 6),
    }


def _mean_scores(loss_sum: torch.Tensor, correct: torch.Tensor, count: int, world: World) -> Scores:
    """The epoch's mean loss and accuracy over all processes' parts (`count` images in all)."""
    if world.size > 1:
        loss_sum, correct = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), world).tolist()
        return Scores(loss_sum / count, correct / count)
    return Scores(loss_sum.item() / count, correct.item() / count)
