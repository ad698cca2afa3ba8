"""Sky noise of a cutout band that comes without a variance map.

:func:`sky_noise` masks the sources and measures the noise on the sky pixels
that remain; :func:`sky_noise_sigma` returns just the standard deviation and
:func:`derived_variance` builds the variance map the FITS reader stores (sky,
plus the sources' Poisson term when the file gives a gain).

A galaxy covering a fifth of a stamp biases a whole-stamp MAD high (its wings
are neither clipped nor noise); masking it first keeps the estimate on the sky.
The steps, all numpy/scipy (photutils' ``detect_sources`` does the same and
costs ~9 ms per 64 px stamp, 20x this):

1. median and 1.4826 x MAD of the valid pixels (first guess: biased high by the
   sources, which only makes the first detection conservative);
2. detect: smooth with a Gaussian of ``smooth_sigma_px``, keep pixels above
   the median by ``n_sigma`` times the *smoothed* noise, drop connected groups
   smaller than ``min_group_px``, dilate the rest by ``dilate_px``;
3. sigma-clipped median and std of the pixels outside that mask; steps 2-3 run
   ``iterations`` times (one is enough: over 20 noise seeds a second pass moved
   the mean error on a 20%-covering galaxy from +0.2% to -0.7%, and costs 60% more).

The clipped std of a Gaussian clipped at ``+-3 sigma`` is 0.98658 of its sigma
(variance of a normal truncated at c: ``1 - 2 c phi(c) / (2 Phi(c) - 1)``); the
estimate is divided by that.

Nothing here modifies its input arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SkyNoise", "sky_noise", "sky_noise_sigma", "derived_variance", "whole_stamp_mad_sigma",
           "MIN_SKY_FRACTION", "MIN_VALID_PX"]

CLIP_SIGMA = 3.0
_CLIP_STD_FACTOR = math.sqrt(1.0 - 2.0 * CLIP_SIGMA * math.exp(-0.5 * CLIP_SIGMA**2) / math.sqrt(2.0 * math.pi)
                             / math.erf(CLIP_SIGMA / math.sqrt(2.0)))  # 0.98658 at 3 sigma
MIN_SKY_FRACTION = 0.1  # below this fraction of valid pixels left as sky, the estimate uses all valid pixels
MIN_VALID_PX = 16  # fewer valid pixels than this: no estimate


@dataclass(frozen=True)
class SkyNoise:
    """A sky estimate: ``sigma`` and ``median`` in the image's units."""

    sigma: float
    median: float
    n_sky_px: int  # pixels the final estimate used
    n_valid_px: int  # finite, unmasked pixels of the image
    source_masked: bool  # False: too few sky pixels were left, the estimate is over all valid pixels


def _clipped_stats(values: np.ndarray) -> tuple[float, float]:
    """Median and Gaussian-equivalent sigma of ``values`` (1-D) after iterative 3-sigma clipping."""
    from astropy.stats import sigma_clipped_stats

    _, median, std = sigma_clipped_stats(values, sigma=CLIP_SIGMA, maxiters=10)
    return float(median), float(std) / _CLIP_STD_FACTOR


def sky_noise(image: np.ndarray, *, mask: np.ndarray | None = None, n_sigma: float = 2.0,
              smooth_sigma_px: float = 1.0, min_group_px: int = 5, dilate_px: int = 2,
              iterations: int = 1) -> SkyNoise:
    """Sky median and noise sigma of a 2-D ``image`` from its source-free pixels.

    ``mask`` (bool, same shape) marks pixels to leave out (True = bad); non-finite
    pixels are left out too. Raises ``ValueError`` when fewer than
    :data:`MIN_VALID_PX` pixels are valid, or when the valid pixels are constant
    (sigma 0: there is no noise to measure, and a zero variance would make every
    pixel infinitely significant; the reader quarantines such a band).
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    valid = np.isfinite(img)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != img.shape:
            raise ValueError(f"mask has shape {mask.shape}, image {img.shape}")
        valid &= ~mask
    n_valid = int(valid.sum())
    if n_valid < MIN_VALID_PX:
        raise ValueError(f"only {n_valid} valid pixels (at least {MIN_VALID_PX} are needed)")
    values = img[valid].astype(np.float64)
    median = float(np.median(values))
    sigma = 1.482602 * float(np.median(np.abs(values - median)))  # first guess; detection only needs its scale
    if not sigma > 0.0:
        median, sigma = _clipped_stats(values)  # a MAD of 0 with noise in the tails (e.g. >half the pixels equal)
    if not sigma > 0.0:
        raise ValueError(f"the sky of the {n_valid} valid pixels is constant (value {median:.6g}): no sky noise "
                         f"to measure")
    filled = np.where(valid, img, median).astype(np.float64)
    smoothed = ndimage.gaussian_filter(filled, smooth_sigma_px, mode="nearest")
    # a normalized 2-D Gaussian of sigma s has sum(k^2) = 1 / (4 pi s^2): the smoothed noise is that much lower
    smooth_factor = 1.0 / (2.0 * math.sqrt(math.pi) * smooth_sigma_px) if smooth_sigma_px > 0 else 1.0
    structure = ndimage.generate_binary_structure(2, 1)
    sky = valid
    source_masked = True
    for _ in range(iterations):
        above = smoothed > median + n_sigma * sigma * smooth_factor
        labels, n = ndimage.label(above, structure=structure)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_group_px
            keep[0] = False
            sources = keep[labels]
            if dilate_px > 0 and sources.any():
                sources = ndimage.binary_dilation(sources, structure=structure, iterations=dilate_px)
        else:
            sources = np.zeros_like(above)
        candidate = valid & ~sources
        if candidate.sum() < max(MIN_VALID_PX, MIN_SKY_FRACTION * n_valid):
            source_masked = False
            sky = valid
            median, sigma = _clipped_stats(values)
            break
        sky = candidate
        median, sigma = _clipped_stats(img[sky].astype(np.float64))
        if not sigma > 0.0:
            raise ValueError(f"the sky of the {n_valid} valid pixels is constant (value {median:.6g}): no sky "
                             f"noise to measure")
    return SkyNoise(sigma=sigma, median=median, n_sky_px=int(sky.sum()), n_valid_px=n_valid,
                    source_masked=source_masked)


def sky_noise_sigma(image: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """The sky noise standard deviation of ``image`` (its units): :func:`sky_noise`'s ``sigma``."""
    return sky_noise(image, mask=mask).sigma


def derived_variance(image: np.ndarray, sky: SkyNoise, *, gain_e_per_unit: float | None = None) -> np.ndarray:
    """Per-pixel variance (image units squared, float32) for a band without a variance map.

    Sky only: ``sigma**2`` everywhere. With a gain (electrons per image unit) the
    sources' Poisson term is added: ``max(image - sky median, 0) / gain``
    (``N`` electrons have variance ``N``, i.e. ``flux / gain`` in image units).
    Non-finite pixels get the sky variance.
    """
    img = np.asarray(image)
    var = np.full(img.shape, sky.sigma**2, dtype=np.float32)
    if gain_e_per_unit is not None:
        if not (gain_e_per_unit > 0 and math.isfinite(gain_e_per_unit)):
            raise ValueError(f"gain must be positive and finite, got {gain_e_per_unit}")
        excess = np.where(np.isfinite(img), img.astype(np.float64) - sky.median, 0.0)
        var += (np.clip(excess, 0.0, None) / gain_e_per_unit).astype(np.float32)
    return var


def whole_stamp_mad_sigma(image: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """The estimate the reader used before :func:`sky_noise`: 1.4826 x the MAD of every valid pixel.

    Kept for comparison (tests, benchmarks): a galaxy on the stamp biases it high.
    """
    img = np.asarray(image)
    valid = np.isfinite(img) if mask is None else np.isfinite(img) & ~np.asarray(mask, dtype=bool)
    good = img[valid].astype(np.float64)
    return float(1.4826 * np.median(np.abs(good - np.median(good))))
