"""CAM-and-box overlays as PNG files (matplotlib, Agg backend), for MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["save_overlay"]


def save_overlay(
    path: Path,
    pixels: np.ndarray,
    cam: np.ndarray,
    gt_boxes: np.ndarray,
    cam_box: np.ndarray,
    title: str,
) -> Path:
    """Image, CAM as a translucent heat map, ground-truth boxes (green), CAM box (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(pixels)
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    for boxes, colour in ((gt_boxes, "lime"), (cam_box, "red")):
        for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
            # Inclusive pixel boxes: the outline runs along the outer edges of the pixels.
            ax.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, lw=1.5, ec=colour
                )
            )
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
