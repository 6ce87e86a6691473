"""Helpers for the sharing tests: a bare git origin, teammates' clones, and fingerprints of what they hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from helpers import dvc, make_tiny_project, run

CODE_TAG = "code"  # the origin's first commit: the pipeline without any results
SHARED = ("data", "models", "metrics")  # everything a pipeline run produces


def make_origin(root: Path, configure=None) -> Path:
    """A bare git origin holding the tiny project; `configure(project)` may edit and commit it first."""
    project = make_tiny_project(root)
    if configure is not None:
        configure(project)
    run(project, "git", "tag", CODE_TAG)
    origin = root / "origin.git"
    run(root, "git", "clone", "-q", "--bare", str(project), str(origin))
    return origin


def clone(origin: Path, destination: Path, branch: str = "main") -> Path:
    run(origin.parent, "git", "clone", "-q", "-b", branch, str(origin), str(destination))
    return destination


def commit_and_push(project: Path, message: str, branch: str = "main") -> None:
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", message)
    run(project, "git", "push", "-q", "origin", f"HEAD:{branch}")


def fingerprint(project: Path, folders: tuple[str, ...] = SHARED) -> dict[str, str]:
    """sha256 of every file under `folders`, keyed by its path: equal fingerprints, equal results."""
    digests = {}
    for folder in folders:
        for path in sorted((project / folder).rglob("*")):
            if path.is_file():
                digests[path.relative_to(project).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def cache_fingerprint(project: Path) -> dict[str, str]:
    """The same over the DVC cache: a failed transfer must leave every object in it as it was."""
    cache = project / ".dvc" / "cache"
    return {
        path.relative_to(cache).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(cache.rglob("*"))
        if path.is_file()
    }


def locked_md5(project: Path, stage: str, out: str) -> str:
    """The md5 that dvc.lock records for output `out` of `stage`."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(item["md5"] for item in lock["stages"][stage]["outs"] if item["path"] == out)


def object_md5(project: Path, directory_md5: str, relpath: str) -> str:
    """The md5 of file `relpath` inside a directory output, read from the directory's .dir object."""
    listing = project / ".dvc" / "cache" / "files" / "md5" / directory_md5[:2] / directory_md5[2:]
    return next(entry["md5"] for entry in json.loads(listing.read_text()) if entry["relpath"] == relpath)


def object_key(md5: str) -> str:
    """Where DVC 3 stores an object under a remote's (or cache's) root."""
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def is_clean(project: Path) -> bool:
    return "Data and pipelines are up to date." in dvc(project, "status").stdout
