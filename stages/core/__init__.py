"""The pipeline's logic: reading, checking, training, scoring and writing, with no command line.

Modules here do nothing on import and can be tested without files. They raise the exceptions of
`stages.core.errors`, which describe the problem in the data's own terms; they never name a params key or
a DVC command. The stage shells (`stages/<stage>.py`) read params and paths, call in here, and turn those
exceptions into the one-line messages a user sees (`stages.cli`). Importing `stages.core` runs
`stages/__init__.py` first, which pins the CPU numerics before torch loads.
"""
