"""Colour consistency at galaxy scale: do the arcs and images around a galaxy share one source's colour?

The lensed images of one source have that source's colour (lensing is achromatic); unrelated structure around a
galaxy (companions, star-forming knots, a second nucleus) need not. The cluster track measures this on its arc
segments; this module applies the same code to a galaxy-scale cutout:

1. the deflector's light is removed and the residual structure is cut into segments by
   :func:`~lens_assets.science.clusters.segments.find_arc_segments` (``light="model"`` of the central galaxy
   alone: its elliptical-annulus medians, so its light goes and arcs and compact images stay), about the
   cutout's centre;
2. each segment's adjacent-band colours and their covariance come from
   :func:`~lens_assets.science.clusters.features.segment_colours`;
3. :func:`~lens_assets.science.clusters.features.robust_colour_consistency` solves each segment's differential
   extinction along the CCM89 reddening vector (the lens galaxy's dust reddens its images unequally, Falco et al.
   1999) and gives the share of segments consistent with one colour.

Gated off (NaN, with the reason in ``colour_gate``):

* ``fewer_than_two_segments``: nothing to compare;
* ``point_images``: every usable segment is point-like (no larger than ``point_size_factor`` times the PSF's
  second-moment extent): lensed quasar images, whose flux ratios and colours microlensing changes (chromatic
  microlensing of the accretion disc), so unequal colours are no evidence against lensing;
* ``fewer_than_two_bands``: a colour needs two bands with data.

numpy/scipy/pandas only, like the rest of ``science``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .clusters.extinction import reddening_vector
from .clusters.features import robust_colour_consistency, segment_colours
from .clusters.segments import find_arc_segments
from .psf import FWHM_PER_SIGMA
from .schemas import COLOUR_COLUMNS, COLOUR_GATES

__all__ = ["arc_colour_consistency", "arc_colour_table", "survey_colour_kwargs", "COLOUR_GATES", "COLOUR_COLUMNS"]


def survey_colour_kwargs(survey, target_fwhm_arcsec: float) -> dict:
    """The survey-given arguments of :func:`arc_colour_consistency` for cutouts of ``survey`` (a
    :class:`~lens_assets.science.surveys.SurveySpec`; every band, blue to red) matched to ``target_fwhm_arcsec``."""
    return dict(bands=[b.name for b in survey.bands], wavelengths_nm=[b.wavelength_nm for b in survey.bands],
                pixel_scale_arcsec=survey.pixel_scale_arcsec,
                psf_fwhm_px=float(target_fwhm_arcsec) / survey.pixel_scale_arcsec)


def _gated(reason: str, n_used: int) -> dict:
    return {"colour_consistency": float("nan"), "colour_dispersion": float("nan"), "n_colour_segments": int(n_used),
            "colour_gate": reason}


def arc_colour_consistency(image, variance, *, bands: Sequence[str], wavelengths_nm: Sequence[float],
                           pixel_scale_arcsec: float, psf_fwhm_px: float, max_radius_arcsec: float = 4.0,
                           exclude_radius_arcsec: float = 0.3, min_area_px: int = 12, nsigma: float = 2.0,
                           min_snr: float = 3.0, point_size_factor: float = 1.1, dust: bool = True,
                           r_v: float = 3.1) -> dict:
    """Colour consistency of the residual segments of one PSF-matched (B, H, W) cutout about its centre.

    ``bands`` blue to red with their ``wavelengths_nm``; bands without data (variance 0 everywhere) are left out.
    Segments are those of :func:`find_arc_segments` (deflector light ``"model"``, detection at ``nsigma``, at
    least ``min_area_px`` px) whose centroid lies between ``exclude_radius_arcsec`` (the deflector's core residual)
    and ``max_radius_arcsec`` of the centre; a segment's colours are used when its S/N is at least ``min_snr`` and
    it has positive flux in every band. Returns ``colour_consistency`` (the share of used segments within the
    chi^2 95% level of one dereddened colour; :func:`robust_colour_consistency`'s
    ``consistent_fraction_dereddened``; its ``consistent_fraction``, without the dust solve, where that solve
    cannot tell dust from a different source: with two segments, with one band pair, or with ``dust=False``),
    ``colour_dispersion``
    (mag, the segments' median absolute deviation per colour, averaged), ``n_colour_segments`` (used segments) and
    ``colour_gate`` (:data:`COLOUR_GATES`; the figures are NaN unless it is ``"ok"``).
    """
    img = np.asarray(image, dtype=float)
    var = np.asarray(variance, dtype=float)
    bands = list(bands)
    if img.ndim != 3 or img.shape != var.shape or img.shape[0] != len(bands):
        raise ValueError(f"image {img.shape} and variance {var.shape} must both be (bands={len(bands)}, H, W)")
    if len(wavelengths_nm) != len(bands):
        raise ValueError(f"{len(wavelengths_nm)} wavelengths for {len(bands)} bands {bands}")
    present = np.array([np.any(v > 0) for v in var])
    if present.sum() < 2:
        return _gated("fewer_than_two_bands", 0)
    use_bands = [b for b, p in zip(bands, present) if p]
    lam = np.asarray(wavelengths_nm, dtype=float)[present]
    img, var = img[present], var[present]
    h, w = img.shape[1:]
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    seg, _ = find_arc_segments(img, var, bands=use_bands, pixel_scale_arcsec=pixel_scale_arcsec,
                               psf_fwhm_px=psf_fwhm_px, bcg_xy=centre, light="model", nsigma=nsigma,
                               min_area_px=min_area_px, exclude_radius_arcsec=exclude_radius_arcsec,
                               model_only_bcg=True)
    seg = seg[seg["r_arcsec"] <= max_radius_arcsec]
    colours, cov, keep = segment_colours(seg, use_bands, min_snr=min_snr)
    n_used = int(keep.sum())
    if n_used < 2:
        return _gated("fewer_than_two_segments", n_used)
    point_extent_arcsec = point_size_factor * 4.0 * psf_fwhm_px / FWHM_PER_SIGMA * pixel_scale_arcsec
    if np.all(seg["length_arcsec"].to_numpy()[keep] <= point_extent_arcsec):
        return _gated("point_images", n_used)
    # one colour (two bands): extinction and an intrinsic difference are degenerate; two segments: a free E(B-V) per
    # segment absorbs any difference along the reddening vector, so two arcs of unrelated red and blue spectra would
    # agree. Only three or more segments over two or more colours can tell dust from another source.
    if len(use_bands) == 2 or n_used < 3 or not dust:
        cc = robust_colour_consistency(colours, cov)
        consistency = cc["consistent_fraction"]
    else:
        cc = robust_colour_consistency(colours, cov, reddening=reddening_vector(lam, r_v=r_v))
        consistency = cc["consistent_fraction_dereddened"]
    return {"colour_consistency": float(consistency), "colour_dispersion": float(cc["colour_dispersion"]),
            "n_colour_segments": n_used, "colour_gate": "ok"}


def arc_colour_table(images, variances, *, objids: Sequence[str] | None = None, **kwargs) -> pd.DataFrame:
    """:func:`arc_colour_consistency` for each (N, B, H, W) cutout: a table with :data:`COLOUR_COLUMNS` (and
    ``objid`` first when ``objids`` are given), one row per cutout in order; N = 0 gives the empty table with the
    columns' dtypes."""
    images, variances = np.asarray(images), np.asarray(variances)
    if images.ndim != 4 or images.shape != variances.shape:
        raise ValueError(f"images {images.shape} and variances {variances.shape} must both be (N, B, H, W)")
    rows = [arc_colour_consistency(images[i], variances[i], **kwargs) for i in range(len(images))]
    table = pd.DataFrame(rows, columns=list(COLOUR_COLUMNS)).astype(
        {"colour_consistency": float, "colour_dispersion": float, "n_colour_segments": np.int64, "colour_gate": object})
    if objids is not None:
        if len(objids) != len(images):
            raise ValueError(f"{len(objids)} objids for {len(images)} cutouts")
        table.insert(0, "objid", list(objids))
    return table
