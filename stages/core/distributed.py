"""Data-parallel training on several processes: torch.distributed, started through torchrun's own machinery.

Every process (a "rank") holds the whole model and the whole dataset, draws each epoch's order from the
same seeded generator, and takes its contiguous part of every global batch (`shard`).
DistributedDataParallel averages the ranks' gradients, and the training loop scales each part's loss so
that this average is the gradient of the mean over the whole batch, as one process computes it. So N
processes take the steps one process takes, up to the order of the float sums. Rank 0 alone writes.

The processes are started either by `launch` (torch's elastic agent, what torchrun runs: on this machine,
or as one of several nodes), or by the user's own torchrun; either way each finds its place in the
environment torchrun sets (`world_from_environment`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stages.core.artifacts import scratch_folder
from stages.core.errors import CoreError, SettingError

ADDRESS = "127.0.0.1"  # where `launch`'s processes meet: this machine only
LOGS = "train-processes"  # the name of `launch`'s temporary folder
# The elastic agent's loggers: their lines (a process closing, a failure, with a traceback) would follow
# the stage's own one-line error.
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
# How the line of a process that another one's end stopped begins: a consequence, which `launch` shows only
# when no process recorded a cause (`_first_failure`); under torchrun, on the other nodes, it is their line.
PEER_STOPPED = "another training process stopped"


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands among the processes that train one model."""

    rank: int = 0  # 0 .. size - 1; rank 0 writes
    size: int = 1
    local_rank: int = 0  # among the processes on this machine: picks its GPU
    local_size: int = 1  # processes on this machine


SINGLE = World()


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The machines (nodes) that train one model together, and which of them this one is: a deployment,
    never part of the recipe."""

    count: int = 1
    rank: int = 0  # node 0 holds the rendezvous, and the process of rank 0 (which writes)
    rendezvous: str = ""  # HOST:PORT of node 0, where the nodes meet; empty for one node


ONE_NODE = Nodes()


class ProcessesFailed(CoreError):
    """A training process failed, or the processes did not all meet; the message is one line."""


def world_from_environment() -> World | None:
    """This process's place as torchrun (or `launch`) set it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE);
    None for a process that was not started by one."""
    if "WORLD_SIZE" not in os.environ:
        return None
    size = int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", 0)), local_size)


def process_device(device: torch.device, processes: int, world: World | None, nodes: int = 1) -> torch.device:
    """The device of this process: `device` for one process, one GPU per process (cuda:LOCAL_RANK) for several.

    Checked in the process that launches the others too (world None; its machine runs `processes` / `nodes`
    of them), so that a machine with too few GPUs is refused before anything starts.
    """
    if processes == 1:
        return device
    if device.type not in ("cpu", "cuda"):
        raise SettingError(f"{processes} processes cannot share {device.type}; use cpu or cuda")
    if device.type == "cpu":
        return device
    if device.index is not None:
        raise SettingError(f"{device} is one GPU, and {processes} processes take one each; use cuda")
    local = world.local_size if world else processes // nodes
    count = torch.cuda.device_count()
    if local > count:
        raise SettingError(f"{local} processes here need {local} GPUs, this machine has {count}")
    return torch.device("cuda", world.local_rank if world else 0)


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
            f"the {world.size} training processes did not all meet within {timeout_s:g} s ({_first_line(error)}); "
            "every one must be started, with the same rendezvous endpoint"
        ) from None
    try:
        yield
    except RuntimeError as error:
        if not _lost_peer(error):
            raise
        raise ProcessesFailed(
            f"{PEER_STOPPED} ({_first_line(error)}); no model was written: see that process's own output "
            "(its node's), then rerun every process"
        ) from None
    finally:
        dist.destroy_process_group()


def _lost_peer(error: RuntimeError) -> bool:
    """Whether `error` is the process group's: NCCL's and c10d's errors are DistErrors; gloo's, raised through
    DDP's hooks in backward, are plain RuntimeErrors whose message begins with the place in gloo's sources
    (`[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer ...`)."""
    return isinstance(error, dist.DistError) or re.match(r"\[[^\]]*/gloo/[^\]]*\] ", str(error)) is not None


def _first_line(error: Exception) -> str:
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
    """BatchNorm1d over the global batch, for CPU processes (torch's SyncBatchNorm runs on GPUs only).

    In training, each rank sums its part per channel (dimension 1 of (N, C) or (N, C, L) inputs); the sums
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


def synchronised_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every batch norm computing its statistics over the global batch: torch's SyncBatchNorm on
    GPUs, GlobalBatchNorm on CPUs. The parameters and buffers are the same tensors, so the state_dict (and
    the saved model, whose card rebuilds plain batch norms) is unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.BatchNorm3d)):  # the models here normalise (N, C) rows only
            raise ValueError(f"{type(child).__name__} is not synchronised on CPU processes; use BatchNorm1d")
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum)
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


def guard_worker() -> None:
    """Make a training process that a launcher started end cleanly and never outlive it.

    SIGTERM (what the elastic agent sends the others when one fails) becomes SystemExit, so that `finally`
    blocks remove the temporaries. The agent starts each process in a session of its own, so a SIGKILL of
    the command's process group (an OOM killer, or `kill -9` on the pipeline) would leave it running: Linux's
    parent-death signal sends it SIGTERM when its launcher dies.
    """
    signal.signal(signal.SIGTERM, _exit_once)
    if sys.platform.startswith("linux"):
        # prctl has no Python binding in the standard library; PR_SET_PDEATHSIG (1) is Linux's stable ABI.
        # tests/test_distributed.py kills a launcher with SIGKILL and checks that its processes end.
        parent = os.getppid()
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before the signal was armed
            sys.exit(128 + signal.SIGTERM)


def _exit_once(signum: int, frame: Any) -> None:
    # Later SIGTERMs are ignored, so that they cannot interrupt the exit (an atexit callback, with a
    # traceback): Linux sends the parent-death signal again as each thread of a killed launcher dies.
    signal.signal(signum, signal.SIG_IGN)
    sys.exit(128 + signum)


def launch(processes: int, argv: list[str], nodes: Nodes = ONE_NODE, timeout_s: float = 300.0) -> None:
    """Run `python *argv` as `processes` processes, `processes` / `nodes.count` of them on this machine,
    through torch's elastic agent (what torchrun runs), and wait for them.

    No restarts: the agent checks the processes every 0.1 s, and once one fails it stops the others
    (SIGTERM, then SIGKILL after 30 s) and this raises ProcessesFailed, one line on the failure that came
    first. The processes' stdout is this one's (rank 0 prints the progress); their stderr goes to files, of
    which only the failed process's is shown, when it holds a traceback (a bug).
    One node meets on 127.0.0.1 (c10d rendezvous, a free port); several meet at node 0's `nodes.rendezvous`
    (static rendezvous: node K's processes take ranks after node K - 1's), waiting `timeout_s` for the others.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The processes' stderr and error files, in the temporary directory: `.tmp-train-processes.<pid>.<random>`,
    # which a later launch removes if this process was killed before it could.
    with scratch_folder(Path(tempfile.gettempdir()), LOGS) as logs, _launcher_silenced():
        if nodes.count == 1:
            meeting: dict[str, Any] = {"rdzv_backend": "c10d", "rdzv_endpoint": f"{ADDRESS}:0", "local_addr": ADDRESS}
            run_id = uuid.uuid4().hex
        else:
            # Every node's agent keys its entries in node 0's store by the run id: the same on all nodes.
            configs = {"rank": nodes.rank, "timeout": math.ceil(timeout_s)}
            meeting = {"rdzv_backend": "static", "rdzv_endpoint": nodes.rendezvous, "rdzv_configs": configs}
            run_id = "train"
        config = LaunchConfig(
            min_nodes=nodes.count,
            max_nodes=nodes.count,
            nproc_per_node=processes // nodes.count,
            run_id=run_id,
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=Std.ERR),
            **meeting,
        )
        try:
            with _stderr_kept_in(logs / "launcher.stderr"):
                elastic_launch(config, sys.executable)(*argv)
        except ChildFailedError as failed:
            rank, failure = _first_failure(failed.failures)
            message, output = _explain_failure(rank, processes, failure, logs)
            if output:
                sys.stderr.write(output)  # the failed process's own traceback, as a bug's deserves
            raise ProcessesFailed(message) from None
        except SignalException:  # the agent was told to stop (SIGINT, SIGTERM): it stopped the processes
            raise KeyboardInterrupt from None
        except dist.DistError as error:  # node 0's store: not reached in time, or its port taken
            if nodes.count == 1:
                raise
            raise ProcessesFailed(
                f"the {nodes.count} nodes did not meet at {nodes.rendezvous} within {timeout_s:g} s "
                f"({_first_line(error)}); start every node, each with the same number of nodes and rendezvous: "
                "node 0's address and a free port there"
            ) from None


@contextlib.contextmanager
def _launcher_silenced() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in LAUNCHER_LOGGERS]
    saved = [(logger.propagate, logger.handlers[:]) for logger in loggers]
    for logger in loggers:
        logger.handlers = [logging.NullHandler()]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, (propagate, handlers) in zip(loggers, saved, strict=True):
            logger.propagate, logger.handlers = propagate, handlers


@contextlib.contextmanager
def _stderr_kept_in(path: Path) -> Iterator[None]:
    """This process's stderr (file descriptor 2) into `path` for the block. The C++ side of torch's store
    writes there directly, past the loggers: each failed connection to node 0 while it has not started yet,
    and the timeout, with stack traces. The processes' own stderr goes to files of their own already."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("w") as kept:
            os.dup2(kept.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure that caused the others: a process's own error line first (it ran into a user error);
    then one killed by a signal other than the agent's SIGTERM; then the earliest crash it recorded; then a
    process that another one's end stopped (PEER_STOPPED)."""

    def cause(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, failure = item
        message = _recorded(failure)
        if isinstance(message, str):
            return (3 if message.startswith(PEER_STOPPED) else 0), 0.0, rank
        if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM:
            return 1, failure.timestamp, rank
        if isinstance(message, dict):
            return 2, float(message.get("extraInfo", {}).get("time", failure.timestamp)), rank
        return 4, failure.timestamp, rank

    return min(failures.items(), key=cause)


def _recorded(failure: Any) -> str | dict | None:
    """What a failed process recorded in its error file (stages.cli.record_failure): its one line (a user
    error), or its exception (a crash); None when it recorded nothing (killed, or died before it could)."""
    if not os.path.isfile(failure.error_file):  # torchelastic's ProcessFailure says "<N/A>" then
        return None
    return failure.error_file_data.get("message")


def _explain_failure(rank: int, processes: int, failure: Any, logs: Path) -> tuple[str, str]:
    """The line for `failure`, and what to show before it (a crashed process's stderr)."""
    message = _recorded(failure)
    if isinstance(message, str):
        return message, ""
    who = f"training process {rank} of {processes} (pid {failure.pid})"
    if failure.exitcode < 0:
        name = failure.signal_name()
        return f"{who} was killed by {name}; the others were stopped, and no model was written", ""
    files = sorted(logs.glob(f"*/attempt_*/{failure.local_rank}/stderr.log"))
    output = "".join(path.read_text(errors="replace") for path in files)
    if isinstance(message, dict):
        return f"{who} failed ({message.get('message', 'see above')}); the others were stopped", output
    return f"{who} exited with status {failure.exitcode}; the others were stopped", output
