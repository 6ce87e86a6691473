"""Commands a user runs by hand, which are not pipeline stages: `python -m stages.commands.<name>`."""
