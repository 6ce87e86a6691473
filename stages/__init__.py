"""The four DVC stages of the pipeline (download, preprocess, train, evaluate) and the modules they share.

Each stage is `python -m stages.<name>`, whose `main()` reads its params and paths, calls pure functions
and writes its outputs atomically. The one thing done on import is pinning the CPU numerics, which must
happen before torch loads (see stages/numerics.py).
"""

from stages import numerics

numerics.pin()
