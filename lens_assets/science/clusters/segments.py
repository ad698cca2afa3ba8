"""Arc segments in cluster fields: cluster-light subtraction, detection and per-segment shape features.

* :func:`subtract_cluster_light` removes the smooth light of the BCG and the members (``"median"`` or ``"model"``).
* :func:`find_arc_segments` detects segments in the light-subtracted field and measures each one (a table row).
* :func:`estimate_bcg_xy` finds the BCG when the caller does not know where it is.
* :func:`segment_gallery` draws the field with the segment outlines (matplotlib imported lazily).

A field is a PSF-matched (bands, height, width) image in flux per pixel (e.g. nanomaggies) with a variance map of
the same shape and units squared; variance 0 marks pixels without data. Pixel coordinates: x is the column, y the
row, pixel centres at integers. Angles are in degrees from +x counter-clockwise (towards +y), as drawn with
``origin="lower"``. The residual's variance is taken to be the input variance (the subtracted model's noise is
neglected).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = ["subtract_cluster_light", "find_arc_segments", "estimate_bcg_xy", "segment_columns", "segment_gallery",
           "segments_grid",
           "SEGMENT_COLUMNS", "LIGHT_METHODS", "CURVATURE_MIN_SAGITTA_PX", "CURVATURE_MIN_ELONGATION"]

LIGHT_METHODS = ("median", "model")
# band-independent columns in order; segment_columns(bands) puts flux_<b>, flux_err_<b> for each band after area_px
SEGMENT_COLUMNS = ("segment_id", "x_px", "y_px", "r_arcsec", "phi_deg", "area_px", "snr", "length_arcsec",
                   "width_arcsec", "elongation", "orientation_deg", "tangential_misalignment_deg",
                   "curvature_per_arcsec", "curvature_center_offset_arcsec")
_INT_COLUMNS = ("segment_id", "area_px")
# a fitted circle is kept only for a segment at least this elongated (a blob has no meaningful curvature) ...
CURVATURE_MIN_ELONGATION = 2.0
# ... that bends by at least this many pixels over its length (4 sigma_major)
CURVATURE_MIN_SAGITTA_PX = 1.0
_CORE_RESIDUAL_FRACTION = 0.3  # median method: see _median_light
_PIXEL_VARIANCE = 1.0 / 12.0  # second moment of a uniform 1-px box, px^2
_GEOMETRIC_STEPS = 15  # Gauss-Newton steps of the geometric circle fit
_MAX_RADIUS_PX = 1e7  # a circle this large is a line
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def segment_columns(bands: Sequence[str]) -> list[str]:
    """The ordered columns of :func:`find_arc_segments`' table for these band names."""
    per_band = [c for b in bands for c in (f"flux_{b}", f"flux_err_{b}")]
    i = SEGMENT_COLUMNS.index("area_px") + 1
    return [*SEGMENT_COLUMNS[:i], *per_band, *SEGMENT_COLUMNS[i:]]


# ---------------------------------------------------------------------------------------------------------------
# validation and detection helpers


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{name} {value!r} is not one of {list(valid)}")


def _check_positive(name: str, value) -> float:
    if value is None or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _field(image, variance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float copies of image and variance (no data -> 0) and the data mask, after checking them."""
    img = np.array(image, dtype=float)
    var = np.array(variance, dtype=float)
    if img.ndim != 3:
        raise ValueError(f"image has shape {img.shape}; expected (bands, height, width)")
    if var.shape != img.shape:
        raise ValueError(f"variance has shape {var.shape} but image has shape {img.shape}")
    bad = ~np.isfinite(var) | (var < 0)
    if bad.any():
        raise ValueError(f"variance has {int(bad.sum())} negative or non-finite pixels; use 0 for no data")
    valid = var > 0
    bad = valid & ~np.isfinite(img)
    if bad.any():
        raise ValueError(f"image has {int(bad.sum())} non-finite pixels where variance > 0")
    img[~valid] = 0.0
    return img, var, valid


def _gaussian_1d(fwhm_px: float) -> np.ndarray:
    sigma = fwhm_px / _FWHM_PER_SIGMA
    half = max(1, math.ceil(3.0 * sigma))
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return g / g.sum()


def _smooth(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    out = ndimage.correlate1d(a, g, axis=0, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, g, axis=1, mode="constant", cval=0.0)


def _matched_snr(flux: np.ndarray, var: np.ndarray, psf_fwhm_px: float) -> np.ndarray:
    """S/N of the PSF-matched filter: (k * flux) / sqrt(k^2 * var), k the normalized Gaussian PSF; 0 without data."""
    g = _gaussian_1d(psf_fwhm_px)
    num = _smooth(flux, g)
    den = _smooth(var, g * g)
    out = np.zeros_like(num)
    ok = den > 0
    out[ok] = num[ok] / np.sqrt(den[ok])
    return out


def _default_min_area(psf_fwhm_px: float) -> int:
    return max(5, math.ceil(math.pi * psf_fwhm_px**2))  # a disk of diameter 2 FWHM


def _segment(snr: np.ndarray, *, nsigma: float, min_area_px: int, deblend: bool, contrast: float,
             merge_saddle_ratio: float | None = None, merge_dip_nsigma: float = 0.0) -> np.ndarray:
    """Integer segmentation map (0 = background) of ``snr > nsigma``, deblended with photutils if asked, then
    shallow splits re-merged (:func:`_merge_shallow`) when ``merge_saddle_ratio`` is given."""
    from photutils.segmentation import deblend_sources, detect_sources
    from photutils.utils.exceptions import NoDetectionsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)  # nothing found is an empty table, not a warning
        segm = detect_sources(snr, nsigma, min_area_px)
    if segm is None:
        return np.zeros(snr.shape, dtype=np.int64)
    if deblend:
        segm = deblend_sources(snr, segm, min_area_px, contrast=contrast, progress_bar=False)
    segmap = np.asarray(segm.data, dtype=np.int64)
    if deblend and merge_saddle_ratio is not None:
        segmap = _merge_shallow(segmap, snr, saddle_ratio=merge_saddle_ratio, dip_nsigma=merge_dip_nsigma)
    return segmap


def _merge_shallow(segmap: np.ndarray, snr: np.ndarray, *, saddle_ratio: float, dip_nsigma: float) -> np.ndarray:
    """Merge touching segments whose saddle (the highest min(S/N) over 8-connected pixel pairs across their
    border) is within max(dip_nsigma, (1 - saddle_ratio) x peak) of the fainter peak; relabel 1..N by first label.
    Noise along a uniform arc makes such shallow splits."""
    n = int(segmap.max())
    if n < 2:
        return segmap
    peaks = np.asarray(ndimage.maximum(snr, segmap, index=np.arange(n + 1)), dtype=float)
    keys, saddles = [], []
    h, w = segmap.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ya, yb = slice(0, h - dy), slice(dy, h)
        xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        a, b = segmap[ya, xa], segmap[yb, xb]
        m = (a > 0) & (b > 0) & (a != b)
        if m.any():
            lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
            keys.append(lo * (n + 1) + hi)
            saddles.append(np.minimum(snr[ya, xa][m], snr[yb, xb][m]))
    if not keys:
        return segmap
    key, saddle = np.concatenate(keys), np.concatenate(saddles)
    uniq, inv = np.unique(key, return_inverse=True)
    best = np.full(uniq.size, -np.inf)
    np.maximum.at(best, inv, saddle)
    parent = np.arange(n + 1)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k, sad in zip(uniq, best):
        a, b = divmod(int(k), n + 1)
        low = min(peaks[a], peaks[b])
        if low - sad <= max(dip_nsigma, (1.0 - saddle_ratio) * low):
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n + 1)])
    _, new = np.unique(roots, return_inverse=True)  # root 0 (background) maps to 0
    return new.astype(np.int64)[segmap]


def _summed(img: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return img.sum(axis=0), var.sum(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# cluster light


def _odd_filter_size(filter_arcsec: float, pixel_scale_arcsec: float) -> int:
    size = int(round(filter_arcsec / pixel_scale_arcsec))
    return max(3, size if size % 2 else size + 1)


BOX_MEDIAN_ROWS = 8  # image rows of windows per np.partition call: 8 x width x size^2 values (9 px on 152: 0.8 MB)


def box_median(image: np.ndarray, size: int) -> np.ndarray:
    """``scipy.ndimage.median_filter(image, size=size, mode="reflect")`` for a 2-D image and an odd ``size``, the same
    values, in under half the time for the cluster fields' 9 px box on 152 px: every window's values are laid out
    in a row (``sliding_window_view`` over the edge-reflected image, ``BOX_MEDIAN_ROWS`` image rows at a time) and
    ``np.partition`` picks each row's middle. The result is float64 (the callers' fields are); a median of zeros may
    carry the other sign of zero than scipy's. An image with NaN, an even box, or an image no larger than the box's
    half goes to scipy."""
    image = np.asarray(image, dtype=float)
    half = size // 2
    if image.ndim != 2 or size % 2 == 0 or half >= min(image.shape) or np.isnan(image).any():
        return ndimage.median_filter(image, size=size, mode="reflect")
    h, w = image.shape
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(image, half, mode="symmetric"), (size, size))
    mid = size * size // 2
    out = np.empty_like(image)
    for r in range(0, h, BOX_MEDIAN_ROWS):
        block = windows[r:r + BOX_MEDIAN_ROWS].reshape(-1, size * size)  # windows overlap: reshape copies
        block.partition(mid, axis=1)  # in place: the copy is ours
        out[r:r + BOX_MEDIAN_ROWS] = block[:, mid].reshape(-1, w)
    return out


def _median_light(img: np.ndarray, var: np.ndarray, valid: np.ndarray, size: int, psf_fwhm_px: float | None,
                  clip_nsigma: float) -> np.ndarray:
    """Box median per band; with a PSF, a second pass that leaves out the pixels of faint sources (see the caller)."""
    light = np.zeros_like(img)
    filled = np.empty_like(img)
    for b in range(img.shape[0]):
        fill = float(np.median(img[b][valid[b]])) if valid[b].any() else 0.0
        filled[b] = np.where(valid[b], img[b], fill)
        light[b] = box_median(filled[b], size)
    if psf_fwhm_px is None or not valid.any():
        return light
    inv = np.zeros_like(var)
    inv[valid] = 1.0 / var[valid]
    resid = img - light
    snr = _matched_snr((resid * inv).sum(axis=0), inv.sum(axis=0), psf_fwhm_px)
    smooth = light.sum(axis=0)
    smooth = smooth - np.median(smooth[valid.any(axis=0)])
    # faint sources, not galaxy cores: a core's first-pass residual is a small fraction of its smooth light
    source = (snr > clip_nsigma) & (resid.sum(axis=0) > _CORE_RESIDUAL_FRACTION * smooth)
    if not source.any():
        return light
    yy, xx = np.indices(source.shape)
    outlier = np.where((xx + yy) % 2 == 0, np.inf, -np.inf)  # as many above as below: the median skips them
    for b in range(img.shape[0]):
        second = box_median(np.where(source, outlier, filled[b]), size)
        light[b] = np.where(np.isfinite(second), second, light[b])
    return light


def _binned_medians(values: np.ndarray, bins: np.ndarray, nbins: int) -> np.ndarray:
    """Median of ``values`` in each integer bin (NaN for empty bins)."""
    order = np.lexsort((values, bins))
    v, b = values[order], bins[order]
    counts = np.bincount(b, minlength=nbins)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full(nbins, np.nan)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    out[has] = 0.5 * (v[lo] + v[hi])
    return out


def _galaxies(img, var, valid, *, psf_fwhm_px, nsigma, max_elongation, contrast):
    """Compact galaxies detected on the summed image (brightest first) and the segmentation map."""
    from photutils.segmentation import SegmentationImage, SourceCatalog

    total, total_var = _summed(img, var)
    snr = _matched_snr(total, total_var, psf_fwhm_px)
    segmap = _segment(snr, nsigma=nsigma, min_area_px=_default_min_area(psf_fwhm_px), deblend=True,
                      contrast=contrast)
    if not segmap.any():
        return [], segmap
    smooth = _smooth(total, _gaussian_1d(psf_fwhm_px))
    peaks = np.asarray(ndimage.maximum(smooth, segmap, index=np.arange(int(segmap.max()) + 1)), dtype=float)
    h, w = total.shape
    galaxies = []
    for src in SourceCatalog(total, SegmentationImage(segmap)):
        a, b = float(src.semimajor_axis.value), float(src.semiminor_axis.value)
        xc, yc = float(src.x_centroid), float(src.y_centroid)
        if not all(np.isfinite([a, b, xc, yc])) or b <= 0 or a / b > max_elongation:
            continue
        xi, yi = int(round(xc)), int(round(yc))
        if not (0 <= xi < w and 0 <= yi < h) or smooth[yi, xi] < 0.5 * peaks[src.label]:
            continue  # the centroid is not the bright part: an arc or a ring, not a galaxy
        galaxies.append({"label": int(src.label), "x": xc, "y": yc, "a": a, "q": b / a,
                         "theta": math.radians(float(src.orientation.value)), "flux": float(src.segment_flux)})
    galaxies.sort(key=lambda g: -g["flux"])
    return galaxies, segmap


def _adaptive_shape(a: np.ndarray, use: np.ndarray, g: dict, iterations: int = 30) -> tuple[float, ...]:
    """Adaptive (elliptical Gaussian-window) moments of ``a`` over ``use`` pixels started from the segment's
    moments: (x, y, sigma_major, axis ratio, theta rad). Exact for an elliptical Gaussian; the start if it fails."""
    h, w = a.shape
    x, y = g["x"], g["y"]
    ct, st = math.cos(g["theta"]), math.sin(g["theta"])
    rot = np.array([[ct, -st], [st, ct]])
    cov = rot @ np.diag([g["a"] ** 2, (g["a"] * g["q"]) ** 2]) @ rot.T
    for _ in range(iterations):
        half = int(math.ceil(4.0 * math.sqrt(np.linalg.eigvalsh(cov)[-1])))
        x0, x1 = max(0, int(x) - half), min(w, int(x) + half + 2)
        y0, y1 = max(0, int(y) - half), min(h, int(y) + half + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dx, dy = xx - x, yy - y
        inv = np.linalg.inv(cov)
        wgt = np.exp(-0.5 * (inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy))
        wgt = wgt * np.where(use[y0:y1, x0:x1], a[y0:y1, x0:x1], 0.0)
        tot = wgt.sum()
        if not tot > 0:
            return g["x"], g["y"], g["a"], g["q"], g["theta"]
        nx, ny = float((wgt * xx).sum() / tot), float((wgt * yy).sum() / tot)
        q = np.array([[(wgt * dx * dx).sum(), (wgt * dx * dy).sum()], [0.0, (wgt * dy * dy).sum()]]) / tot
        q[1, 0] = q[0, 1]
        new = 2.0 * q
        if not np.all(np.isfinite(new)) or np.linalg.eigvalsh(new)[0] <= 0.25:
            return g["x"], g["y"], g["a"], g["q"], g["theta"]
        step = math.hypot(nx - x, ny - y) + float(np.abs(new - cov).max()) / float(np.abs(cov).max())
        x, y, cov = nx, ny, new
        if step < 1e-4:
            break
    evals, evecs = np.linalg.eigh(cov)
    return x, y, float(math.sqrt(evals[1])), float(math.sqrt(evals[0] / evals[1])), \
        float(math.atan2(evecs[1, 1], evecs[0, 1]))


def _galaxy_at(galaxies: list, segmap: np.ndarray, xy, max_offset_px: float) -> list:
    """The one galaxy at ``xy``: the galaxy whose segment holds that pixel; where no segment does, the nearest
    centroid within ``max_offset_px``; none otherwise (a segment there that is no galaxy, e.g. a deflector blended
    with its ring, is not swapped for a neighbour, which may be a lensed image)."""
    x, y = xy
    h, w = segmap.shape
    xi, yi = int(round(x)), int(round(y))
    label = int(segmap[yi, xi]) if 0 <= xi < w and 0 <= yi < h else 0
    if label:
        return [g for g in galaxies if g["label"] == label]
    near = [g for g in galaxies if math.hypot(g["x"] - x, g["y"] - y) <= max_offset_px]
    return [min(near, key=lambda g: math.hypot(g["x"] - x, g["y"] - y))] if near else []


def _model_light(img, var, valid, *, psf_fwhm_px, nsigma, max_elongation, radius_factor, contrast, only_at=None):
    """Sum of elliptical radial-median models of the detected galaxies, fitted brightest first (``only_at``
    (x, y): of the one galaxy there, :func:`_galaxy_at`; the other sources are masked from its fit)."""
    galaxies, segmap = _galaxies(img, var, valid, psf_fwhm_px=psf_fwhm_px, nsigma=nsigma,
                                 max_elongation=max_elongation, contrast=contrast)
    if only_at is not None:
        galaxies = _galaxy_at(galaxies, segmap, only_at, 2.0 * psf_fwhm_px)
    nb, h, w = img.shape
    light = np.zeros_like(img)
    if not galaxies:
        return light
    resid = img.copy()
    # other sources (arcs, stars, elongated galaxies) and their PSF-wide rims are never used
    grow = max(1, int(round(psf_fwhm_px)))
    waiting = np.zeros(int(segmap.max()) + 1, dtype=bool)  # by label: a galaxy not yet subtracted
    waiting[[g["label"] for g in galaxies]] = True
    others = ndimage.binary_dilation((segmap > 0) & ~waiting[segmap], iterations=grow)
    for g in galaxies:
        waiting[g["label"]] = False
        pending = waiting[segmap]
        x, y, a, q, theta = _adaptive_shape(resid.sum(axis=0), valid.all(axis=0) & ~pending & ~others, g)
        rmax = max(radius_factor * max(a, g["a"]), 3.0 * psf_fwhm_px)
        x0, x1 = max(0, int(math.floor(x - rmax))), min(w, int(math.ceil(x + rmax)) + 1)
        y0, y1 = max(0, int(math.floor(y - rmax))), min(h, int(math.ceil(y + rmax)) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dx, dy = xx - x, yy - y
        ct, st = math.cos(theta), math.sin(theta)
        r = np.hypot(dx * ct + dy * st, (-dx * st + dy * ct) / q)  # elliptical radius, px along the major axis
        # galaxies not yet subtracted are masked; own segment, subtracted galaxies and background are used
        usable = (r <= rmax) & ~pending[y0:y1, x0:x1] & ~others[y0:y1, x0:x1]
        bins = np.floor(r).astype(np.int64)
        nbins = int(math.floor(rmax)) + 1
        for b in range(nb):
            use = usable & valid[b, y0:y1, x0:x1]
            if not use.any():
                continue
            med = _binned_medians(resid[b, y0:y1, x0:x1][use], bins[use], nbins)
            rad = np.bincount(bins[use], r[use], nbins) / np.maximum(np.bincount(bins[use], minlength=nbins), 1)
            has = np.isfinite(med)
            med, rad = med[has], rad[has]
            stop = np.flatnonzero(med <= 0)  # the profile ends at the first annulus at or below zero
            end = stop[0] if stop.size else med.size
            if end == 0:
                continue
            r_end = rad[end] if end < rad.size else max(rmax, rad[-1] + 1.0)
            model = np.interp(r, np.append(rad[:end], r_end), np.append(med[:end], 0.0), right=0.0)
            light[b, y0:y1, x0:x1] += model
            resid[b, y0:y1, x0:x1] -= model
    return light


def subtract_cluster_light(image, variance, *, method: str = "median", filter_arcsec: float = 2.0,
                           pixel_scale_arcsec: float, psf_fwhm_px: float | None = None, galaxy_nsigma: float = 5.0,
                           max_galaxy_elongation: float = 3.0, model_radius_factor: float = 8.0,
                           deblend_contrast: float = 0.001, clip_nsigma: float = 2.0,
                           model_only_at: tuple[float, float] | None = None) -> np.ndarray:
    """The field minus the smooth light of the BCG and the cluster members: a (B, H, W) residual in image units.

    ``method="median"``: each band minus its box median filter of side ``filter_arcsec`` (in px, made odd). With
    ``psf_fwhm_px`` a second pass leaves out the pixels of faint sources found in the first residual (matched-filter
    S/N > ``clip_nsigma`` and residual > 0.3 x the smooth light above the field's median; the second condition
    keeps galaxy cores in): they become +inf / -inf on a checkerboard, so the median is that of the other pixels.
    This cuts the upward bias that an arc's own pixels give the median (and so the arc flux lost) from ~30% to
    ~5-15% in the tests. Removes: light smooth over the box (halos, galaxies much larger than the box). Keeps:
    structure narrower than about half the box (arcs). Misses: the cores of galaxies not much larger than the box
    (a Gaussian peak A of width sigma leaves ~A r_m^2 / (2 sigma^2), r_m ~ 0.4 box side), galaxies smaller than half
    the box (not removed at all), and the curvature of a halo under an arc (a convex halo is over-subtracted).
    Choose the box ~3-5 x the arc FWHM.

    ``method="model"`` (needs ``psf_fwhm_px``): galaxies are detected on the band sum (matched-filter S/N >
    ``galaxy_nsigma``, deblended); those with sigma_major / sigma_minor <= ``max_galaxy_elongation`` whose centroid
    is bright (>= half the segment's smoothed peak: a curved arc's centroid is not) are modelled brightest first.
    Each model's centre, axis ratio and position angle are the galaxy's adaptive (elliptical Gaussian-window)
    moments on the current residual; each band's profile is the median in 1-px elliptical annuli out to
    ``model_radius_factor`` x sigma_major or to the first annulus with median <= 0, interpolated back on the grid.
    Fits leave out the other sources' segments grown by one FWHM and the galaxies not yet subtracted. Removes:
    elliptically symmetric light, compact cores included. Misses: isophote twists and ellipticity gradients,
    non-elliptical structure (tidal features, spiral arms), galaxies below the threshold or too elongated, and the
    light of masked sources beyond their segments. Arcs are not elliptically symmetric about a galaxy and survive.
    ``model_only_at`` (x, y) px models only the galaxy there (the one whose segment holds that pixel; where no
    segment does, the nearest centroid within 2 FWHM), for a cutout centred on one deflector: every other source,
    compact lensed images included, stays in the residual.

    Pixels without data (variance 0) are 0 in the residual. Inputs are not modified.
    """
    _check_choice("method", method, LIGHT_METHODS)
    pixel_scale_arcsec = _check_positive("pixel_scale_arcsec", pixel_scale_arcsec)
    img, var, valid = _field(image, variance)
    if model_only_at is not None and method != "model":
        raise ValueError(f"model_only_at needs method='model', got method={method!r}")
    if method == "median":
        size = _odd_filter_size(_check_positive("filter_arcsec", filter_arcsec), pixel_scale_arcsec)
        if psf_fwhm_px is not None:
            psf_fwhm_px = _check_positive("psf_fwhm_px", psf_fwhm_px)
        light = _median_light(img, var, valid, size, psf_fwhm_px, _check_positive("clip_nsigma", clip_nsigma))
    else:
        if psf_fwhm_px is None:
            raise ValueError("psf_fwhm_px is required for method='model', got None")
        light = _model_light(img, var, valid, psf_fwhm_px=_check_positive("psf_fwhm_px", psf_fwhm_px),
                             nsigma=_check_positive("galaxy_nsigma", galaxy_nsigma),
                             max_elongation=_check_positive("max_galaxy_elongation", max_galaxy_elongation),
                             radius_factor=_check_positive("model_radius_factor", model_radius_factor),
                             contrast=deblend_contrast, only_at=model_only_at)
    return np.where(valid, img - light, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# the BCG


def estimate_bcg_xy(image, variance, *, psf_fwhm_px: float, nsigma: float = 5.0,
                    search_fraction: float = 0.2) -> tuple[float, float]:
    """(x, y) px of the BCG: the flux-weighted centroid of the brightest (total flux) deblended source of the summed
    image (matched-filter S/N > ``nsigma``) whose centroid lies within ``search_fraction`` x min(H, W) of the centre.
    """
    from photutils.segmentation import SegmentationImage, SourceCatalog

    psf_fwhm_px = _check_positive("psf_fwhm_px", psf_fwhm_px)
    img, var, valid = _field(image, variance)
    total, total_var = _summed(img, var)
    snr = _matched_snr(total, total_var, psf_fwhm_px)
    segmap = _segment(snr, nsigma=_check_positive("nsigma", nsigma), min_area_px=_default_min_area(psf_fwhm_px),
                      deblend=True, contrast=0.001)
    h, w = total.shape
    radius = search_fraction * min(h, w)
    best = None
    if segmap.any():
        for src in SourceCatalog(total, SegmentationImage(segmap)):
            x, y, f = float(src.x_centroid), float(src.y_centroid), float(src.segment_flux)
            if math.hypot(x - (w - 1) / 2, y - (h - 1) / 2) <= radius and (best is None or f > best[2]):
                best = (x, y, f)
    if best is None:
        raise ValueError(f"bcg_xy is None and no source with S/N > {nsigma} lies within {radius:.1f} px of the "
                         f"field centre; pass bcg_xy")
    return best[0], best[1]


# ---------------------------------------------------------------------------------------------------------------
# segments


def _empty_table(bands: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in _INT_COLUMNS else "float64")
                         for c in segment_columns(bands)})


def _measure(segmap, n, resid, var, S, V, snr_raw, bx, by, pix):
    """Per-segment features (dict of arrays indexed by label 1..n)."""
    h, w = segmap.shape
    lab = segmap.ravel()
    sel = lab > 0
    L = lab[sel]
    yy, xx = np.divmod(np.flatnonzero(sel), w)
    x, y = xx.astype(float), yy.astype(float)
    m = n + 1
    area = np.bincount(L, minlength=m)
    wgt = np.clip(snr_raw.ravel()[sel], 0.0, None)
    sw = np.bincount(L, wgt, m)
    flat = (sw <= 0)[L]  # a segment without positive signal: unweighted pixels
    wgt = np.where(flat, 1.0, wgt)
    sw = np.bincount(L, wgt, m)
    sw_safe = np.where(sw > 0, sw, 1.0)
    xc, yc = np.bincount(L, wgt * x, m) / sw_safe, np.bincount(L, wgt * y, m) / sw_safe
    dx, dy = x - xc[L], y - yc[L]
    mxx = np.bincount(L, wgt * dx * dx, m) / sw_safe + _PIXEL_VARIANCE
    myy = np.bincount(L, wgt * dy * dy, m) / sw_safe + _PIXEL_VARIANCE
    mxy = np.bincount(L, wgt * dx * dy, m) / sw_safe
    half, diff = 0.5 * (mxx + myy), np.hypot(0.5 * (mxx - myy), mxy)
    s_maj, s_min = np.sqrt(half + diff), np.sqrt(np.maximum(half - diff, 0.0))
    orient = np.degrees(0.5 * np.arctan2(2.0 * mxy, mxx - myy)) % 180.0
    rx, ry = xc - bx, yc - by
    phi = np.degrees(np.arctan2(ry, rx)) % 360.0
    tangent = (phi + 90.0) % 180.0
    misalign = np.abs((orient - tangent + 90.0) % 180.0 - 90.0)
    # Kasa circle fit in centred coordinates: minimize sum w (dx^2 + dy^2 + D dx + E dy + F)^2
    z = dx * dx + dy * dy
    sums = {k: np.bincount(L, wgt * v, m) for k, v in
            {"xx": dx * dx, "xy": dx * dy, "yy": dy * dy, "x": dx, "y": dy, "xz": dx * z, "yz": dy * z,
             "z": z}.items()}
    mat = np.stack([np.stack([sums["xx"], sums["xy"], sums["x"]], -1),
                    np.stack([sums["xy"], sums["yy"], sums["y"]], -1),
                    np.stack([sums["x"], sums["y"], sw], -1)], -2)
    rhs = -np.stack([sums["xz"], sums["yz"], sums["z"]], -1)
    fit = (area >= 3) & (np.linalg.cond(mat) < 1e12)
    fit[0] = False
    sol = np.zeros((m, 3))
    sol[fit] = np.linalg.solve(mat[fit], rhs[fit][..., None])[..., 0]
    cx, cy = -0.5 * sol[:, 0], -0.5 * sol[:, 1]  # circle centre relative to the centroid, px
    r2 = cx * cx + cy * cy - sol[:, 2]
    fit &= np.isfinite(r2) & (r2 > 0)
    radius = np.sqrt(np.where(fit, r2, 1.0))
    # Gauss-Newton steps of the geometric fit, sum w (|p - c| - R)^2, from the Kasa circle: the Kasa fit alone is
    # biased towards small circles for arcs of finite width (R 75 px, 60 deg, +-3 px wide: 58 px)
    fit &= s_maj >= CURVATURE_MIN_ELONGATION * s_min
    for _ in range(_GEOMETRIC_STEPS):
        ex, ey = dx - cx[L], dy - cy[L]
        d = np.maximum(np.hypot(ex, ey), 1e-9)
        ux, uy, res = ex / d, ey / d, d - radius[L]
        jtj = np.stack([np.stack([np.bincount(L, wgt * ux * ux, m), np.bincount(L, wgt * ux * uy, m),
                                  np.bincount(L, wgt * ux, m)], -1),
                        np.stack([np.bincount(L, wgt * ux * uy, m), np.bincount(L, wgt * uy * uy, m),
                                  np.bincount(L, wgt * uy, m)], -1),
                        np.stack([np.bincount(L, wgt * ux, m), np.bincount(L, wgt * uy, m), sw], -1)], -2)
        jtr = np.stack([np.bincount(L, wgt * ux * res, m), np.bincount(L, wgt * uy * res, m),
                        np.bincount(L, wgt * res, m)], -1)
        fit &= np.linalg.cond(jtj) < 1e12
        if not fit.any():
            break
        step = np.linalg.solve(jtj[fit], jtr[fit][..., None])[..., 0]  # J = -(ux, uy, 1): c += step
        cx[fit] += step[:, 0]
        cy[fit] += step[:, 1]
        radius[fit] += step[:, 2]
        fit &= np.isfinite(radius) & (radius > 0) & (radius < _MAX_RADIUS_PX)
    # the circle must fit better than the major axis line: a Kasa fit to a straight bar returns a small circle
    dist = np.hypot(dx - cx[L], dy - cy[L]) - radius[L]
    circle_rms = np.sqrt(np.bincount(L, wgt * dist * dist, m) / sw_safe + _PIXEL_VARIANCE)
    half_chord = 2.0 * s_maj  # half of the 4 sigma_major length
    sagitta = np.where(half_chord < radius, radius - np.sqrt(np.maximum(radius**2 - half_chord**2, 0.0)), radius)
    fit &= (circle_rms < s_min) & (sagitta >= CURVATURE_MIN_SAGITTA_PX)
    curvature = np.where(fit, 1.0 / (radius * pix), 0.0)
    offset = np.where(fit, np.hypot(xc + cx - bx, yc + cy - by) * pix, np.nan)
    sS, sV = np.bincount(L, S.ravel()[sel], m), np.bincount(L, V.ravel()[sel], m)
    snr = np.where(sV > 0, sS / np.sqrt(np.where(sV > 0, sV, 1.0)), 0.0)
    cols = {"segment_id": np.arange(m, dtype=np.int64), "x_px": xc, "y_px": yc,
            "r_arcsec": np.hypot(rx, ry) * pix, "phi_deg": phi, "area_px": area.astype(np.int64)}
    for b in range(resid.shape[0]):
        cols[f"flux_{b}"] = np.bincount(L, resid[b].ravel()[sel], m)
        cols[f"flux_err_{b}"] = np.sqrt(np.bincount(L, var[b].ravel()[sel], m))
    cols.update({"snr": snr, "length_arcsec": 4.0 * s_maj * pix, "width_arcsec": 4.0 * s_min * pix,
                 "elongation": s_maj / s_min, "orientation_deg": orient, "tangential_misalignment_deg": misalign,
                 "curvature_per_arcsec": curvature, "curvature_center_offset_arcsec": offset})
    return {k: v[1:] for k, v in cols.items()}


def find_arc_segments(image, variance, *, bands: Sequence[str], pixel_scale_arcsec: float, psf_fwhm_px: float,
                      bcg_xy: tuple[float, float] | None = None, light: str = "median", filter_arcsec: float = 2.0,
                      nsigma: float = 2.0, min_area_px: int | None = None, deblend: bool = True,
                      deblend_contrast: float = 0.001, merge_saddle_ratio: float = 0.7,
                      merge_dip_nsigma: float = 3.0,
                      exclude_radius_arcsec: float = 2.0,
                      model_only_bcg: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """Segments of the cluster-light-subtracted field and their features: (table, segmentation map (H, W) int64).

    The residual r is :func:`subtract_cluster_light` (``light``, ``filter_arcsec``, ``psf_fwhm_px``). Detection
    image: the inverse-variance weighted band sum S = sum_b r_b / var_b, of variance V = sum_b 1 / var_b, filtered
    with the normalized Gaussian PSF k as (k * S) / sqrt(k^2 * V), a matched-filter S/N map. Segments are connected
    regions above ``nsigma`` of at least ``min_area_px`` px (default pi FWHM^2, at least 5), deblended by photutils
    (``deblend_contrast``) when ``deblend``; touching pieces are merged back when the saddle between them is within
    max(``merge_dip_nsigma``, (1 - ``merge_saddle_ratio``) x peak) of the fainter peak (noise breaks a uniform arc
    into such pieces). Segments whose centroid lies within ``exclude_radius_arcsec`` of the BCG (its core residual)
    are dropped; the others are relabelled 1..N in label order, the map holds those labels (0 = background).

    Columns (:func:`segment_columns`), one row per segment sorted by ``segment_id``:
    ``x_px``, ``y_px``: centroid weighted by the unsmoothed S/N S / sqrt(V) clipped at 0 (the weights of all
    moments below). ``r_arcsec``, ``phi_deg`` in [0, 360): the centroid about the BCG (a curved arc's centroid lies
    inside its curve: r = R sin(a) / a for an arc of radius R spanning 2a radians). ``area_px``. ``flux_<b>``: sum
    of band b's residual over the segment; ``flux_err_<b>``: sqrt of its summed variance. ``snr``: sum S / sqrt(sum
    V). From the weighted second moments (plus 1/12 px^2 per axis, a pixel's own extent): ``length_arcsec`` =
    4 sigma_major, ``width_arcsec`` = 4 sigma_minor (second-moment extents, not Feret diameters; 4 sigma = 1.15 x
    the length of a uniform bar), ``elongation`` = sigma_major / sigma_minor, ``orientation_deg`` in [0, 180) of the
    major axis. ``tangential_misalignment_deg`` in [0, 90]: angle between the major axis and the tangent at the
    centroid to the circle about the BCG (0 tangential like an arc, 90 radial). ``curvature_per_arcsec``: 1 / R of a
    weighted circle fit to the segment's pixels, an algebraic (Kasa) least-squares fit refined by Gauss-Newton steps
    of the geometric fit (Kasa alone shrinks R for arcs of finite width); 0 when the segment is rounder than
    ``CURVATURE_MIN_ELONGATION``, the fit is degenerate, the circle fits no better than the major-axis line (RMS
    distance >= sigma_minor) or bends by less than ``CURVATURE_MIN_SAGITTA_PX`` over 4 sigma_major.
    ``curvature_center_offset_arcsec``: distance from the fitted circle's centre to the BCG; NaN when curvature is 0.

    ``bcg_xy`` (x, y) px defaults to :func:`estimate_bcg_xy`; the table's ``attrs["bcg_xy"]`` is the one used.
    ``model_only_bcg`` (with ``light="model"``) subtracts the light of the galaxy at ``bcg_xy`` alone
    (:func:`subtract_cluster_light`'s ``model_only_at``): the galaxy-scale case, where compact neighbours of the
    deflector may be its lensed images. Inputs are not modified.
    """
    _check_choice("light", light, LIGHT_METHODS)
    img, var, valid = _field(image, variance)
    bands = tuple(bands)
    if len(bands) != img.shape[0]:
        raise ValueError(f"bands has {len(bands)} names {bands} but image has {img.shape[0]} bands")
    if len(set(bands)) != len(bands) or not all(isinstance(b, str) and b for b in bands):
        raise ValueError(f"bands must be distinct non-empty strings, got {bands}")
    pix = _check_positive("pixel_scale_arcsec", pixel_scale_arcsec)
    psf_fwhm_px = _check_positive("psf_fwhm_px", psf_fwhm_px)
    nsigma = _check_positive("nsigma", nsigma)
    if not np.isfinite(exclude_radius_arcsec) or exclude_radius_arcsec < 0:
        raise ValueError(f"exclude_radius_arcsec must be >= 0, got {exclude_radius_arcsec!r}")
    if min_area_px is None:
        min_area_px = _default_min_area(psf_fwhm_px)
    elif int(min_area_px) != min_area_px or min_area_px < 1:
        raise ValueError(f"min_area_px must be a positive integer, got {min_area_px!r}")
    if bcg_xy is None:
        bx, by = estimate_bcg_xy(img, var, psf_fwhm_px=psf_fwhm_px)
    else:
        bx, by = (float(v) for v in bcg_xy)
        if not (np.isfinite(bx) and np.isfinite(by)):
            raise ValueError(f"bcg_xy must be two finite numbers (x, y) px, got {bcg_xy!r}")

    resid = subtract_cluster_light(img, var, method=light, filter_arcsec=filter_arcsec, pixel_scale_arcsec=pix,
                                   psf_fwhm_px=psf_fwhm_px, deblend_contrast=deblend_contrast,
                                   model_only_at=(bx, by) if model_only_bcg else None)
    inv = np.zeros_like(var)
    inv[valid] = 1.0 / var[valid]
    S, V = (resid * inv).sum(axis=0), inv.sum(axis=0)
    snr_raw = np.zeros_like(S)
    np.divide(S, np.sqrt(V), out=snr_raw, where=V > 0)
    segmap = _segment(_matched_snr(S, V, psf_fwhm_px), nsigma=nsigma, min_area_px=int(min_area_px),
                      deblend=deblend, contrast=deblend_contrast, merge_saddle_ratio=merge_saddle_ratio,
                      merge_dip_nsigma=merge_dip_nsigma)
    n = int(segmap.max())
    table = _empty_table(bands)
    if n > 0:
        feats = _measure(segmap, n, resid, var, S, V, snr_raw, bx, by, pix)
        keep = feats["r_arcsec"] >= exclude_radius_arcsec
        relabel = np.zeros(n + 1, dtype=np.int64)
        relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1)
        segmap = relabel[segmap]
        if keep.any():
            feats["segment_id"] = relabel[1:][keep]
            for k in feats:
                if k != "segment_id":
                    feats[k] = feats[k][keep]
            for b, name in enumerate(bands):
                feats[f"flux_{name}"] = feats.pop(f"flux_{b}")
                feats[f"flux_err_{name}"] = feats.pop(f"flux_err_{b}")
            table = pd.DataFrame({c: feats[c] for c in segment_columns(bands)})
    table.attrs["bcg_xy"] = (bx, by)  # the BCG the geometry is measured about (given or estimated)
    return table, segmap


# ---------------------------------------------------------------------------------------------------------------
# figure


def _draw_segments(ax, image, segmap, segments: pd.DataFrame) -> None:
    total = np.nan_to_num(np.asarray(image, dtype=float)).sum(axis=0)
    seg = np.asarray(segmap)
    noise = 1.4826 * float(np.median(np.abs(total - np.median(total)))) or 1.0
    stretched = np.arcsinh(total / (3.0 * noise))
    lo, hi = np.percentile(stretched, [1.0, 99.8])
    edge = (seg > 0) & (ndimage.minimum_filter(seg, size=3) != ndimage.maximum_filter(seg, size=3))
    overlay = np.zeros((*seg.shape, 4))
    overlay[edge] = (1.0, 0.3, 0.1, 1.0)
    ax.imshow(stretched, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.imshow(overlay, origin="lower", interpolation="nearest")
    for row in segments.itertuples():
        ax.text(row.x_px, row.y_px, str(row.segment_id), color="yellow", fontsize=7, ha="center", va="center")
    ax.set_axis_off()


def segment_gallery(image, segmap, segments: pd.DataFrame, *, path=None):
    """The field (asinh stretch of the band sum) with segment outlines and ids; PNG written to ``path`` (returned),
    or the matplotlib Figure when ``path`` is None."""
    return segments_grid([(image, segmap, segments)], path=path, size_in=6.0)


def segments_grid(panels, titles=None, *, path=None, cols: int = 3, size_in: float = 4.0):
    """:func:`segment_gallery` of several fields, ``panels`` a list of (image, segmap, segments), in a grid."""
    from matplotlib.figure import Figure

    n = len(panels)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(size_in * cols, size_in * rows))
    for i, (image, segmap, segments) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_segments(ax, image, segmap, segments)
        if titles:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout(pad=0.2)
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
