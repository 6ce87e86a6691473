"""Data-parallel training on several processes, inside each of them: torch.distributed's collectives.

Every process (a "rank") holds the whole model and the whole dataset, draws each epoch's order from the
same seeded generator, and takes its contiguous part of every global batch (`shard`).
DistributedDataParallel averages the ranks' gradients, and the training loop scales each part's loss so
that this average is the gradient of the mean over the whole batch, as one process computes it. So N
processes take the steps one process takes, up to the order of the float sums. Rank 0 alone writes.

Starting the processes, and watching them, is stages/launcher.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stages.core.errors import CoreError

# How the line of a process that another one's end stopped begins: a consequence, which the launcher shows only
# when no process recorded a cause; under torchrun, on the other nodes, it is their line.
PEER_STOPPED = "another training process stopped"


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands among the processes that train one model."""

    rank: int = 0  # 0 .. size - 1; rank 0 writes
    size: int = 1
    local_rank: int = 0  # among the processes on this machine: picks its GPU
    local_size: int = 1  # processes on this machine


SINGLE = World()


class ProcessesFailed(CoreError):
    """A training process failed, or the processes did not all meet; the message is one line."""


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of a global batch: contiguous, the parts' sizes differing by at most one (a last
    batch smaller than the number of ranks leaves some of them none)."""
    return indices.tensor_split(world.size)[world.rank] if world.size > 1 else indices


@contextlib.contextmanager
def joined(world: World, device: torch.device, timeout_s: float) -> Iterator[None]:
    """Join the process group of `world` (gloo on the CPU, NCCL on CUDA) for the block; nothing for one process.

    `timeout_s` bounds the wait for the others, to join and at each exchange afterwards, so that a process
    that never comes or hangs ends the run instead of holding the others forever. A peer lost inside the
    block (its connection closed, or silent for `timeout_s`) is ProcessesFailed too: one line, not a trace.
    """
    if world.size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, TimeoutError, ValueError) as error:  # DistStoreError, DistNetworkError: RuntimeErrors
        raise ProcessesFailed(
            f"the {world.size} training processes did not all meet within {timeout_s:g} s ({first_line(error)}); "
            "every one must be started, with the same rendezvous endpoint"
        ) from None
    try:
        yield
    except RuntimeError as error:
        if not _lost_peer(error):
            raise
        raise ProcessesFailed(
            f"{PEER_STOPPED} ({first_line(error)}); no model was written: see that process's own output "
            "(its node's), then rerun every process"
        ) from None
    finally:
        dist.destroy_process_group()


def _lost_peer(error: RuntimeError) -> bool:
    """Whether `error` is the process group's: NCCL's and c10d's errors are DistErrors; gloo's, raised through
    DDP's hooks in backward, are plain RuntimeErrors whose message begins with the place in gloo's sources
    (`[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer ...`)."""
    return isinstance(error, dist.DistError) or re.match(r"\[[^\]]*/gloo/[^\]]*\] ", str(error)) is not None


def first_line(error: Exception) -> str:
    """The first line of `error`'s message, without the `[file.cpp:123] ` that gloo's and c10d's begin with."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0]).split(". ")[0]  # gloo adds advice: "GLHF!"


def from_rank_zero(value: Any, world: World) -> Any:
    """`value` as rank 0 has it, on every rank (pickled through the process group); `value` for one process."""
    if world.size == 1:
        return value
    box = [value if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) that gradients flow through: the gradient of a sum every rank sees is the sum of
    the gradients every rank sends back."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `tensor` over the ranks (the same bits on each), differentiable; `tensor` for one process."""
    return _AllReduceSum.apply(tensor) if world.size > 1 else tensor


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the global batch, for CPU processes (torch's SyncBatchNorm runs on GPUs only); its
    2-D and 3-D forms below differ only in the inputs they accept.

    In training, each rank sums its part per channel (dimension 1 of (N, C, ...) inputs); the sums
    over all ranks give the global batch's mean and (biased) variance, which normalise, and whose unbiased
    variance moves the running statistics, as batch norm does on the whole batch in one process.
    Evaluation uses the running statistics, as batch norm does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        world = World(dist.get_rank(), dist.get_world_size())
        dims = [0, *range(2, x.dim())]  # all but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # a per-channel vector, broadcast over the input
        count = x.new_tensor([x.numel() // x.shape[1]])
        totals = all_reduce_sum(torch.cat([x.sum(dims), count]), world)  # (C + 1,): sums, then the count
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims), world) / n  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: the cumulative average, as batch norm keeps it then
                factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * n / (n - 1), factor)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return centred * scale.view(shape) + self.bias.view(shape)


class GlobalBatchNorm2d(GlobalBatchNorm):
    def _check_input_dim(self, x: torch.Tensor) -> None:
        nn.BatchNorm2d._check_input_dim(self, x)


class GlobalBatchNorm3d(GlobalBatchNorm):
    def _check_input_dim(self, x: torch.Tensor) -> None:
        nn.BatchNorm3d._check_input_dim(self, x)


# Each batch norm of torch's and its global-batch form on CPU processes.
GLOBAL_BATCH_NORM = {
    nn.BatchNorm1d: GlobalBatchNorm,
    nn.BatchNorm2d: GlobalBatchNorm2d,
    nn.BatchNorm3d: GlobalBatchNorm3d,
}


def synchronised_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every batch norm computing its statistics over the global batch: torch's SyncBatchNorm on
    GPUs, GlobalBatchNorm on CPUs. The parameters and buffers are the same tensors, so the state_dict (and
    the saved model, whose card rebuilds plain batch norms) is unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) in GLOBAL_BATCH_NORM:
            replacement = GLOBAL_BATCH_NORM[type(child)](child.num_features, child.eps, child.momentum)
            replacement.weight, replacement.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(replacement, buffer, getattr(child, buffer))
            replacement.train(child.training)
            setattr(model, name, replacement)
        else:
            synchronised_batch_norm(child, device)
    return model


def data_parallel(model: nn.Module, world: World) -> nn.Module:
    """`model` wrapped in DistributedDataParallel for `world` (batch norm synchronised); `model` for one process.

    The wrapper shares the model's parameters: train through it, evaluate and save `model` itself.
    """
    if world.size == 1:
        return model
    device = next(model.parameters()).device
    synchronised_batch_norm(model, device)
    # No buffer broadcast before each step: the ranks' buffers are equal already (the normalisation constants,
    # and running statistics computed from the same global sums). torch 2.14 renamed the switch
    # forward_sync_buffers (broadcast_buffers still works there, with a deprecation warning in every process).
    device_ids = [device] if device.type == "cuda" else None
    try:
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    except TypeError:  # torch < 2.14
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
