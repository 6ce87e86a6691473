"""Training on several processes (train.processes): the same steps as one process, rank 0 alone writing, and
failures that end the stage in one line with no process and no half-written model left behind.

Oracles: one process on the whole batch (the gradient, the weights after an epoch, the metrics of a run),
an uninterrupted run of the same processes (a resumed one's bytes), a rerun (its bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import (
    dvc,
    make_tiny_project,
    one_line_error,
    project_env,
    run,
    set_params,
    sgd_epoch,
    stage_command,
    stages_run,
    synthetic_split,
)

from stages.cli import StageError
from stages.core.distributed import PEER_STOPPED, SINGLE, World, joined, shard
from stages.core.errors import SettingError
from stages.core.model import architecture_for, init_model
from stages.core.splits import Meta
from stages.core.training import EpochLog, batch_loss, fit
from stages.launcher import LOGS, Nodes, _first_failure, device_here, nodes_of, process_device, world_of
from stages.params import parse_section
from stages.train import TrainParams

META = Meta(dataset="digits", classes=tuple("0123456789"), image_shape=(28, 28), sizes={"train": 1}, mean=0.25, std=0.5)
TWO = {"train.processes": 2, "train.threads": 1}  # two processes on a 2-core machine: a thread each
# Measured: a 2-process run of the tiny project below against its 1-process run (and README, Training on
# several processes): the weights differ by at most 1e-8 (3.9e-7 on the real Fashion-MNIST, where test
# accuracy was 0.8453 against 0.8454 and the loss equal to 6 decimals); the metrics' files are equal.
WEIGHTS_TOLERANCE = 1e-6
METRICS_TOLERANCE = 1e-4


def params(**changes: object) -> TrainParams:
    """The committed train section, with `changes`."""
    committed = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())["train"]
    return parse_section("train", committed | changes, TrainParams)


# (1) Units: the parts of a batch, and the loss that makes DDP's average the whole batch's gradient.


@pytest.mark.parametrize(("count", "ranks"), [(8, 2), (7, 3), (2, 3), (1, 2)])
def test_the_parts_of_a_batch_are_contiguous_and_cover_it_once(count: int, ranks: int) -> None:
    indices = torch.randperm(count, generator=torch.Generator().manual_seed(count))
    parts = [shard(indices, World(rank, ranks)) for rank in range(ranks)]
    assert torch.equal(torch.cat(parts), indices)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert shard(indices, SINGLE) is indices


@pytest.mark.parametrize(("count", "ranks"), [(8, 2), (7, 3), (2, 3)])  # even, uneven, a rank with nothing
def test_the_ranks_averaged_gradients_are_the_whole_batch_gradient(count: int, ranks: int) -> None:
    architecture = architecture_for("mlp", (16,), META)
    images, labels = synthetic_split(count, seed=count)
    labels = labels.long()

    def gradients(inputs: torch.Tensor, targets: torch.Tensor, processes: int) -> list[torch.Tensor]:
        model = init_model(architecture, 0, torch.device("cpu"))
        loss, _ = batch_loss(model(inputs), targets, count, processes)
        loss.backward()
        return [parameter.grad for parameter in model.parameters()]

    expected = gradients(images, labels, 1)  # one process, the mean over the whole batch
    parts = [shard(torch.arange(count), World(rank, ranks)) for rank in range(ranks)]
    per_rank = [gradients(images[part], labels[part], ranks) for part in parts]
    averaged = [sum(grads) / ranks for grads in zip(*per_rank, strict=True)]  # what DDP's all_reduce makes
    for got, want in zip(averaged, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_the_card_records_processes_only_when_several() -> None:
    assert "processes" not in params().recipe()  # a 1-process card keeps its bytes
    assert params(processes=2).recipe()["processes"] == 2


def test_processes_need_a_device_they_can_share(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert process_device(cpu, 2, None) == cpu
    with pytest.raises(SettingError, match=r"^2 processes cannot share mps; use cpu or cuda$"):
        process_device(torch.device("mps"), 2, None)
    with pytest.raises(SettingError, match=r"^cuda:1 is one GPU, and 2 processes take one each; use cuda$"):
        process_device(torch.device("cuda:1"), 2, None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingError, match=r"^4 processes here need 4 GPUs, this machine has 2$"):
        process_device(torch.device("cuda"), 4, None)
    assert process_device(torch.device("cuda"), 4, World(3, 4, 1, 2)) == torch.device("cuda:1")
    # Through the stage's params: refused before any process starts, with the key and the fix.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    message = "train.processes: 4 processes here need 4 GPUs, this machine has 2; lower train.processes, or change"
    with pytest.raises(StageError, match=rf"^{message} train\.device$"):
        device_here("cuda", "fp32", 4, None, Nodes())


def test_processes_must_be_the_ones_torchrun_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert world_of(4) == World(3, 4, 1, 2)
    with pytest.raises(StageError, match=r"^train\.processes: 2, but 4 processes were started \(WORLD_SIZE\); set "):
        world_of(2)


def test_the_launcher_names_the_cause_not_the_process_it_stopped(tmp_path: Path) -> None:
    """A process that lost its peer records its line too: the launcher shows the peer's own failure."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, exitcode: int, message: str | None) -> ProcessFailure:
        error_file = tmp_path / f"{rank}.json"
        if message is not None:
            error_file.write_text(json.dumps({"message": message, "timestamp": 0}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))

    lost = f"{PEER_STOPPED} (Connection closed by peer [127.0.0.1]:4242); no model was written: ..."
    killed = {0: failure(0, 1, lost), 1: failure(1, -signal.SIGKILL, None)}
    assert _first_failure(killed)[0] == 1
    refused = {0: failure(0, 1, lost), 1: failure(1, 1, "train.lr: training diverged in epoch 3 ...")}
    assert _first_failure(refused)[0] == 1


# The same through DistributedDataParallel in 2 real gloo processes: an epoch of the cnn (batch norm over the
# global batch) on 17 images in batches of 8 (parts 4+4, 4+4, 1+0) against one process.

ORACLE_IMAGES, ORACLE_BATCH = 17, 8


def oracle_epoch(world: World) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    torch.set_num_threads(1)
    model = init_model(architecture_for("cnn", (16,), META, (4, 8)), 0, torch.device("cpu"))
    images, labels = synthetic_split(ORACLE_IMAGES, seed=3)
    dataset = (images, labels.long())
    config = sgd_epoch(lr=0.1, batch_size=ORACLE_BATCH, momentum=0.9)
    logs: list[EpochLog] = []
    fit(model, dataset, dataset, config, world, report=logs.append)
    return model.state_dict(), (logs[0].metrics["train/loss"], logs[0].metrics["train/accuracy"])


def oracle_rank(rank: int, port: int, out: str) -> None:
    """One of the 2 processes (torch.multiprocessing.spawn calls it with its rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = World(rank, 2)
    with joined(world, torch.device("cpu"), timeout_s=60):
        state, scores = oracle_epoch(world)
    torch.save({"state": state, "scores": scores}, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.e2e  # starts two processes
def test_two_gloo_processes_train_an_epoch_as_one_process_does(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(oracle_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    state, scores = oracle_epoch(SINGLE)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, tensor in state.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # the ranks agree exactly
        torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert state["net.norms.0.num_batches_tracked"] == 3  # batch norm counted the global batches
    torch.testing.assert_close(ranks[0]["scores"], scores, rtol=1e-5, atol=1e-6)


# (2)-(4) Through DVC on the tiny project: a run, a forced rerun, a killed process, a killed `dvc repro`.

EPOCHS = 12  # long enough (about a second on 2 processes) for a kill after epoch 2 to land mid-training


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project trained slowly enough not to saturate (lr 0.001), reproduced on 1 process and committed."""
    project = make_tiny_project(tmp_path_factory.mktemp("processes"))
    set_params(project, **{"train.lr": 0.001, "train.epochs": EPOCHS})
    dvc(project, "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "one process")
    return project


def put_back(project: Path) -> None:
    """The project as committed: params, lock, metrics, models; no killed run's state or curves."""
    run(project, "git", "checkout", "-q", "--", ".")
    for leftover in (".dvc/tmp/train-resume", "dvclive"):
        shutil.rmtree(project / leftover, ignore_errors=True)
    dvc(project, "checkout", "--force")


@pytest.fixture
def project(pipeline: Path) -> Path:
    yield pipeline
    put_back(pipeline)


@dataclasses.dataclass
class TwoProcesses:
    """`dvc exp run -S train.processes=2 -S train.threads=1` on the pipeline, then a forced rerun of train."""

    one: dict  # metrics/test.json of the committed 1-process run
    one_weights: dict[str, torch.Tensor]
    run: subprocess.CompletedProcess
    metrics: dict
    weights: dict[str, torch.Tensor]
    card: dict
    files: dict[str, bytes]  # models/, as the experiment wrote it
    forced: subprocess.CompletedProcess
    forced_files: dict[str, bytes]
    leftovers: list[Path]


@pytest.fixture(scope="module")
def two_processes(pipeline: Path) -> TwoProcesses:
    one, one_weights = read_json(pipeline / "metrics" / "test.json"), model_weights(pipeline)
    result = dvc(pipeline, "exp", "run", *(f"-S{key}={value}" for key, value in TWO.items()))
    metrics, weights = read_json(pipeline / "metrics" / "test.json"), model_weights(pipeline)
    card, files = read_json(pipeline / "models" / "model.json"), model_files(pipeline)
    forced = dvc(pipeline, "repro", "--force", "--single-item", "train")
    two = TwoProcesses(one, one_weights, result, metrics, weights, card, files, forced, model_files(pipeline), [])
    two.leftovers = list(pipeline.glob(".tmp-*"))
    put_back(pipeline)
    return two


def model_files(project: Path) -> dict[str, bytes]:
    files = sorted(path for path in (project / "models").rglob("*") if path.is_file())
    return {str(path.relative_to(project)): path.read_bytes() for path in files}


def model_weights(project: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(project / "models" / "model.safetensors"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.e2e
def test_two_processes_train_and_evaluate_as_one_does(two_processes: TwoProcesses) -> None:
    two = two_processes
    assert stages_run(two.run) == ["train", "evaluate"]
    # Rank 0 alone reports: one line per epoch.
    epochs = [line.split(":")[1] for line in two.run.stdout.splitlines() if line.startswith("train: epoch")]
    assert epochs == [f" epoch {epoch}/{EPOCHS}" for epoch in range(1, EPOCHS + 1)], two.run.stdout
    assert two.card["recipe"]["processes"] == 2 and two.card["device"] == "cpu"  # threads: a speed knob, not recorded
    for key, value in two.one.items():
        assert abs(two.metrics[key] - value) <= METRICS_TOLERANCE, (key, two.one, two.metrics)
    for name, tensor in two.weights.items():
        assert (tensor - two.one_weights[name]).abs().max() <= WEIGHTS_TOLERANCE, name
    assert two.leftovers == []


@pytest.mark.e2e
def test_a_forced_rerun_of_two_processes_writes_the_same_bytes(two_processes: TwoProcesses) -> None:
    assert stages_run(two_processes.forced) == ["train"]
    assert two_processes.forced_files == two_processes.files


def start_repro(project: Path, stderr: Path, *options: str) -> subprocess.Popen:
    """`dvc repro` in its own process group, stdout read line by line, stderr to a file."""
    with stderr.open("w") as errors:
        return subprocess.Popen(
            ["dvc", "repro", *options], cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=errors,
            text=True, start_new_session=True,
        )  # fmt: skip


def read_until(process: subprocess.Popen, prefix: str) -> list[psutil.Process]:
    """Read the output up to a line starting with `prefix`; the processes dvc started by then (the stage's
    launcher and its training processes)."""
    for line in process.stdout:
        if line.startswith(prefix):
            return psutil.Process(process.pid).children(recursive=True)
    raise AssertionError(f"no line starting with {prefix!r}; dvc exited {process.wait()}")


def ranks(processes: list[psutil.Process]) -> dict[str, psutil.Process]:
    """The training processes among `processes`, by their RANK."""
    found = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if "RANK" in (environment := process.environ()):
                found[environment["RANK"]] = process
    return found


@pytest.mark.e2e
def test_a_killed_process_ends_the_stage_in_one_line_leaving_nothing_behind(project: Path, tmp_path: Path) -> None:
    before = model_files(project)
    set_params(project, **TWO, **{"train.epochs": 300})  # ends long after the kill
    process = start_repro(project, tmp_path / "stderr")
    try:
        started = read_until(process, "train: epoch 2/300")
        ranks(started)["1"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.communicate(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    # Besides DVC's own line (`ERROR: failed to reproduce 'train': ...`) and warnings (a machine with fewer
    # cores), the stage's one line: nothing from torch's elastic agent or the other process.
    ours = [line for line in stderr.splitlines() if line.strip() and not line.startswith("ERROR: failed to reproduce")]
    lines = [line for line in ours if not line.startswith("train: warning: ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("train: error: training process 1 of 2 (pid ")
    assert lines[0].endswith(
        "was killed by SIGKILL; the others were stopped, and no model was written "
        "(the previous models restored from DVC's cache)"
    )
    assert elapsed < 30, elapsed  # the agent checks every 0.1 s; measured 1.5 to 4 s here
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == []  # the launcher and rank 0 ended too
    assert not list(project.glob(".tmp-*"))  # rank 0 removed its half-written model folder
    assert model_files(project) == before


@pytest.mark.e2e
def test_ctrl_c_stops_two_processes_and_says_where_the_next_run_continues(project: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group): the launcher stops the processes, the previous models
    come back, and its one line says after which epoch the next run continues (rank 0 saved that state)."""
    before = model_files(project)
    set_params(project, **TWO, **{"train.epochs": 300})
    process = start_repro(project, tmp_path / "stderr")
    try:
        started = read_until(process, "train: epoch 2/300")
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if "interrupted" in line]
    said = "train: interrupted; the previous models restored from DVC's cache; the next run continues after epoch "
    assert line.startswith(said) and 2 <= int(line.removeprefix(said)) < 300, stderr
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == []
    assert model_files(project) == before


@pytest.mark.e2e
def test_a_killed_repro_resumes_two_processes_to_the_bytes_of_an_uninterrupted_run(
    project: Path, tmp_path: Path, two_processes: TwoProcesses
) -> None:
    set_params(project, **TWO)  # the params of the uninterrupted run (so: no restore from the run-cache)
    process = start_repro(project, tmp_path / "stderr", "--no-run-cache")
    try:
        started = read_until(process, f"train: epoch 2/{EPOCHS}")
        training = ranks(started)
        launcher = training["0"].ppid()
    finally:
        with contextlib.suppress(ProcessLookupError):  # dvc and the launcher, as an OOM killer would
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    assert sorted(training) == ["0", "1"]
    # The training processes, in sessions of their own, end with their launcher (parent-death signal), and
    # rank 0 removes its temporary model folder (their SIGTERM is an exit, not a death).
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == []
    assert not list(project.glob(".tmp-*"))
    logs = list(Path(tempfile.gettempdir()).glob(f".tmp-{LOGS}.{launcher}.*"))
    assert len(logs) == 1  # the killed launcher's folder of logs, until the next launch
    states = list((project / ".dvc" / "tmp" / "train-resume").glob("*/state.pt"))
    assert len(states) == 1

    resumed = dvc(project, "repro", "--no-run-cache", "train")
    assert stages_run(resumed) == ["train"]
    done = [int(line.split()[4]) for line in resumed.stdout.splitlines() if line.startswith("train: resuming after")]
    assert len(done) == 1 and 2 <= done[0] < EPOCHS, resumed.stdout
    assert not states[0].exists()
    assert not logs[0].exists()
    assert model_files(project) == two_processes.files


@pytest.mark.e2e
def test_processes_that_never_meet_end_in_one_line_within_the_timeout(project: Path, tmp_path: Path) -> None:
    """A process started as torchrun starts one, whose peer never comes: the rendezvous cannot form."""
    set_params(project, **TWO)
    environment = project_env() | {
        "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    command = [sys.executable, "-m", "stages.train", "--data", "data/processed", "--out", str(tmp_path / "models")]
    start = time.monotonic()
    result = subprocess.run(
        [*command, "--peer-timeout", "3"], cwd=project, env=environment, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - start < 60
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "warning" not in line]
    assert len(lines) == 1 and lines[0].startswith(
        "train: error: the 2 training processes did not all meet within 3 s ("
    ), result.stderr
    assert not (tmp_path / "models").exists() and not list(tmp_path.glob(".tmp-*"))


# (5) Two nodes on one machine: two launchers of one process each, started as a team starts them on two
# machines (docs/sharing.md), each running the train stage's command in the project: the stage's own
# (`--nodes 2 --node-rank K --rendezvous HOST:PORT`), and torchrun.

PEER_TIMEOUT = 20  # seconds (--peer-timeout): room for a loaded machine to start the second process


def start_node(project: Path, node: int, port: int, stderr: Path, torchrun: bool = False) -> subprocess.Popen:
    """Node `node` of 2, one process, meeting at 127.0.0.1:`port`: stdout read line by line, stderr to a file.
    The stage's launcher puts rank 0 on node 0; torchrun's c10d rendezvous numbers the nodes itself."""
    stage = [*stage_command(project, "train"), "--peer-timeout", str(PEER_TIMEOUT)]  # `python -m stages.train ...`
    if torchrun:
        launcher = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        command = [*launcher, "--rdzv-endpoint", f"127.0.0.1:{port}", *stage[1:]]  # torchrun runs python itself
    else:
        command = [*stage, "--nodes", "2", "--node-rank", str(node), "--rendezvous", f"127.0.0.1:{port}"]
    with stderr.open("w") as errors:
        return subprocess.Popen(
            command, cwd=project, env=project_env(), stdout=subprocess.PIPE, stderr=errors, text=True,
            start_new_session=True,
        )  # fmt: skip


@contextlib.contextmanager
def two_nodes(project: Path, tmp_path: Path, torchrun: bool = False) -> Iterator[list[subprocess.Popen]]:
    """Nodes 0 and 1; whichever still runs at the end is killed."""
    port = free_port()
    nodes = [start_node(project, node, port, tmp_path / f"node{node}.stderr", torchrun) for node in (0, 1)]
    try:
        yield nodes
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
            node.communicate()


def errors(stderr: Path) -> list[str]:
    """The lines of a node's stderr, but for warnings (a machine with fewer cores)."""
    return [
        line for line in stderr.read_text().splitlines() if line.strip() and not line.startswith("train: warning: ")
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["stage", "torchrun"])
def test_two_nodes_write_the_bytes_of_two_processes(
    project: Path, tmp_path: Path, two_processes: TwoProcesses, launcher: str
) -> None:
    set_params(project, **TWO)
    with two_nodes(project, tmp_path, torchrun=launcher == "torchrun") as nodes:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [(tmp_path / f"node{n}.stderr").read_text() for n in (0, 1)]
    epochs = [len([line for line in out.splitlines() if line.startswith("train: epoch")]) for out in outputs]
    if launcher == "stage":
        assert epochs == [EPOCHS, 0]  # rank 0, on node 0, alone reports
        assert errors(tmp_path / "node0.stderr") == errors(tmp_path / "node1.stderr") == []
    else:
        assert sorted(epochs) == [0, EPOCHS]  # c10d puts rank 0 on either node
    assert model_files(project) == two_processes.files  # the model, its card and curves: rank 0 wrote them
    assert not list(project.glob(".tmp-*"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("stop", "lost", "cause", "limit"),
    [
        ("killed", 1, "Connection closed by peer", PEER_TIMEOUT),  # measured 5.6 s on 2 busy cores
        ("killed", 0, "Connection closed by peer", PEER_TIMEOUT),  # node 0 held the rendezvous too; 6.4 s
        ("frozen", 1, f"Timed out waiting {PEER_TIMEOUT * 1000}ms", 2 * PEER_TIMEOUT),  # measured the timeout and 2 s
    ],
    ids=["node1-killed", "node0-killed", "node1-frozen"],
)
def test_a_lost_node_ends_the_other_in_one_line_leaving_nothing_behind(
    project: Path, tmp_path: Path, stop: str, lost: int, cause: str, limit: float
) -> None:
    before = model_files(project)
    set_params(project, **TWO, **{"train.epochs": 300})  # ends long after the kill
    with two_nodes(project, tmp_path) as nodes:
        started = read_until(nodes[0], "train: epoch 2/300")  # rank 0 is writing the model when a node goes
        started += psutil.Process(nodes[1].pid).children(recursive=True)
        launcher = psutil.Process(nodes[lost].pid)
        gone = [launcher, *launcher.children(recursive=True)]
        if stop == "killed":
            launcher.kill()  # SIGKILL; its process follows (parent-death signal)
        else:  # SIGSTOP: as a machine gone without closing its connections
            for process in gone:
                process.suspend()
        stopped = time.monotonic()
        survivor = nodes[1 - lost]
        survivor.communicate(timeout=120)
        elapsed = time.monotonic() - stopped
        for process in gone:
            with contextlib.suppress(psutil.Error):
                process.kill()
    assert survivor.returncode == 1 and elapsed < limit, (survivor.returncode, elapsed)
    _, alive = psutil.wait_procs(started + gone, timeout=10)
    assert alive == []
    assert (tmp_path / f"node{lost}.stderr").read_text() == ""  # the lost node prints nothing
    # The surviving launcher's stderr: its process's one line, shown as the launcher's own; nothing from
    # torch's elastic agent (log lines, a ChildFailedError traceback), as torchrun would add.
    lines = errors(tmp_path / f"node{1 - lost}.stderr")
    assert len(lines) == 1 and lines[0].startswith(f"train: error: {PEER_STOPPED} ({cause}"), lines
    assert lines[0].endswith(
        "; no model was written: see that process's own output (its node's), then rerun every process"
    )
    assert model_files(project) == before  # the old complete model, and no half-written one beside it
    assert not list(project.glob(".tmp-*"))


@pytest.mark.e2e
@pytest.mark.parametrize("node", [0, 1])  # node 0 waits for the other at its rendezvous; node 1 for node 0's
def test_a_node_whose_peer_never_comes_ends_in_one_line_within_the_timeout(
    project: Path, tmp_path: Path, node: int
) -> None:
    set_params(project, **TWO)
    rendezvous = f"127.0.0.1:{free_port()}"
    command = [*stage_command(project, "train"), "--nodes", "2", "--node-rank", str(node), "--rendezvous", rendezvous]
    start = time.monotonic()
    result = subprocess.run(
        [*command, "--peer-timeout", "3"], cwd=project, env=project_env(), capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - start < 60
    line = one_line_error(result, f"train: error: the 2 nodes did not meet at {rendezvous} within 3 s (")
    assert line.endswith(
        "); start every node, each with the same number of nodes and rendezvous: node 0's address and a free port there"
    )
    assert not list(project.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((0, 0, None, 2), r"--nodes 0: must be >= 1 \(1 = this machine alone\)"),
        ((2, 2, "127.0.0.1:29400", 2), r"--node-rank 2: must be 0 \.\. 1 \(--nodes 2\); node 0 writes"),
        ((2, 0, None, 2), r"--rendezvous \(none\): --nodes 2 needs HOST:PORT, where node 0 listens and the others"),
        ((2, 0, "node0.example", 2), r"--rendezvous node0\.example: --nodes 2 needs HOST:PORT"),
        ((2, 1, "127.0.0.1:29400", 3), r"train\.processes: 3 processes cannot be shared evenly by --nodes 2; set "),
    ],
)
def test_the_nodes_are_checked_before_anything_starts(options: tuple, message: str) -> None:
    with pytest.raises(StageError, match=rf"^{message}"):
        nodes_of(*options)


def test_the_nodes_share_the_processes() -> None:
    assert nodes_of(1, 5, None, 3) == Nodes()  # one node: this machine, as without the options
    assert nodes_of(2, 1, "node0.example:29400", 4) == Nodes(2, 1, "node0.example:29400")
    cuda = torch.device("cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "device_count", lambda: 2)
        assert process_device(cuda, 4, None, nodes=2) == torch.device("cuda:0")  # 2 of the 4 on this machine
        with pytest.raises(SettingError, match=r"^4 processes here need 4 GPUs"):
            process_device(cuda, 4, None)
