"""The one table writer: every command that prints or saves a table (train, demo, eval, wsol,
profile, compare) writes it here, as Markdown padded to its columns' widths, so it reads in a
terminal as it renders on GitHub and in MLflow."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

__all__ = ["cell", "format_table"]

# A cell counts as a number for alignment: 12, -0.5, 1e-3, 25.56M, 1.018x, 3.2%, or a dash.
_NUMBER = re.compile(r"[-+]?(\d[\d,]*\.?\d*|\.\d+)([eE][-+]?\d+)?[%xM]?|[-–]")


def cell(value: float | None, spec: str = ".4g") -> str:
    """A number formatted with `spec`, or – where there is none (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of ready-formatted cells; columns of numbers are right-aligned."""
    body = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    for row in body:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} headers: {row}")
    widths = [max(3, len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    numeric = [
        bool(body) and all(_NUMBER.fullmatch(r[i]) for r in body) for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(cells, widths, numeric, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    dashes = (
        "-" * (w + 1) + ":" if right else "-" * (w + 2)
        for w, right in zip(widths, numeric, strict=True)
    )
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(list(headers)), rule, *map(line, body)]) + "\n"
