"""The four DVC stages of the pipeline (download, preprocess, train, evaluate) and the modules they share.

Nothing here does work on import: each stage is `python -m stages.<name>`, whose `main()` reads its params
and paths, calls pure functions and writes its outputs atomically.
"""
