"""Errors about the user's input or run, each naming the file, key or value at fault.

The CLI prints these as one line and exits 2, without a traceback; anything else is a bug and
keeps its traceback.
"""


class PipelineError(Exception):
    """Base class for errors a user can act on."""


class RecipeError(PipelineError, ValueError):
    """A recipe file or override that cannot be used."""


class DataError(PipelineError):
    """A dataset that is missing, malformed or holds unreadable files."""


class TrainingError(PipelineError):
    """A run that had to stop, e.g. a non-finite loss (the message names the step)."""


class CheckpointError(PipelineError):
    """A checkpoint that is missing or does not match the recipe."""


class TrackingError(PipelineError):
    """A tracking store that is required but does not answer, or a journal that cannot be sent."""
