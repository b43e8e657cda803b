"""Errors that every layer may raise and the entry points turn into one line and an exit code."""


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback (lamamba_dist/cli.py)."""


class DataError(RuntimeError):
    """The data cannot be served as configured (bad layout, too many bad samples, mismatched state)."""


class TrainingError(RuntimeError):
    """A run that cannot start or continue for a reason the user can fix (config, checkpoint, folder)."""


class SaveError(TrainingError):
    """Writing a checkpoint failed (disk full, permission, storage gone): the run ends with exit 1, the earlier
    checkpoints intact."""
