"""PSF measurements on pixel PSF images (numpy/scipy only)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["measure_fwhm_px"]


def measure_fwhm_px(psf: np.ndarray, *, upsample: int = 4) -> float:
    """FWHM in pixels of a centred PSF image, from the area above half maximum.

    ``FWHM = 2 sqrt(A / pi)`` for the area ``A`` where the (bilinearly
    upsampled) image is at least half its peak: exact for a circular profile of
    any shape, the geometric mean of the axes for an elliptical one.
    """
    psf = np.asarray(psf, dtype=float)
    if psf.ndim != 2 or not np.isfinite(psf).all() or psf.max() <= 0:
        raise ValueError(f"PSF image must be a finite 2-D array with a positive peak; got shape {psf.shape}")
    fine = ndimage.zoom(psf, upsample, order=1, grid_mode=False)
    area_px = np.count_nonzero(fine >= 0.5 * fine.max()) / upsample**2
    return 2.0 * math.sqrt(area_px / math.pi)
