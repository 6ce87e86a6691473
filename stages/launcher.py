"""Where the training processes run, and their supervision: what `python -m stages.train` decides before
any data is read.

The topology: this process's place among the processes (`world_of`, from the environment torchrun sets),
the machines (`nodes_of`), its device (`device_here`) and CPU threads (`threads_here`). With
train.processes > 1 and no launcher above it, the stage starts the processes itself (`launch`: torch's
elastic agent, what torchrun runs: on this machine, or as one of several nodes) and waits for them; or the
user's own torchrun starts them. Either way a process that fails records why (`record_failure`) where the
agent reads it (`_recorded`), so that the launching process ends with the one line of the failure that
came first.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from stages.cli import StageError, explained, warn
from stages.core.artifacts import scratch_folder
from stages.core.distributed import PEER_STOPPED, ProcessesFailed, World, first_line
from stages.core.errors import SettingError
from stages.core.runtime import autocast_for, available_cores, check_memory, resolve_device, resolve_threads
from stages.core.splits import Meta

ADDRESS = "127.0.0.1"  # where `launch`'s processes meet: this machine only
LOGS = "train-processes"  # the name of `launch`'s temporary folder
# The elastic agent's loggers: their lines (a process closing, a failure, with a traceback) would follow
# the stage's own one-line error.
LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The machines (nodes) that train one model together, and which of them this one is: a deployment,
    never part of the recipe."""

    count: int = 1
    rank: int = 0  # node 0 holds the rendezvous, and the process of rank 0 (which writes)
    rendezvous: str = ""  # HOST:PORT of node 0, where the nodes meet; empty for one node


ONE_NODE = Nodes()


def world_of(processes: int) -> World | None:
    """This process's place among the training processes, as torchrun (or `launch`) set it (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE); None for a process that was not started by one."""
    if "WORLD_SIZE" not in os.environ:
        return None
    size = int(os.environ["WORLD_SIZE"])
    if size != processes:
        raise StageError(
            f"train.processes: {processes}, but {size} processes were started (WORLD_SIZE); set "
            f"train.processes: {size}, the processes on all machines together"
        )
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", 0)), local_size)


def nodes_of(count: int, rank: int, rendezvous: str | None, processes: int) -> Nodes:
    """The machines of this run (--nodes, --node-rank, --rendezvous), checked against train.processes, all
    their processes together, which they share evenly."""
    if count < 1:
        raise StageError(f"--nodes {count}: must be >= 1 (1 = this machine alone)")
    if count == 1:
        return ONE_NODE
    if not 0 <= rank < count:
        raise StageError(f"--node-rank {rank}: must be 0 .. {count - 1} (--nodes {count}); node 0 writes")
    host, _, port = (rendezvous or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StageError(
            f"--rendezvous {rendezvous or '(none)'}: --nodes {count} needs HOST:PORT, where node 0 listens "
            "and the others connect (the same on every node)"
        )
    if processes % count:
        raise StageError(
            f"train.processes: {processes} processes cannot be shared evenly by --nodes {count}; set "
            f"train.processes to a multiple of {count}, the processes on all nodes together"
        )
    return Nodes(count, rank, rendezvous)


def device_here(name: str, precision: str, processes: int, world: World | None, nodes: Nodes) -> torch.device:
    """This process's device (train.device; one GPU each when several processes train on CUDA), its
    precision checked."""
    with explained("train.device"):
        device = resolve_device(name)
    with explained("train.processes", fix="lower train.processes, or change train.device"):
        device = process_device(device, processes, world, nodes.count)
    with explained("train.precision"):
        autocast_for(device, precision)
    return device


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


def threads_here(threads: int | Literal["auto"], processes: int, world: World | None, nodes: Nodes) -> int:
    """The CPU threads of each process on this machine; the first process here warns when they outnumber
    its cores."""
    local_processes = world.local_size if world else processes // nodes.count
    with explained("train.threads"):
        resolved = resolve_threads(threads, local_processes)
    if world is None or world.local_rank == 0:
        warn_if_oversubscribed(resolved, local_processes)
    return resolved


def fits_in_memory(processes: int, meta: Meta) -> None:
    """Refuse `processes` processes on this machine that its memory cannot hold, each with the training and
    validation splits it loads (uint8 images, int64 labels)."""
    height, width = meta.image_shape
    data_bytes = (meta.sizes["train"] + meta.sizes["val"]) * (height * width + 8)
    with explained("train.processes", fix="lower train.processes"):
        check_memory(processes, data_bytes)


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
                f"({first_line(error)}); start every node, each with the same number of nodes and rendezvous: "
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


def record_failure(message: str, traceback_text: str | None = None) -> None:
    """Leave a training process's failure where the elastic agent that started it (the train stage's
    launcher, or torchrun) reads it: the file TORCHELASTIC_ERROR_FILE names, in torchelastic's format.

    A user error is its one line (a string message), which the launcher prints as its own; a crash is the
    exception and its traceback (torchelastic's `@record` format), with the time it happened, so that the
    launcher tells the crash that came first from the failures it caused in the other processes.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    if traceback_text is None:
        record: dict = {"message": message, "timestamp": int(now)}
    else:
        info = {"py_callstack": traceback_text, "timestamp": str(int(now)), "time": now}
        record = {"message": {"message": message, "extraInfo": info}}
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as stream:
        json.dump(record, stream)


def _recorded(failure: Any) -> str | dict | None:
    """What a failed process recorded in its error file (`record_failure`): its one line (a user
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
