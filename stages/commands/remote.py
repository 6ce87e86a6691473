"""Check that a DVC remote is reachable and accepts this clone's credentials, naming the remote if not.

`dvc push` and `dvc pull` report a refused key as, for example, "unexpected error - Forbidden: An error
occurred (403) when calling the HeadObject operation", without saying which remote or what to change.
`python -m stages.commands.remote [NAME]` reads the remote exactly as DVC does (.dvc/config, config.local, the
environment), lists it, and writes and deletes one empty probe object as a push would, turning the same
failures into one line that names the remote and the fix.
"""

from __future__ import annotations

import argparse
import uuid

from stages.cli import MACHINE_FIXES, StageError, prog, run

CREDENTIALS_FIX = (
    "set them in this clone only: `dvc remote modify --local {name} access_key_id ...` and "
    "`... secret_access_key ...`, or export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
)


def nearest_listable(fs, path: str) -> str:
    """List `path`, or its nearest existing parent: a remote folder appears only with its first push."""
    probe = path
    while True:
        try:
            fs.ls(probe)
            return probe
        except FileNotFoundError:
            parent = fs.parent(probe)
            if not parent or parent == probe:
                raise
            probe = parent


def probe_write(fs, path: str) -> None:
    """Do what a push does, on one empty object, and remove it (and any folder made for it) again."""
    probe = fs.join(path, f".dvc-push-probe-{uuid.uuid4().hex}")
    # A local or ssh remote needs its folders; object stores have none (makedirs creates nothing there).
    made = []
    if fs.protocol in ("local", "file", "ssh", "sftp", "hdfs", "webhdfs"):
        missing = path
        while not fs.exists(missing):
            made.append(missing)
            missing = fs.parent(missing)
        fs.makedirs(path, exist_ok=True)
    try:
        fs.pipe({probe: b""})
    finally:
        try:
            if fs.exists(probe):
                fs.rm(probe)
        finally:
            for folder in made:  # deepest first
                fs.rmdir(folder)


def check_remote(name: str | None) -> str:
    """Return a one-line report on remote `name` (the default remote when None); raise StageError if unusable."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with Repo() as repo:
        try:
            remote = repo.cloud.get_remote(name)
        except NoRemoteError as error:
            raise StageError(f"{error}; list the remotes with `dvc remote list`") from None
        fs, path = remote.fs, remote.path
        label = f"remote '{remote.name}' ({fs.unstrip_protocol(path)})"
        try:
            found = nearest_listable(fs, path)
        except PermissionError as error:
            raise StageError(
                f"{label} refused this clone's credentials ({error}); {CREDENTIALS_FIX.format(name=remote.name)}"
            ) from None
        except FileNotFoundError:
            raise StageError(f"{label} does not exist: create the bucket, or fix the url") from None
        except Exception as error:  # botocore and aiohttp raise their own classes for an unreachable endpoint
            raise StageError(f"{label} is unreachable: {error}; check its endpointurl and the network") from None
        try:
            probe_write(fs, path)
        except Exception as error:
            fix = MACHINE_FIXES.get(error.errno) if isinstance(error, OSError) else None
            if fix:  # a full or read-only disk under a local or ssh remote: no key helps
                raise StageError(f"{label}: {error.strerror}, so `dvc push` would fail; {fix}") from None
            raise StageError(
                f"{label} can be read but refuses writes ({type(error).__name__}: {error}), so `dvc push` "
                f"would fail; ask for write access, or use keys that have it "
                f"(`dvc remote modify --local {remote.name} ...`)"
            ) from None
    state = "reachable" if found == path else "reachable, still empty (the first `dvc push` creates it)"
    return f"{label}: {state}"


def main() -> None:
    parser = argparse.ArgumentParser(prog=prog(typed=True), description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="remote name (default: the project's default remote)")
    args = parser.parse_args()
    print(check_remote(args.name))


if __name__ == "__main__":
    run(main)
