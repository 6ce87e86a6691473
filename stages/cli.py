"""What every stage's command line shares: argument parsing, params loading and the error contract.

A user error (bad params, missing files, unreachable mirrors) ends the stage with one line on stderr that
names the problem and the fix, and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from stages import numerics


class StageError(Exception):
    """A problem the user can fix: its message is the one line they see."""


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    return parser


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning a StageError into one line on stderr and exit status 1."""
    for name, value in numerics.OVERRIDDEN.items():
        warn(
            f"{name}={value} from the environment ignored: every stage runs with {name}={numerics.PINNED[name]}, "
            "so that any x86-64 CPU computes the same bytes (README, Reproducibility)"
        )
    try:
        main()
    except StageError as error:
        print(f"{prog()}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def prog() -> str:
    return Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "stage"


def warn(message: str) -> None:
    print(f"{prog()}: warning: {message}", file=sys.stderr)


def numerics_in_effect() -> dict[str, str | None]:
    """The numerics this stage computes with (for the model card); a warning when they are not the pinned ones."""
    current = numerics.settings()
    if not numerics.is_pinned(current):
        warn(
            f"this machine computes with other numerics ({platform.machine()}, "
            f"{', '.join(f'{key} {value}' for key, value in current.items())}) than the pinned x86-64 AVX2 ones: "
            "the bytes will differ from a dvc.lock made there; see README, Reproducibility"
        )
    return current
