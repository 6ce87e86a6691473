"""Helpers for the sharing tests: the two remotes, a bare git origin, teammates' clones, and fingerprints of
what they hold."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from helpers import dvc, make_tiny_project, run, set_params
from s3server import ACCESS_KEY, REGION, SECRET_KEY, WeedServer

CODE_TAG = "code"  # the origin's first commit: the pipeline without any results
SHARED = ("data", "models", "metrics")  # everything a pipeline run produces
S3 = pytest.param("s3", marks=[pytest.mark.server, pytest.mark.s3])  # conftest.py's `remote` fixture, on S3


class LocalRemote:
    """The default remote of .dvc/config, untouched: a folder under `~`, with zero set-up."""

    name = "local-storage"

    def __init__(self, home: Path) -> None:
        self.root = home / "dvc-storage" / "mnist-dvc-pipeline"  # the url in .dvc/config, under this `~`

    def configure(self, project: Path) -> None:
        pass  # .dvc/config already names it

    def set_credentials(self, project: Path) -> None:
        pass

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        (self.root / key).chmod(0o644)  # DVC leaves what it stores read-only
        (self.root / key).write_bytes(data)

    def listing(self, folder: str) -> list[str]:
        return sorted(path.name for path in (self.root / folder).iterdir())


class S3Remote:
    """A bucket on a real S3 server (SeaweedFS's `weed`), committed to .dvc/config as a team would commit it
    (url, endpointurl, region, verify); each clone's keys go in its own .dvc/config.local, which git ignores."""

    name = "team"
    bucket = "team-results"
    prefix = "mnist"
    url = f"s3://{bucket}/{prefix}"

    def __init__(self, server: WeedServer) -> None:
        self.server = server

    def configure(self, project: Path) -> None:
        dvc(project, "remote", "add", "--default", self.name, self.url)
        dvc(project, "remote", "modify", self.name, "endpointurl", self.server.endpoint)
        dvc(project, "remote", "modify", self.name, "region", REGION)
        dvc(project, "remote", "modify", self.name, "verify", "true")
        run(project, "git", "commit", "-qam", "share results through the team's S3 bucket")

    def set_credentials(self, project: Path, secret: str = SECRET_KEY, access_key: str = ACCESS_KEY) -> None:
        """Keys for this clone only: .dvc/config.local is ignored by git."""
        dvc(project, "remote", "modify", "--local", self.name, "access_key_id", access_key)
        dvc(project, "remote", "modify", "--local", self.name, "secret_access_key", secret)

    def read(self, key: str) -> bytes:
        return self.server.filesystem().cat(f"{self.bucket}/{self.prefix}/{key}")

    def write(self, key: str, data: bytes) -> None:
        self.server.filesystem().pipe(f"{self.bucket}/{self.prefix}/{key}", data)

    def listing(self, folder: str) -> list[str]:
        return sorted(Path(path).name for path in self.server.filesystem().ls(f"{self.bucket}/{self.prefix}/{folder}"))

    def everything(self) -> list[str]:
        """Every object in the bucket, to tell that a check left nothing behind."""
        return sorted(self.server.filesystem().find(self.bucket))


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


def teammate(remote: LocalRemote | S3Remote, origin: Path, where: Path, branch: str = "main") -> Path:
    """A fresh clone with this clone's keys for the remote (where it needs any)."""
    project = clone(origin, where, branch)
    remote.set_credentials(project)
    return project


def teammate_editing_at_checkout(remote: LocalRemote | S3Remote, origin: Path, where: Path, **changes: object) -> Path:
    """A teammate who sets params (to values of the same length) in the very second git checked params.yaml
    out, as a script does: git then sees the edit only through its racy-clean check (same size, same mtime
    to the second), which holds as long as nothing but git rewrites the index. The edit is retried in a
    fresh clone until it lands in that second."""
    clones = 5
    for _ in range(clones):
        time.sleep(1 - time.time() % 1)  # the start of a second: the clone and the edit fit in the rest
        project = clone(origin, where)
        checked_out = (project / "params.yaml").stat()
        set_params(project, **changes)
        edited = (project / "params.yaml").stat()
        assert edited.st_size == checked_out.st_size, "the edit must keep params.yaml's size"
        if int(edited.st_mtime) == int(checked_out.st_mtime):
            remote.set_credentials(project)  # after the edit: it runs dvc, which takes most of a second
            return project
        shutil.rmtree(project)
    raise AssertionError(f"params.yaml was never edited within the second of its checkout ({clones} clones)")


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


def assert_clean(project: Path) -> None:
    """`dvc status` finds nothing to rerun; else the assertion shows what it found, and each params section
    whose values differ between params.yaml and dvc.lock, with both (a rare failure of
    test_new_params_reach_teammate says only `params.yaml: modified: train`)."""
    status = dvc(project, "status").stdout
    if "Data and pipelines are up to date." in status:
        return
    params = yaml.safe_load((project / "params.yaml").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    differ = {
        name: {"params.yaml": params.get(section), "dvc.lock": value}
        for name, stage in lock.items()
        for section, value in stage.get("params", {}).get("params.yaml", {}).items()
        if params.get(section) != value
    }
    log = run(project, "git", "log", "--format=%h %s", "-3").stdout
    raise AssertionError(f"{status}\nparams that differ: {differ}\ngit log:\n{log}")
