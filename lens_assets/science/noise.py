"""Sky noise of a cutout band that comes without a variance map.

:func:`sky_noise` masks the sources and measures the noise on the sky pixels
that remain; :func:`sky_noise_sigma` returns just the standard deviation and
:func:`derived_variance` builds the variance map the FITS reader stores (sky,
plus the sources' Poisson term when the file gives a gain).

A galaxy covering a fifth of a stamp biases a whole-stamp MAD high (its wings
are neither clipped nor noise); masking it first keeps the estimate on the sky.
The steps, all numpy/scipy (photutils' ``detect_sources`` does the same and
costs ~9 ms per 64 px stamp, about 40x this):

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
estimate is divided by that. The medians, the clipping (astropy's
``sigma_clipped_stats`` figures), the smoothing and the dilation are computed
with one sort, partitions, a cached kernel and shifted ORs; they give the
figures of ``np.median``, astropy and ``scipy.ndimage`` to the last bit (tested).

Nothing here modifies its input arrays.
"""

from __future__ import annotations

import functools
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
_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connected: sources are grouped and grown with it
_CROSS.flags.writeable = False


@dataclass(frozen=True)
class SkyNoise:
    """A sky estimate: ``sigma`` and ``median`` in the image's units."""

    sigma: float
    median: float
    n_sky_px: int  # pixels the final estimate used
    n_valid_px: int  # finite, unmasked pixels of the image
    source_masked: bool  # False: too few sky pixels were left, the estimate is over all valid pixels


def _clipped_stats(values: np.ndarray, order: np.ndarray | None = None) -> tuple[float, float]:
    """Median and Gaussian-equivalent sigma of ``values`` (1-D, finite) after iterative 3-sigma clipping.

    The same figures as astropy's ``sigma_clipped_stats(values, sigma=3, maxiters=10)`` (median centre,
    population std; each pass keeps ``median - 3 std <= v <= median + 3 std`` of what the last pass kept,
    until a pass keeps everything or after 10 passes), without its per-call overhead and its full
    ``np.median`` of every pass: what a pass keeps is a contiguous run of the values sorted once, so each
    median is read off that run; the std is taken over the kept values in their original order, as
    astropy takes it, so the result is the same to the last bit. ``order``: ``np.sort(values)`` when the
    caller has it.
    """
    if order is None:
        order = np.sort(values)
    data, lo, hi = values, 0, values.size
    median, std = _run_median(order, lo, hi), data.std()
    for _ in range(10):
        low, high = median - std * CLIP_SIGMA, median + std * CLIP_SIGMA
        new_lo = max(lo, int(order.searchsorted(low, "left")))  # within the run the last pass kept
        new_hi = min(hi, int(order.searchsorted(high, "right")))
        if new_lo == lo and new_hi == hi:  # nothing clipped: converged, the figures are this pass's
            break
        lo, hi = new_lo, new_hi
        data = data[(data >= low) & (data <= high)]
        median, std = _run_median(order, lo, hi), data.std()
    return float(median), float(std) / _CLIP_STD_FACTOR


def _run_median(order: np.ndarray, lo: int, hi: int):
    """``np.median`` of ``order[lo:hi]`` (sorted): the middle value, or the mean of the two middle ones, summed
    from 0.0 as ``np.mean`` sums (a median of -0.0 comes out 0.0, as numpy gives it)."""
    n = hi - lo
    k = lo + n // 2
    return 0.0 + order[k] if n % 2 else (0.0 + order[k - 1] + order[k]) / 2.0


def _median(values: np.ndarray):
    """``np.median`` of a 1-D array without NaNs, by one partition (the lower middle value of an even count is
    the largest of the values below the upper one)."""
    n = values.size
    k = n // 2
    part = np.partition(values, k)
    return 0.0 + part[k] if n % 2 else (0.0 + part[:k].max() + part[k]) / 2.0


@functools.lru_cache(maxsize=8)
def _gaussian_kernel(sigma: float) -> np.ndarray:
    """The weights ``ndimage.gaussian_filter`` correlates with (default ``truncate=4``): its own response to a
    unit impulse, so they are its weights to the last bit."""
    radius = int(4.0 * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    kernel = ndimage.gaussian_filter1d(impulse, sigma, mode="constant")
    kernel.flags.writeable = False
    return kernel


def _gaussian_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """``ndimage.gaussian_filter(image, sigma, mode="nearest")`` of a 2-D float64 image, with the same two
    ``correlate1d`` passes (rows, then columns in place) and weights, without rebuilding the kernel per call."""
    if not sigma > 1e-15:  # gaussian_filter leaves such an axis alone; let it decide
        return ndimage.gaussian_filter(image, sigma, mode="nearest")
    kernel = _gaussian_kernel(float(sigma))
    out = np.empty_like(image)
    ndimage.correlate1d(image, kernel, 0, out, "nearest", 0.0, 0)
    ndimage.correlate1d(out, kernel, 1, out, "nearest", 0.0, 0)
    return out


def _dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``ndimage.binary_dilation(mask, structure=<4-connected cross>, iterations=iterations)`` of a 2-D mask
    (nothing outside the image is set) by shifted ORs: a small stamp is dilated in a few microseconds."""
    if not isinstance(iterations, int):
        return ndimage.binary_dilation(mask, structure=_CROSS, iterations=iterations)
    for _ in range(iterations):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


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
    n_valid = int(np.count_nonzero(valid))
    if n_valid < MIN_VALID_PX:
        raise ValueError(f"only {n_valid} valid pixels (at least {MIN_VALID_PX} are needed)")
    values = img[valid].astype(np.float64)
    order = np.sort(values)  # the median off the sorted values, the MAD by one partition: np.median's figures
    median = float(_run_median(order, 0, order.size))
    sigma = 1.482602 * float(_median(np.abs(values - median)))  # first guess; detection only needs its scale
    if not sigma > 0.0:
        median, sigma = _clipped_stats(values, order)  # a MAD of 0 with noise in the tails (>half the pixels equal)
    if not sigma > 0.0:
        raise ValueError(f"the sky of the {n_valid} valid pixels is constant (value {median:.6g}): no sky noise "
                         f"to measure")
    filled = np.where(valid, img, median).astype(np.float64)
    smoothed = _gaussian_filter(filled, smooth_sigma_px)
    # a normalized 2-D Gaussian of sigma s has sum(k^2) = 1 / (4 pi s^2): the smoothed noise is that much lower
    smooth_factor = 1.0 / (2.0 * math.sqrt(math.pi) * smooth_sigma_px) if smooth_sigma_px > 0 else 1.0
    structure = _CROSS
    sky = valid
    source_masked = True
    for _ in range(iterations):
        above = smoothed > median + n_sigma * sigma * smooth_factor
        labels, n = ndimage.label(above, structure=structure)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_group_px
            keep[0] = False
            sources = keep.take(labels)  # keep[labels]
            if dilate_px > 0 and sources.any():
                sources = _dilate_cross(sources, dilate_px)
        else:
            sources = np.zeros_like(above)
        candidate = valid & ~sources
        if np.count_nonzero(candidate) < max(MIN_VALID_PX, MIN_SKY_FRACTION * n_valid):
            source_masked = False
            sky = valid
            median, sigma = _clipped_stats(values, order)
            break
        sky = candidate
        median, sigma = _clipped_stats(img[sky].astype(np.float64))
        if not sigma > 0.0:
            raise ValueError(f"the sky of the {n_valid} valid pixels is constant (value {median:.6g}): no sky "
                             f"noise to measure")
    return SkyNoise(sigma=sigma, median=median, n_sky_px=int(np.count_nonzero(sky)), n_valid_px=n_valid,
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
