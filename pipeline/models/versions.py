"""Architecture versions: when a model's computation changes under the same name and the same
parameter names, its version goes up, so that weights saved for the old network cannot load
silently into the new one (a state dict would load without a single error and compute
something else).

Model files and checkpoints record `architecture_version` in their facts; a file without one
was written before versions existed, i.e. by version 1.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CheckpointError

__all__ = ["architecture_version", "check_architecture"]

# timm model name → the version this pipeline builds (absent: 1).
ARCHITECTURE_VERSIONS = {"preactresnet18": 2}
# (name, old version) → what that version computed differently.
_CHANGES = {
    ("preactresnet18", 1): (
        "its identity blocks added the raw input x, where the authors' PreActBlock (and version "
        "2) adds relu(bn1(x))"
    ),
}


def architecture_version(name: str) -> int:
    """The version of `name` that this pipeline builds."""
    return ARCHITECTURE_VERSIONS.get(name, 1)


def check_architecture(name: str, recorded: int | None, where: str | Path) -> None:
    """Raise CheckpointError when weights saved by `recorded` (None: before versions were
    recorded, so 1) do not belong to the network this pipeline builds for `name`."""
    saved = 1 if recorded is None else int(recorded)
    current = architecture_version(name)
    if saved == current:
        return
    if saved > current:
        why = "a newer pipeline wrote it; update this checkout"
    else:
        why = _CHANGES.get((name, saved), "its layers compute differently")
    raise CheckpointError(
        f"{where}: weights for {name} architecture version {saved}, but this pipeline builds "
        f"version {current} ({why}). They would load without an error and compute something "
        "else, so they are refused: train again, or use the pipeline version that wrote them."
    )
