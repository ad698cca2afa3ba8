"""Figures for people to look at. matplotlib is imported only when a figure is made."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["rgb_indices", "color_composite", "cutout_gallery", "roc_plot", "score_histograms", "reliability_plot",
           "reliability_bins", "value_histogram"]


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    _pyplot().close(fig)
    return path


def roc_plot(curves: dict, path: Path) -> Path:
    """ROC curves, FPR on a log axis (the low-FPR end is where lens searches live).

    ``curves``: name -> (labels, scores).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        n_neg = int((np.asarray(y) == 0).sum())
        ax.step(np.maximum(fpr, 1.0 / max(n_neg, 1) / 2), tpr, where="post",
                label=f"{name} (AUROC {roc_auc_score(y, s):.3f}, {n_neg} non-lenses)")
    ax.set_xscale("log")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def score_histograms(panels: dict, path: Path, *, xlabel: str = "ensemble logit") -> Path:
    """Score distributions of lenses and non-lenses, one panel per ``name -> (labels, scores)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), squeeze=False)
    for ax, (name, (y, s)) in zip(axes.flat, panels.items()):
        y, s = np.asarray(y), np.asarray(s, dtype=float)
        bins = np.linspace(s.min(), s.max(), 41) if s.max() > s.min() else 10
        ax.hist(s[y == 0], bins=bins, histtype="step", color="tab:gray", label=f"non-lenses ({(y == 0).sum()})")
        ax.hist(s[y == 1], bins=bins, histtype="step", color="tab:blue", label=f"lenses ({(y == 1).sum()})")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    return _save(fig, path)


def reliability_bins(labels, probs, *, n_bins: int = 15):
    """(mean probability, observed lens rate, count) in equal-mass bins, as ECE uses them."""
    y, p = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    order = np.argsort(p, kind="stable")
    chunks = [c for c in np.array_split(order, min(n_bins, len(p))) if len(c)]
    return (np.array([p[c].mean() for c in chunks]), np.array([y[c].mean() for c in chunks]),
            np.array([len(c) for c in chunks]))


def reliability_plot(curves: dict, path: Path, *, n_bins: int = 15) -> Path:
    """Reliability diagram (equal-mass bins): observed lens rate against mean predicted probability.

    ``curves``: name -> (labels, probabilities), e.g. before and after calibration.
    """
    from lens_assets.science.metrics import expected_calibration_error

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="perfect")
    for name, (y, p) in curves.items():
        mp, rate, _ = reliability_bins(y, p, n_bins=n_bins)
        ax.plot(mp, rate, marker="o", ms=3, label=f"{name} (ECE {expected_calibration_error(y, p):.3f})")
    ax.set_xlabel("mean predicted lens probability")
    ax.set_ylabel("observed lens fraction")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def value_histogram(values, path: Path, *, xlabel: str, title: str = "", bins: int = 40) -> Path:
    """One histogram (log counts), e.g. the calibrated scores of a survey drop."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    v = np.asarray(values, dtype=float)
    ax.hist(v, bins=np.linspace(0, 1, bins + 1) if v.size and v.min() >= 0 and v.max() <= 1 else bins,
            color="tab:blue", histtype="stepfilled", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
