"""What every stage's command line shares: argument parsing, params loading and the error contract.

A user error (bad params, missing files, unreachable mirrors) ends the stage with one line on stderr that
names the problem and the fix, and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


class StageError(Exception):
    """A problem the user can fix: its message is the one line they see."""


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    return parser


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning a StageError into one line on stderr and exit status 1."""
    try:
        main()
    except StageError as error:
        prog = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "stage"
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
