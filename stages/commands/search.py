"""Search the params with an Optuna study whose every trial is a DVC experiment of the pipeline.

    python -m stages.commands.search SPACE.yaml --study NAME --trials N [--storage URL]   (installed: mnist-search)

Each trial draws the params of SPACE.yaml (TPE) and runs `dvc exp run -n NAME-<trial>` in this checkout. While
train runs, each epoch's validation loss, read from its live curves, goes to the study; a trial the pruner
stops is ended and kept as the experiment NAME-<trial>-pruned, its train stage cut after the epoch it
reached (train.stop_after, continuing the killed run's saved state). The study lives in --storage: a SQLite
file in this checkout by default, or a PostgreSQL database that workers on several machines share (one worker
per checkout); `--push REMOTE` sends each trial's experiment to the team with `dvc exp push`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.cli import StageError, argument_parser, run, warn
from stages.core.curves import read_curve
from stages.core.errors import SettingError
from stages.core.files import TRAINING_LOG
from stages.core.search import Dimension, as_override, read_space
from stages.download import DataParams
from stages.evaluate import EvaluateParams
from stages.params import Params, parse_section, read_params_file
from stages.preprocess import PreprocessParams
from stages.train import TrainParams

SECTIONS: dict[str, type[Params]] = {
    "data": DataParams,
    "preprocess": PreprocessParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
}
DEFAULT_STORAGE = "sqlite:///search.db"  # in the checkout, ignored by git (.gitignore)
STOP_AFTER = "train.stop_after"  # set by the search on a pruned trial, never drawn
EPOCHS = "train.epochs"  # the last epoch: a trial is not pruned once it is reached
OBJECTIVE, ACCURACY = "val/loss", "val/accuracy"  # the study minimises the kept epoch's validation loss
HEARTBEAT_S = 10  # a trial whose worker stopped beating for 2 of these is failed by the next worker
POLL_S = 0.2  # how often the live curves are read while train runs
FAILURES_IN_A_ROW = 3  # then the search stops: something other than the params is wrong
STARTUP_TRIALS, REDUCTION_FACTOR = 2, 3  # the pruner's; why: benchmarks/search_replay.py, docs/search.md


class TrialFailed(Exception):
    """A trial whose experiment did not run to the end (its line is in the output above)."""


def arguments() -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("space", type=Path, help="YAML: params keys (section.key), each a list or {low, high, log}")
    parser.add_argument("--study", required=True, help="the study's name; its trials are experiments STUDY-<number>")
    parser.add_argument("--trials", type=int, required=True, help="trials of the study, all workers together")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"database URL (default: {DEFAULT_STORAGE})")
    parser.add_argument("--seed", type=int, help="the sampler's seed (default: random; give workers different ones)")
    parser.add_argument("--no-prune", action="store_true", help="run every trial to its last epoch")
    parser.add_argument(
        "--startup-trials",
        type=int,
        default=STARTUP_TRIALS,
        help=f"trials that run whole before the pruner stops any (default: {STARTUP_TRIALS})",
    )
    parser.add_argument(
        "--reduction-factor",
        type=int,
        default=REDUCTION_FACTOR,
        metavar="R",
        help="the pruner lets a trial go on past epochs 1, R, R^2, ... only while its validation loss there is "
        f"among the best 1/R of all trials' at that epoch (default: {REDUCTION_FACTOR})",
    )
    parser.add_argument("--push", metavar="GIT_REMOTE", help="`dvc exp push` each trial's experiment there")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.trials < 0:
        raise StageError(f"--trials {args.trials}: must be >= 0 (0: only say which trial is best)")
    check_name(args.study)
    dimensions = checked_space(args.space, args.params)
    pruner = None if args.no_prune else halving_pruner(args.startup_trials, args.reduction_factor)
    study = open_study(args.study, args.storage, dimensions, args.seed, pruner)
    fail_own_dead_trials(study)
    section, _, key = EPOCHS.partition(".")
    epochs = read_params_file(args.params)[section][key]
    trials = Trials(args.study, dimensions, pipeline_folders(), epochs, args.push)
    with stopped_by_sigterm(), database_errors(args.storage):
        search(study, trials, args.trials)
    print(best_line(study), flush=True)


def check_name(study: str) -> None:
    """A study's name starts its experiments' names, which are git refs."""
    if not study or not all(char.isalnum() or char in "-_." for char in study) or not study[0].isalnum():
        raise StageError(f"--study {study!r}: use letters, digits, '-', '_' and '.', starting with a letter or digit")


def checked_space(path: Path, params_file: Path) -> list[Dimension]:
    """The space file's dimensions, each value checked by the params model of the stage that reads its key."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise StageError(f"{path}: cannot be read ({error.strerror}); give the search space's YAML file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise StageError(f"{path}: not valid YAML{where}; fix its syntax") from None
    try:
        dimensions = read_space(document)
    except SettingError as error:
        raise StageError(f"{path}: {error}") from None
    params = read_params_file(params_file)
    for dimension in dimensions:
        section, _, key = dimension.key.partition(".")
        if section not in SECTIONS or not key or dimension.key == STOP_AFTER:
            sections = ", ".join(f"{name}.*" for name in SECTIONS)
            raise StageError(f"{path}: {dimension.key}: unknown key; give a params key ({sections}, not {STOP_AFTER})")
        for value in dimension.values_to_check:
            try:
                parse_section(section, {**params.get(section, {}), key: value}, SECTIONS[section])
            except StageError as error:
                tried = f" (the space tries {value!r})" if key in SECTIONS[section].model_fields else ""
                raise StageError(f"{path}: {error}{tried}") from None
    return dimensions


@dataclass(frozen=True)
class Folders:
    """Where the pipeline writes what a trial reads, as dvc.yaml's commands name them."""

    live: Path  # train's curves while it runs
    model: Path  # train's output: the kept model and its finished curves
    metrics: Path  # evaluate's output


def pipeline_folders(pipeline: Path = Path("dvc.yaml")) -> Folders:
    try:
        stages = yaml.safe_load(pipeline.read_text(encoding="utf-8"))["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise StageError(f"{pipeline}: not found or unreadable; run the search in the project's checkout") from None

    def option(stage: str, name: str) -> Path:
        words = shlex.split(stages[stage]["cmd"])
        return Path(words[words.index(name) + 1])

    return Folders(live=option("train", "--live"), model=option("train", "--out"), metrics=option("evaluate", "--out"))


def halving_pruner(startup: int, reduction_factor: int):
    """Successive halving from epoch 1 (stages/core/pruning.py), once `startup` trials have run whole."""
    if startup < 0:
        raise StageError(f"--startup-trials {startup}: must be >= 0 (0: the pruner stops trials from the first)")
    if reduction_factor < 2:
        raise StageError(f"--reduction-factor {reduction_factor}: must be >= 2 (3: the best third goes on)")
    from stages.core.pruning import HalvingPruner

    return HalvingPruner(startup, reduction_factor)


def open_study(name: str, storage_url: str, dimensions: list[Dimension], seed: int | None, pruner: Any = None):
    """The study `name` in the database, made on first use; refused when it was started with another space.
    Its trials are stopped early by `pruner` (None: never)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial gets the search's own line instead
    with database_errors(storage_url):
        storage = rdb_storage(storage_url)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner or optuna.pruners.NopPruner(),
            direction="minimize",
            load_if_exists=True,
        )
        space = [dimension.describe() for dimension in dimensions]
        recorded = study.user_attrs.get("space")
        if recorded is None:
            study.set_user_attr("space", space)
        elif recorded != space:
            raise StageError(
                f"--study {name}: exists with another space ({json.dumps(recorded)}); name a new study, or search "
                "the space it was started with"
            )
    return study


def rdb_storage(storage_url: str, attempts: int = 5):
    """Optuna's storage in the database, its tables made on first use. Workers started together on an empty
    database each create the tables; all but one then find them made under their feet, and try again."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
                return optuna.storages.RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


@contextlib.contextmanager
def database_errors(storage_url: str):
    """A database that cannot be reached or used is one line naming it (its password hidden)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        shown = make_url(storage_url).render_as_string(hide_password=True)
    except ArgumentError:
        fix = "give sqlite:///FILE or postgresql://USER@HOST/DATABASE"
        raise StageError(f"--storage {storage_url!r}: not a database URL; {fix}") from None
    try:
        yield
    except ImportError as error:  # Optuna's, from the driver's ModuleNotFoundError
        driver = getattr(error.__cause__, "name", None) or "database"
        raise StageError(f"--storage {shown}: needs the {driver} driver; pip install -e '.[postgres]'") from None
    except SQLAlchemyError as error:
        cause = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise StageError(f"--storage {shown}: {cause}; start the database or fix the URL, then rerun") from None


def worker() -> dict[str, Any]:
    """This process, as the study records who runs a trial."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def fail_own_dead_trials(study) -> None:
    """Mark failed the running trials of this machine whose worker is gone (killed, or the machine rebooted),
    at once; other machines' are failed by the heartbeat, HEARTBEAT_S x 2 after their last beat."""
    import optuna
    import psutil

    here = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        who = trial.user_attrs.get("worker") or {}
        if who.get("host") != here:
            continue
        with contextlib.suppress(psutil.Error):
            if psutil.Process(who["pid"]).create_time() == who["started"]:
                continue  # alive: another worker of this machine
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        warn(f"trial {trial.number}: its worker ({who.get('pid')}) is gone; marked failed")


def counted(study) -> int:
    """The trials that count toward --trials: finished or running, not failed."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def search(study, trials: Trials, total: int) -> None:
    """Run trials until the study has `total`; stop when FAILURES_IN_A_ROW fail in a row."""
    failures = 0
    while counted(study) < total:
        study.optimize(trials.objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
        failures = failures + 1 if trials.last_failed else 0
        if failures >= FAILURES_IN_A_ROW:
            raise StageError(
                f"{failures} trials in a row failed (the last: {trials.last_failed}); fix that, then rerun: the "
                "study goes on"
            )


def best_line(study) -> str:
    completed = [trial for trial in study.trials if trial.value is not None and trial.state.name == "COMPLETE"]
    if not completed:
        return f"search: study {study.study_name}: no trial completed yet"
    best = study.best_trial
    name, attrs = best.user_attrs.get("experiment"), best.user_attrs
    return (
        f"search: best of study {study.study_name} ({len(completed)} completed): trial {best.number}, experiment "
        f"{name}: val loss {best.value:.4f}, val accuracy {attrs.get('val_accuracy', float('nan')):.4f}; "
        f"take it with `dvc exp apply {name}` (another worker's: `dvc exp pull REMOTE {name}` first)"
    )


@contextlib.contextmanager
def stopped_by_sigterm():
    """SIGTERM (a batch system, `kill`) ends the search as Ctrl-C does: the running trial stopped, marked failed."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trials:
    """The study's objective: each trial one DVC experiment, its epochs reported to the pruner as train runs."""

    def __init__(
        self, study: str, dimensions: list[Dimension], folders: Folders, epochs: int, push: str | None
    ) -> None:
        self.study, self.dimensions, self.folders, self.push = study, dimensions, folders, push
        self.epochs = epochs  # params.yaml's train.epochs, unless the space draws it
        self.last_failed: str | None = None  # why the last trial failed; None when it did not

    def objective(self, trial) -> float:
        import optuna

        self.last_failed = None
        values = {dimension.key: dimension.draw(trial) for dimension in self.dimensions}
        trial.set_user_attr("worker", worker())
        overrides = [f"{key}={as_override(value)}" for key, value in values.items()]
        name = f"{self.study}-{trial.number}"
        trial.set_user_attr("experiment", name)
        print(f"search: trial {trial.number} ({name}): {', '.join(overrides)}", flush=True)
        pruning = Pruning(trial, values.get(EPOCHS, self.epochs))
        try:
            name, stopped = self.run(name, overrides, pruning)
        except TrialFailed as error:
            self.last_failed = str(error)
            print(f"search: trial {trial.number} failed: {error}", flush=True)
            raise
        trial.set_user_attr("experiment", name)
        curves = self.folders.model / TRAINING_LOG
        losses, accuracies = read_curve(curves, OBJECTIVE), read_curve(curves, ACCURACY)
        kept = losses.index(min(losses))  # the epoch train keeps: the lowest validation loss, the first of ties
        pruning.report(losses)  # the epochs a run-cache restore or a fast epoch did not show live
        trial.set_user_attr("epochs", len(losses))
        trial.set_user_attr("val_accuracy", accuracies[kept])
        trial.set_user_attr("test", json.loads((self.folders.metrics / "test.json").read_text()))
        if self.push:
            share(name, self.push)
        if stopped is not None:
            print(f"search: trial {trial.number} pruned after epoch {stopped}: {name}", flush=True)
            raise optuna.TrialPruned(f"pruned after epoch {stopped}")
        print(f"search: trial {trial.number}: val loss {losses[kept]:.4f}, accuracy {accuracies[kept]:.4f}", flush=True)
        return losses[kept]

    def run(self, name: str, overrides: list[str], pruning: Pruning) -> tuple[str, int | None]:
        """Run the trial's experiment; when pruned, keep it as `name-pruned`, cut after the epoch it reached.
        Returns the experiment's name and that epoch (None: not pruned)."""
        whole = [*overrides, f"{STOP_AFTER}=0"]
        stopped = experiment(name, whole, self.folders.live, pruning)
        if stopped is not None and stopped >= pruning.epochs:  # every epoch ran before the prune took effect
            experiment(name, whole, self.folders.live)  # only what is left: its state, or the run-cache
            stopped = None
        elif stopped is not None:  # continues the killed run's state after that epoch: nothing is trained again
            name = f"{name}-pruned"
            experiment(name, [*overrides, f"{STOP_AFTER}={stopped}"], self.folders.live)
        return name, stopped


class Pruning:
    """Reports a trial's validation losses to the study, each epoch once; says when the pruner stops it."""

    def __init__(self, trial, epochs: int) -> None:
        self.trial, self.epochs, self.reported = trial, epochs, 0

    def report(self, losses: list[float]) -> bool:
        """Report the epochs of `losses` not reported yet; True when the study prunes the trial (never after
        its last epoch: only the model's writing is left)."""
        if len(losses) <= self.reported:
            return False
        for epoch in range(self.reported + 1, len(losses) + 1):
            self.trial.report(losses[epoch - 1], epoch)
        self.reported = len(losses)
        return len(losses) < self.epochs and self.trial.should_prune()


def experiment(name: str, overrides: list[str], live: Path, pruning: Pruning | None = None) -> int | None:
    """Run `dvc exp run -n name -S ...` here; with `pruning`, stop it when the study prunes it and return the
    epochs it finished (None: it ran to the end). Raises TrialFailed when it fails."""
    shutil.rmtree(live, ignore_errors=True)  # the last trial's curves
    command = ["dvc", "exp", "run", "-n", name, *(arg for override in overrides for arg in ("-S", override))]
    # Its own process group: a Ctrl-C meant for the search reaches it only through `interrupt`.
    with interruptible_children():
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0
        )
    tail = echoed(process)
    try:
        while process.poll() is None:
            if pruning is not None and pruning.report(read_curve(live, OBJECTIVE)):
                interrupt(process)
                if process.returncode == 0:  # it ended, recorded whole, before the interrupt reached it
                    break
                return len(read_curve(live, OBJECTIVE))
            time.sleep(POLL_S)
    finally:
        interrupt(process)
    if process.returncode != 0:
        errors = [line for line in tail if "error" in line.lower()] or list(tail) or ["no output"]
        raise TrialFailed(f"`dvc exp run -n {name}` exited {process.returncode}: {errors[-1].strip()}")
    return None


@contextlib.contextmanager
def interruptible_children():
    """A search started in the background by a shell (`mnist-search ... &`, nohup) ignores SIGINT, and a program
    it starts would too: its `dvc exp run` could not be stopped by `interrupt`. While this holds, SIGINT is
    caught here (by a no-op: still ignored), and a program started then begins with SIGINT at its default."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def echoed(process: subprocess.Popen) -> deque[str]:
    """Copy the process's output to ours as it comes; the deque keeps its last lines."""
    tail: deque[str] = deque(maxlen=20)

    def copy() -> None:
        for line in process.stdout:
            tail.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    threading.Thread(target=copy, daemon=True).start()
    return tail


def interrupt(process: subprocess.Popen, timeout: float = 60) -> None:
    """End a running `dvc exp run` as Ctrl-C would, so that DVC cleans up; kill it if it does not end."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def share(name: str, remote: str) -> None:
    """`dvc exp push remote name`: the experiment's git ref to the git remote, its outputs to the DVC remote."""
    pushed = subprocess.run(["dvc", "exp", "push", remote, name], capture_output=True, text=True)
    if pushed.returncode != 0:
        line = (pushed.stderr.strip().splitlines() or ["no output"])[-1]
        raise TrialFailed(f"`dvc exp push {remote} {name}` exited {pushed.returncode}: {line}")


def console() -> None:
    """The `mnist-search` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
