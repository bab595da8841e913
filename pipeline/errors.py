"""Errors about the user's input or run, each naming the file, key or value at fault.

The CLI prints these as one line and exits with the error's `exit_status` (2; 4 for storage; 5
for a rank that stopped answering), without a traceback; anything else is a bug and keeps its
traceback.
"""


class PipelineError(Exception):
    """Base class for errors a user can act on."""

    exit_status = 2


class RecipeError(PipelineError, ValueError):
    """A recipe file or override that cannot be used."""


class DataError(PipelineError):
    """A dataset that is missing, malformed or holds unreadable files."""


class TrainingError(PipelineError):
    """A run that had to stop, e.g. a non-finite loss (the message names the step)."""


class RunFolderInUse(PipelineError):
    """Another training holds the run folder's lock (two jobs on one `train.output_dir`)."""


class CollectiveTimeout(TrainingError):
    """A collective did not complete on every rank in time (a rank hung, died or lost its
    network): exit 5, which slurm/launch.sh requeues."""

    exit_status = 5


class CheckpointError(PipelineError):
    """A checkpoint that is missing or does not match the recipe."""


class StorageError(CheckpointError):
    """A checkpoint or model file that could not be written (no space, quota, permission):
    exit 4, which slurm/launch.sh does not requeue (it needs someone to free space)."""

    exit_status = 4


class TrackingError(PipelineError):
    """A tracking store that is required but does not answer, or a journal that cannot be sent."""
