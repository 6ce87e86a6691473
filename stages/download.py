"""Stage `download`: acquire the dataset named by `data.dataset`, verify every file, write `data/raw/`.

A registered dataset (stages/datasets.yaml) is fetched from its mirrors (`data.mirrors` first); each file is
accepted only when its checksum matches, and stored decompressed (stages/core/fetch.py). A folder of
labelled pictures (`<folder>/train/<class>/...`, `<folder>/test/<class>/...`) is framed into the same IDX
files, with a manifest listing every picture (stages/core/folders.py, docs/own-images.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from stages.cli import StageError, argument_parser, explained, run, stage_deps, warn
from stages.core.datasets import Manifest, load_registry, lookup, write_manifest
from stages.core.fetch import SCHEMES, fetch_file, prepare_folder
from stages.core.folders import FOLDER_FRAME, UnreadablePicture, acquire
from stages.params import Params, load_section, require


class DataParams(Params):
    """`data`: what the download stage fetches, and from where."""

    dataset: str  # a name in stages/datasets.yaml, or a folder of labelled pictures
    mirrors: tuple[str, ...]  # tried before the registry's own mirrors: URLs or local directories
    timeout_s: float  # per connection attempt and per read
    retries: int  # extra attempts per mirror after a transient error (5xx, reset, timeout, short body)
    unreadable: Literal["stop", "skip"]  # a folder's picture that cannot be read: stop there, or leave it out

    def check(self) -> None:
        require(self.timeout_s > 0, "data.timeout_s", "must be > 0")
        require(self.retries >= 0, "data.retries", "must be >= 0")
        for index, mirror in enumerate(self.mirrors):
            check_mirror(f"data.mirrors[{index}]", mirror)


def check_mirror(key: str, mirror: str) -> None:
    """Refuse, before anything is fetched, a mirror that could only fail or be misread."""
    require(mirror.strip() != "", key, "is empty; give an https://, http://, file:// URL or a local directory")
    parsed = urlparse(mirror)
    require(
        parsed.scheme in (*SCHEMES, ""),
        key,
        f"{mirror!r} has unsupported scheme '{parsed.scheme}:'; use https://, http://, file:// or a local directory",
    )
    # file://data/mnist would silently mean the path /mnist on a host called "data".
    require(
        parsed.scheme != "file" or parsed.netloc in ("", "localhost"),
        key,
        f"{mirror!r} names a host; a file:// URL needs an absolute path, e.g. file:///srv/datasets/mnist/",
    )


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the verified IDX files")
    args = parser.parse_args()
    params = load_section(args.params, "data", DataParams)
    registry = load_registry()
    if params.dataset not in registry:
        write_manifest(args.out, acquire_folder(Path(params.dataset), args.out, params.unreadable))
        return
    dataset = registry[params.dataset]
    mirrors = [*params.mirrors, *dataset.mirrors]

    prepare_folder(args.out, dataset)
    with explained(fix="add a reachable mirror to data.mirrors in params.yaml"):
        for spec in dataset.files.values():
            fetch_file(spec, mirrors, args.out, timeout_s=params.timeout_s, retries=params.retries)
    write_manifest(args.out, Manifest.for_dataset(dataset))  # last: it says the folder is complete


def acquire_folder(folder: Path, out: Path, unreadable: str) -> Manifest:
    """The pictures of `folder` framed into `out`; `unreadable` says what a picture that cannot be read does."""
    skip = None if unreadable == "stop" else lambda file, problem: warn(f"{folder / file}: left out: {problem}")
    with explained("data.dataset"):
        if not folder.is_dir():
            lookup(str(folder))  # the line that lists the registered names, and says that a folder works too
        prepare_folder(out, None)
        try:
            manifest = acquire(folder, out, FOLDER_FRAME, skip)
        except UnreadablePicture as error:
            raise StageError(f"{error}; fix or remove it, or set data.unreadable: skip") from None
    warn_if_unseen(folder, stage_deps())
    return manifest


def warn_if_unseen(folder: Path, deps: list[Path] | None) -> None:
    """Under DVC, a folder that no dep of this stage holds is never seen to change: a changed picture would
    rerun nothing. Say so at every run that reads it, with the command that makes DVC see it."""
    if deps is None or any(folder.resolve().is_relative_to(dep.resolve()) for dep in deps):
        return
    root, name = Path(os.environ["DVC_ROOT"]).resolve(), folder.resolve().name
    if folder.resolve().is_relative_to(root):
        fix = f"move it into pictures/ and version it: dvc add pictures/{name}"
    else:
        fix = f"import it into the project: dvc import-url {folder.resolve()} pictures/{name}"
    warn(
        f"data.dataset: DVC does not see {folder} (no dep of download holds it): a changed picture there "
        f"reruns nothing; {fix}, and set data.dataset: pictures/{name} (docs/own-images.md)"
    )


if __name__ == "__main__":
    run(main)
