"""Fixtures, and a guard that keeps `make check` quick: a test that starts DVC, a stage or a server says so.

The helpers the tests share are plain functions in helpers.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_tiny_project


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A tiny project (see helpers.make_tiny_project) for one test."""
    return make_tiny_project(tmp_path)


def marker_for(argv: list[str]) -> str | None:
    """The marker a test needs to start `argv`: e2e for `dvc` and `python -m stages...`, server for `weed`."""
    program = Path(argv[0]).name if argv else ""
    if program == "dvc" or (argv[1:2] == ["-m"] and argv[2:3] and argv[2].partition(".")[0] == "stages"):
        return "e2e"
    if program == "weed":
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
