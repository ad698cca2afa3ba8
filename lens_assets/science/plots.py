"""Figures for people to look at. matplotlib is imported only when a figure is made."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["rgb_indices", "color_composite", "cutout_gallery"]


def rgb_indices(bands: Sequence[str]) -> tuple[int, int, int]:
    """Indices of the bands shown as R, G, B: i, r, g where the survey has them, else the
    reddest, middle and bluest band (bands are listed blue to red)."""
    lower = [b.lower() for b in bands]
    if all(b in lower for b in "irg"):
        return lower.index("i"), lower.index("r"), lower.index("g")
    n = len(bands)
    return n - 1, n // 2, 0


def color_composite(image: np.ndarray, bands: Sequence[str], *, stretch: float | None = None,
                    q: float = 8.0) -> np.ndarray:
    """An (H, W, 3) uint8 asinh (Lupton et al. 2004) composite of a (bands, H, W) cutout.

    ``stretch`` defaults to a robust scale of the image.
    """
    from astropy.visualization import make_lupton_rgb

    img = np.asarray(image, dtype=float)
    if img.ndim != 3 or img.shape[0] != len(bands):
        raise ValueError(f"cutout must be (bands, H, W) with {len(bands)} bands, got shape {img.shape}")
    r, g, b = (img[i] for i in rgb_indices(bands))
    if stretch is None:
        stretch = max(float(np.percentile(np.stack([r, g, b]), 99.5)) / 4.0, 1e-12)
    return make_lupton_rgb(r, g, b, stretch=stretch, Q=q)


def cutout_gallery(cutouts: Sequence[np.ndarray], bands: Sequence[str], titles: Sequence[str],
                   path: Path, *, ncols: int = 6,
                   panel_in: float = 1.6) -> Path:
    """Write a grid of colour composites with titles to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cutouts)
    if n == 0:
        raise ValueError("cutout_gallery needs at least one cutout")
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_in * ncols, panel_in * nrows + 0.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, cutouts, titles):
        ax.imshow(color_composite(img, bands), origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=6)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
