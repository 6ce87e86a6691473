"""The four DVC stages of the pipeline (download, preprocess, train, evaluate), their core and commands.

Each stage is `python -m stages.<name>`, a thin shell whose `main()` reads its params and paths, calls the
core (`stages.core`: the logic, which knows no params key and no DVC command) and writes its outputs
atomically; `stages.cli` turns the core's exceptions into one-line messages. `stages.commands` holds
commands a user runs by hand. The one thing done on import is pinning the CPU numerics, which must happen
before torch loads (see stages/numerics.py).
"""

from stages import numerics

numerics.pin()
