"""Flux normalization: nanomaggies, flux-conserving resampling to the survey grid, centre pad and crop.

A cutout smaller than the survey grid (it still covers ``min_cutout_arcsec``, or
the reader would have refused it) is resampled first and then centre-padded to
``cutout_size_px`` with zero image and zero variance: zero variance is the
contract's "no data", as for a missing band or a NaN pixel with a variance map.
PSF matching then convolves zeros beyond the footprint (linear convolution, no
wrap-around), so after matching the padding is non-zero only within the kernel
radius of the footprint's edge, where the PSF spreads the real pixels' flux and
variance.

No min-max scaling and no 8-bit anywhere: images stay float32 in nanomaggies so
faint arcs keep their dynamic range. Every function returns new arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fits_contract import RESAMPLE_TOLERANCE, Cutout, size_on_survey_grid
from .fits_validation import pad_at
from .surveys import SurveySpec

__all__ = ["overlap_matrix", "resample_flux", "center_crop", "center_pad", "NormalizedCutout", "normalize_cutout",
           "RESAMPLE_TOLERANCE"]


def overlap_matrix(n_in: int, scale_in: float, n_out: int, scale_out: float) -> np.ndarray:
    """(n_out, n_in) fraction of each input pixel falling in each output pixel, grids centred on each other.

    Rows sum to the output pixel's coverage in input pixels; columns sum to 1
    where the output grid covers the input pixel, so ``W @ x`` conserves flux.
    """
    edges_in = (np.arange(n_in + 1) - n_in / 2) * scale_in
    edges_out = (np.arange(n_out + 1) - n_out / 2) * scale_out
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(hi - lo, 0.0, None) / scale_in


def resample_flux(image: np.ndarray, scale_in: float, scale_out: float, *, variance: np.ndarray | None = None,
                  out_size: int | None = None):
    """Resample the last two axes from ``scale_in`` to ``scale_out`` arcsec/px by exact area overlap.

    Total flux inside the common footprint is conserved (pixels are treated as
    uniform boxes). Variance goes through the squared weights (pixels are
    independent before resampling). Returns ``(image, variance)``.
    """
    h, w = image.shape[-2:]
    if out_size is None:
        out_size = int(np.floor(h * scale_in / scale_out))
    wy = overlap_matrix(h, scale_in, out_size, scale_out)
    wx = overlap_matrix(w, scale_in, out_size, scale_out)
    out = np.einsum("yi,...ij,xj->...yx", wy, np.asarray(image, dtype=np.float64), wx)
    var = None
    if variance is not None:
        var = np.einsum("yi,...ij,xj->...yx", wy**2, np.asarray(variance, dtype=np.float64), wx**2)
    return out, var


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` of the last two axes (a view)."""
    h, w = array.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {h}x{w} to {size}x{size}")
    y, x = (h - size) // 2, (w - size) // 2
    return array[..., y:y + size, x:x + size]


def center_pad(array: np.ndarray, size: int) -> np.ndarray:
    """A new array whose last two axes are ``size`` x ``size`` with ``array`` in the centre and zeros around.

    The offset is ``(size - h) // 2``, the same rounding as :func:`center_crop`, so
    ``center_crop(center_pad(a, s), a.shape[-1])`` is ``a``.
    """
    h, w = array.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} to {size}x{size}")
    return pad_at(array, size, ((size - h) // 2, (size - w) // 2))


@dataclass
class NormalizedCutout:
    """A cutout in nanomaggies on the survey's pixel grid (not yet cropped: PSF matching needs the margin)."""

    image: np.ndarray  # (B, H, W) float32 (float64 when resampled), nanomaggies
    variance: np.ndarray  # (B, H, W) nanomaggies^2
    psf: list  # per band: PSF image on the survey grid, or None
    resampled: bool
    padded: bool = False  # centre-padded with zeros (image and variance) to the survey's cutout size
    footprint_px: int = 0  # side of the file's data on the survey grid (before padding)


def normalize_cutout(c: Cutout, survey: SurveySpec) -> NormalizedCutout:
    """Convert to nanomaggies; if the pixel scale differs by more than 1%, resample to the survey's; if the
    result is smaller than the survey's cutout size, centre-pad it with zeros (image and variance) to it."""
    scale = c.nmgy_per_unit[:, None, None].astype(np.float32)
    image = c.image * scale  # float32, new arrays
    variance = c.variance * scale**2
    psfs = list(c.psf)
    resampled = abs(c.pixel_scale_arcsec / survey.pixel_scale_arcsec - 1.0) > RESAMPLE_TOLERANCE
    if resampled:
        image, variance = resample_flux(image, c.pixel_scale_arcsec, survey.pixel_scale_arcsec, variance=variance,
                                        out_size=size_on_survey_grid(c.image.shape[-1], c.pixel_scale_arcsec, survey))
        new_psfs = []
        for p in psfs:
            if p is None:
                new_psfs.append(None)
                continue
            size = int(np.floor(p.shape[0] * c.pixel_scale_arcsec / survey.pixel_scale_arcsec))
            size -= 1 - size % 2  # odd
            rp, _ = resample_flux(p, c.pixel_scale_arcsec, survey.pixel_scale_arcsec, out_size=max(size, 3))
            new_psfs.append(rp / rp.sum())
        psfs = new_psfs
    footprint = int(image.shape[-1])
    padded = footprint < survey.cutout_size_px
    if padded:
        image, variance = center_pad(image, survey.cutout_size_px), center_pad(variance, survey.cutout_size_px)
    return NormalizedCutout(image=image, variance=variance, psf=psfs, resampled=resampled, padded=padded,
                            footprint_px=footprint)
