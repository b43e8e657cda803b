"""Errors that every layer may raise and the entry points turn into one line and an exit code."""


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback (lamamba_dist/cli.py)."""
