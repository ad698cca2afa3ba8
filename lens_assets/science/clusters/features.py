"""One row of physics features per cluster field, from its arc segments, for the XGBoost track.

Lensing is achromatic: the arcs and counter-images of one background source share
its colours (e.g. Smith et al. 2005, MNRAS 359, 417; the colour criteria of
cluster-arc searches). :func:`robust_colour_consistency` tests this: a robust
(Huber 1964) colour centroid, and each segment's Mahalanobis distance from it
under its measurement covariance plus an intrinsic scatter. A foreground dust
screen reddens images differently (differential extinction, Falco et al. 1999,
ApJ 523, 617); given the CCM89 reddening vector (:mod:`.extinction`) each
segment's E(B-V) is fitted by generalized least squares and removed before testing.
Geometry features follow the tangential-arc picture of a cluster lens: arcs
elongated tangentially about the BCG, curved about it (curvature x radius = 1),
at a common radius near the Einstein radius.

Segments table (one row per arc segment; built by the segment module), columns
(:func:`segment_columns`): ``segment_id``, ``x_px``, ``y_px``, ``r_arcsec`` (to
the BCG), ``phi_deg`` (position angle about the BCG), ``area_px``, ``flux_<b>``,
``flux_err_<b>`` (linear, e.g. nanomaggies; may be <= 0), ``snr``, ``length_arcsec``,
``width_arcsec``, ``elongation``, ``orientation_deg`` (major axis, same angle
convention as ``phi_deg``), ``tangential_misalignment_deg`` (0 tangential, 90
radial), ``curvature_per_arcsec``, ``curvature_center_offset_arcsec``.
Colours are adjacent-band differences ``m_b - m_{b+1}`` (mag), bands blue to red.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pandera.pandas as pa
from scipy import stats

from ..surveys import SURVEY_NAMES
from .extinction import reddening_vector

__all__ = ["SegmentColours", "segment_colours", "segment_columns", "robust_colour_consistency",
           "cluster_features", "cluster_feature_names", "cluster_features_schema", "FEATURE_MONOTONE",
           "CONTEXT_KEYS", "SHRINKAGE_OPTIONS", "EBV_CONSTRAINTS"]

_POGSON = 2.5 / np.log(10.0)  # d(mag) / d(ln flux)
SHRINKAGE_OPTIONS = ("ledoit_wolf",)  # or a fixed float in [0, 1]
EBV_CONSTRAINTS = ("free", "nonnegative")
CONTEXT_KEYS = ("seeing_arcsec", "psf_fwhm_arcsec", "depth_mag")  # pixel_scale_arcsec comes as an argument
RADIAL_CONCENTRATION_HALF_WIDTH = 0.2  # |r - r_med| / r_med window of radial_concentration

# monotone constraints of the XGBoost track: +1 the lens probability never decreases with the feature
FEATURE_MONOTONE = {
    "colour_consistency": +1,
    "colour_consistency_raw": +1,
    "tangential_alignment": +1,
    "seeing_arcsec": -1,
    "psf_fwhm_arcsec": -1,
}

_GEOMETRY_COLUMNS = ("segment_id", "x_px", "y_px", "r_arcsec", "phi_deg", "area_px", "snr", "length_arcsec",
                     "width_arcsec", "elongation", "orientation_deg", "tangential_misalignment_deg",
                     "curvature_per_arcsec", "curvature_center_offset_arcsec")


def segment_columns(bands: Sequence[str]) -> list[str]:
    """The columns a segments table must have for ``bands``."""
    return list(_GEOMETRY_COLUMNS) + [f"flux_{b}" for b in bands] + [f"flux_err_{b}" for b in bands]


def _check_bands(bands) -> list[str]:
    if isinstance(bands, str):
        raise ValueError(f"bands must be a sequence of band names, got the string {bands!r}")
    bands = list(bands)
    if len(bands) < 2:
        raise ValueError(f"bands must list at least two bands (one colour), got {bands}")
    if len(set(bands)) != len(bands):
        raise ValueError(f"bands has duplicates: {bands}")
    return bands


def _check_segments(segments, bands: Sequence[str], need: Sequence[str]) -> None:
    if not isinstance(segments, pd.DataFrame):
        raise ValueError(f"segments must be a pandas DataFrame, got {type(segments).__name__}")
    missing = [c for c in need if c not in segments.columns]
    if missing:
        raise ValueError(f"segments lacks columns {missing} (bands {list(bands)})")


class SegmentColours(NamedTuple):
    """Output of :func:`segment_colours`; unpacks as ``colours, colour_cov, keep``."""

    colours: np.ndarray  # (n, B-1) mag; NaN rows where keep is False
    colour_cov: np.ndarray  # (n, B-1, B-1) mag^2; NaN where keep is False
    keep: np.ndarray  # (n,) bool

    @property
    def n_used(self) -> int:
        """How many segments are colour-usable."""
        return int(self.keep.sum())


def segment_colours(segments: pd.DataFrame, bands: Sequence[str], *, min_snr: float = 3.0) -> SegmentColours:
    """Adjacent-band colours of each segment and their covariance by error propagation.

    ``colours[i, k] = m_k - m_{k+1} = -2.5 log10(flux_k / flux_{k+1})`` (the zero point
    cancels). With ``s_k = 2.5/ln10 * flux_err_k / flux_k`` (mag), ``colour_cov`` is
    ``J diag(s^2) J^T`` for the difference operator J: diagonal ``s_k^2 + s_{k+1}^2``,
    ``cov(c_k, c_{k+1}) = -s_{k+1}^2`` (shared band), zero otherwise.

    A segment is used (``keep``) when every band has a finite flux > 0 and a finite
    flux error, and ``snr >= min_snr``; the other rows are NaN, so the full arrays
    can go to :func:`robust_colour_consistency`. ``.n_used`` counts the kept rows.
    Raises ValueError for a negative flux error.
    """
    bands = _check_bands(bands)
    _check_segments(segments, bands, ["snr"] + [f"flux_{b}" for b in bands] + [f"flux_err_{b}" for b in bands])
    min_snr = float(min_snr)
    if not np.isfinite(min_snr):
        raise ValueError(f"min_snr must be finite, got {min_snr}")
    flux = np.column_stack([segments[f"flux_{b}"].to_numpy(dtype=float) for b in bands]).reshape(-1, len(bands))
    err = np.column_stack([segments[f"flux_err_{b}"].to_numpy(dtype=float) for b in bands]).reshape(-1, len(bands))
    neg = err < 0
    if neg.any():
        i, k = np.argwhere(neg)[0]
        raise ValueError(f"segments row {i}: flux_err_{bands[k]} = {err[i, k]} is negative")
    snr = segments["snr"].to_numpy(dtype=float)
    keep = (np.all(np.isfinite(flux) & (flux > 0) & np.isfinite(err), axis=1) & (snr >= min_snr))

    n, nb = flux.shape
    colours = np.full((n, nb - 1), np.nan)
    cov = np.full((n, nb - 1, nb - 1), np.nan)
    f, e = flux[keep], err[keep]
    mag = -2.5 * np.log10(f)
    s2 = (_POGSON * e / f) ** 2
    colours[keep] = mag[:, :-1] - mag[:, 1:]
    c = np.zeros((len(f), nb - 1, nb - 1))
    k = np.arange(nb - 1)
    c[:, k, k] = s2[:, :-1] + s2[:, 1:]
    c[:, k[:-1], k[1:]] = -s2[:, 1:-1]
    c[:, k[1:], k[:-1]] = -s2[:, 1:-1]
    cov[keep] = c
    return SegmentColours(colours, cov, keep)


def _huber_location(x: np.ndarray, delta: float, fallback_scale: float) -> float:
    """Huber (1964) M-estimate of location by iteratively reweighted means, scale fixed at 1.4826 MAD.

    Weights ``min(1, delta / |u|)``, ``u = (x - mu) / scale``; the fixed point solves
    ``sum psi(u) = 0``. A zero MAD falls back to ``fallback_scale``; if that is zero too the
    median is returned.
    """
    mu = float(np.median(x))
    scale = 1.4826 * float(np.median(np.abs(x - mu)))
    if not scale > 0:
        scale = fallback_scale
    if not scale > 0:
        return mu
    for _ in range(200):
        u = np.abs(x - mu) / scale
        w = np.minimum(1.0, delta / np.maximum(u, 1e-300))
        new = float(np.sum(w * x) / np.sum(w))
        if abs(new - mu) <= 1e-12 * scale:
            return new
        mu = new
    return mu


def _centroid(colours: np.ndarray, cov: np.ndarray, delta: float) -> np.ndarray:
    """Per-colour Huber centroid; the MAD fallback scale is the RMS measurement error of the colour."""
    fallback = np.sqrt(np.median(np.diagonal(cov, axis1=1, axis2=2), axis=0))
    return np.array([_huber_location(colours[:, k], delta, fallback[k]) for k in range(colours.shape[1])])


def _diag_shrinkage(resid: np.ndarray) -> float:
    """Optimal shrinkage intensity of the sample covariance towards its diagonal (Schaefer & Strimmer 2005,
    target "D"; the Ledoit & Wolf 2004 estimator for unequal variances):
    ``sum_{i!=j} Var(s_ij) / sum_{i!=j} s_ij^2`` clipped to [0, 1]; 1 with one colour or no off-diagonal signal."""
    n, p = resid.shape
    if p < 2 or n < 2:
        return 1.0
    w = resid[:, :, None] * resid[:, None, :]
    wbar = w.mean(axis=0)
    s = n / (n - 1) * wbar
    var_s = n / (n - 1) ** 3 * ((w - wbar) ** 2).sum(axis=0)
    off = ~np.eye(p, dtype=bool)
    den = float((s[off] ** 2).sum())
    if not den > 0:
        return 1.0
    return float(np.clip(var_s[off].sum() / den, 0.0, 1.0))


def _intrinsic_scatter(resid: np.ndarray, mean_meas: np.ndarray, shrinkage) -> tuple[np.ndarray, float]:
    """Excess scatter over the measurement covariance, made positive semi-definite and shrunk to its diagonal."""
    n = len(resid)
    sample = resid.T @ resid / (n - 1)
    vals, vecs = np.linalg.eigh(sample - mean_meas)
    excess = (vecs * np.clip(vals, 0.0, None)) @ vecs.T
    lam = _diag_shrinkage(resid) if isinstance(shrinkage, str) else float(shrinkage)
    return lam * np.diag(np.diag(excess)) + (1.0 - lam) * excess, lam


def _metric_inverse(scatter: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """(scatter + C_i)^-1 per segment; pseudo-inverse so a zero-noise, zero-floor case stays finite."""
    return np.linalg.pinv(scatter[None] + cov, hermitian=True)


def _mahalanobis(resid: np.ndarray, inv: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.einsum("ni,nij,nj->n", resid, inv, resid), 0.0))


def _fit_ebv(resid: np.ndarray, inv: np.ndarray, v: np.ndarray, nonnegative: bool) -> np.ndarray:
    """GLS E(B-V) per segment: ``argmin_E (r - E v)^T W (r - E v) = v^T W r / v^T W v``."""
    wv = inv @ v  # (n, K): W_i v (W symmetric)
    ebv = np.einsum("nk,nk->n", wv, resid) / np.einsum("nk,k->n", wv, v)
    return np.maximum(ebv, 0.0) if nonnegative else ebv


def _check_shrinkage(shrinkage):
    if isinstance(shrinkage, str):
        if shrinkage not in SHRINKAGE_OPTIONS:
            raise ValueError(f"shrinkage {shrinkage!r} is not one of {list(SHRINKAGE_OPTIONS)} or a float in [0, 1]")
        return shrinkage
    try:
        value = float(shrinkage)
    except (TypeError, ValueError):
        raise ValueError(f"shrinkage {shrinkage!r} is not one of {list(SHRINKAGE_OPTIONS)} or a float in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"shrinkage {value} must lie in [0, 1] (or be one of {list(SHRINKAGE_OPTIONS)})")
    return value


def robust_colour_consistency(colours, colour_cov, *, reddening=None, shrinkage="ledoit_wolf",
                              huber_delta: float = 1.345, intrinsic_scatter_mag: float | None = 0.05,
                              ebv_constraint: str = "free", level: float = 0.95) -> dict:
    """Are the segments' colours those of one source, possibly behind differential dust?

    ``colours`` (n, K) mag and ``colour_cov`` (n, K, K) mag^2, e.g. from :func:`segment_colours`;
    rows with any non-finite value are not used (their per-segment figures are NaN) and
    ``n_used`` counts the others. Returns a dict:

    * ``colour_centroid`` (K,): per-colour Huber M-estimate (``huber_delta`` in units of
      1.4826 MAD; 1.345 is 95% efficient for Gaussian data), by iterative reweighting.
    * ``colour_cov`` (K, K): regularized covariance of the colours: the sample scatter about the
      centroid minus the mean measurement covariance (the excess, clipped positive
      semi-definite), shrunk towards its diagonal with intensity ``shrinkage_intensity``
      (``shrinkage="ledoit_wolf"``: the Ledoit-Wolf / Schaefer-Strimmer optimum; a float
      fixes it), plus the mean measurement covariance.
    * ``mahalanobis`` (n,): distance of each colour from the centroid under
      ``S + C_i``: ``C_i`` its measurement covariance and ``S`` the intrinsic scatter, by
      default ``intrinsic_scatter_mag**2 * I`` (0.05 mag: colour gradients within a
      source, PSF and aperture mismatch). ``intrinsic_scatter_mag=None`` uses the
      regularized excess scatter above as ``S``; it then follows the data's own spread, so
      a field of unrelated colours can also look consistent: the fixed floor is the
      hypothesis test "one colour within the errors".
    * ``consistent_fraction``: share of used segments with Mahalanobis^2 below the chi^2(K)
      ``level`` quantile; ``colour_dispersion``: per-colour median absolute deviation
      (unscaled), averaged over colours, mag.

    With ``reddening`` (K,), the colour change per unit E(B-V) (:func:`.extinction.reddening_vector`),
    each segment's E(B-V) relative to the centroid minimizes its Mahalanobis distance along
    the vector: ``E = v^T W r / v^T W v`` with ``W = (S + C_i)^-1``, ``r = c_i - centroid``
    (closed-form GLS; ``ebv_constraint="nonnegative"`` clips it at 0, treating the centroid
    as the least-extinguished colour; "free" allows bluer-than-centroid segments). The
    centroid is then re-estimated from the dereddened colours ``c_i - E_i v`` and E refitted
    (three rounds), which puts it on the reddening line through the groups. Adds ``ebv`` (n,),
    only differences between segments are physical; ``colour_centroid_dereddened`` (K,);
    ``mahalanobis_dereddened`` (n,); ``consistent_fraction_dereddened`` against the
    chi^2(K-1) quantile (one parameter fitted). With one colour (K=1) extinction and an
    intrinsic colour difference are degenerate: the dereddened figures are NaN.

    With fewer than 2 used segments every figure is NaN (per-segment arrays too); nothing raises.
    """
    c = np.array(colours, dtype=float)  # copies: the caller's arrays are never touched
    cov = np.array(colour_cov, dtype=float)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"colours must be (n, K) with K >= 1, got shape {c.shape}")
    n, k = c.shape
    if cov.shape != (n, k, k):
        raise ValueError(f"colour_cov has shape {cov.shape}; colours {c.shape} need ({n}, {k}, {k})")
    shrinkage = _check_shrinkage(shrinkage)
    if ebv_constraint not in EBV_CONSTRAINTS:
        raise ValueError(f"ebv_constraint {ebv_constraint!r} is not one of {list(EBV_CONSTRAINTS)}")
    huber_delta = float(huber_delta)
    if not (np.isfinite(huber_delta) and huber_delta > 0):
        raise ValueError(f"huber_delta must be a positive number, got {huber_delta}")
    if intrinsic_scatter_mag is not None:
        intrinsic_scatter_mag = float(intrinsic_scatter_mag)
        if not (np.isfinite(intrinsic_scatter_mag) and intrinsic_scatter_mag >= 0):
            raise ValueError(f"intrinsic_scatter_mag must be >= 0 mag or None, got {intrinsic_scatter_mag}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    v = None
    if reddening is not None:
        v = np.array(reddening, dtype=float)
        if v.shape != (k,) or not np.all(np.isfinite(v)) or not np.any(v != 0):
            raise ValueError(f"reddening must be a finite non-zero vector of shape ({k},), got {v.tolist()}")

    used = np.all(np.isfinite(c), axis=1) & np.all(np.isfinite(cov), axis=(1, 2))
    n_used = int(used.sum())
    nan_n, nan_k = np.full(n, np.nan), np.full(k, np.nan)
    out = {"n_used": n_used, "colour_centroid": nan_k.copy(), "colour_cov": np.full((k, k), np.nan),
           "shrinkage_intensity": np.nan, "mahalanobis": nan_n.copy(), "consistent_fraction": np.nan,
           "colour_dispersion": np.nan}
    if v is not None:
        out.update(ebv=nan_n.copy(), colour_centroid_dereddened=nan_k.copy(), mahalanobis_dereddened=nan_n.copy(),
                   consistent_fraction_dereddened=np.nan)
    if n_used < 2:
        return out

    cu, cvu = c[used], cov[used]
    mean_meas = cvu.mean(axis=0)

    def scatter_for(resid):
        reg, lam = _intrinsic_scatter(resid, mean_meas, shrinkage)
        fixed = None if intrinsic_scatter_mag is None else intrinsic_scatter_mag ** 2 * np.eye(k)
        return (reg if fixed is None else fixed), reg, lam

    mu = _centroid(cu, cvu, huber_delta)
    resid = cu - mu
    s_metric, reg, lam = scatter_for(resid)
    d = _mahalanobis(resid, _metric_inverse(s_metric, cvu))
    q = stats.chi2.ppf(level, k)
    out.update(colour_centroid=mu, colour_cov=reg + mean_meas, shrinkage_intensity=lam,
               consistent_fraction=float(np.mean(d ** 2 < q)),
               colour_dispersion=float(np.mean(stats.median_abs_deviation(cu, axis=0, scale=1.0))))
    out["mahalanobis"][used] = d

    if v is None or k < 2:
        return out
    mu_d, s_d = mu, s_metric
    nonneg = ebv_constraint == "nonnegative"
    for _ in range(3):  # E(B-V) against the centroid, then the centroid of the dereddened colours
        ebv = _fit_ebv(cu - mu_d, _metric_inverse(s_d, cvu), v, nonneg)
        dered = cu - ebv[:, None] * v
        mu_d = _centroid(dered, cvu, huber_delta)
        s_d = scatter_for(dered - mu_d)[0]
    inv = _metric_inverse(s_d, cvu)
    ebv = _fit_ebv(cu - mu_d, inv, v, nonneg)
    dd = _mahalanobis(cu - mu_d - ebv[:, None] * v, inv)
    out["ebv"][used] = ebv
    out["mahalanobis_dereddened"][used] = dd
    out.update(colour_centroid_dereddened=mu_d,
               consistent_fraction_dereddened=float(np.mean(dd ** 2 < stats.chi2.ppf(level, k - 1))))
    return out


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    """Smallest x whose cumulative weight reaches half the total (the lower weighted median)."""
    order = np.argsort(x)
    cw = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cw, 0.5 * cw[-1])])


def cluster_feature_names(bands: Sequence[str]) -> list[str]:
    """The keys of :func:`cluster_features` for ``bands`` (blue to red), in order."""
    bands = list(bands)
    return (["n_segments", "n_segments_used", "colour_consistency", "colour_consistency_raw",
             "colour_mahalanobis_median", "colour_dispersion_mag"]
            + [f"median_colour_{a}_{b}" for a, b in zip(bands, bands[1:])]
            + ["radial_colour_gradient", "tangential_alignment", "arc_curvature", "curvature_center_offset_arcsec",
               "ellipticity_coherence", "total_arc_length_arcsec", "bcg_distance_mean_arcsec",
               "bcg_distance_std_arcsec", "pairwise_separation_rms_arcsec", "radial_concentration",
               "arc_centroid_offset_arcsec", "pixel_scale_arcsec"] + list(CONTEXT_KEYS))


def cluster_features(segments: pd.DataFrame, *, bands: Sequence[str], wavelengths_nm: Sequence[float], bcg_xy,
                     pixel_scale_arcsec: float, context: Mapping[str, float], min_snr: float = 3.0,
                     r_v: float = 3.1, intrinsic_scatter_mag: float | None = 0.05,
                     ebv_constraint: str = "free") -> dict:
    """One row of features of a cluster field (keys: :func:`cluster_feature_names`); NaN = missing.

    Colour (segments with ``snr >= min_snr`` and positive flux in every band, see
    :func:`segment_colours`; NaN with < 2 of them): ``colour_consistency`` (the main
    score: consistent fraction after removing differential CCM89 extinction with ``r_v``;
    NaN with two bands), ``colour_consistency_raw``, ``colour_mahalanobis_median`` (raw),
    ``colour_dispersion_mag``, ``median_colour_<b1>_<b2>`` (>= 1 used segment) and
    ``radial_colour_gradient`` (Theil-Sen slope of the first colour vs ``r_arcsec``,
    mag/arcsec; NaN with < 3 used segments or one radius).

    Geometry (all segments; weights ``w`` = flux summed over the bands' positive fluxes,
    equal weights if all are zero): ``tangential_alignment`` = weighted mean of
    ``cos(2 * tangential_misalignment_deg)`` in [-1, 1] (1 all tangential, -1 all radial, 0
    random); ``arc_curvature`` = weighted median of ``curvature_per_arcsec * r_arcsec`` (1 for
    arcs on a circle about the BCG); ``curvature_center_offset_arcsec`` median;
    ``ellipticity_coherence`` = weighted mean resultant length of ``2 (orientation_deg -
    phi_deg - 90)`` (orientation relative to the tangent; 1 when all share one angle to
    their tangents, ~0 for random); ``total_arc_length_arcsec``; ``bcg_distance_mean_arcsec``
    and ``bcg_distance_std_arcsec`` (ddof=1, NaN for < 2) of ``r_arcsec``;
    ``pairwise_separation_rms_arcsec`` (RMS over segment pairs of their separation from
    ``x_px, y_px`` times ``pixel_scale_arcsec``, NaN for < 2); ``radial_concentration`` =
    share of ``w`` with ``|r - r_med| <= 0.2 r_med``, ``r_med`` the weighted median radius
    (arcs of one source near one Einstein radius give ~1); ``arc_centroid_offset_arcsec``
    = distance of the ``w``-weighted centroid of the segments from ``bcg_xy`` (px), arcsec
    (~0 for arcs on all sides of the BCG, ~r for one arc).

    Context passed through: ``pixel_scale_arcsec`` (the argument) and ``context`` with
    exactly the keys :data:`CONTEXT_KEYS` (values may be NaN); a ``pixel_scale_arcsec`` in
    ``context`` must equal the argument. Empty ``segments``: counts 0, everything else NaN.
    """
    bands = _check_bands(bands)
    lam = np.asarray(wavelengths_nm, dtype=float)
    if lam.shape != (len(bands),):
        raise ValueError(f"wavelengths_nm has {lam.size} values for {len(bands)} bands {bands}")
    _check_segments(segments, bands, segment_columns(bands))
    ps = float(pixel_scale_arcsec)
    if not (np.isfinite(ps) and ps > 0):
        raise ValueError(f"pixel_scale_arcsec must be positive, got {ps}")
    bcg = np.asarray(bcg_xy, dtype=float)
    if bcg.shape != (2,) or not np.all(np.isfinite(bcg)):
        raise ValueError(f"bcg_xy must be two finite pixel coordinates (x, y), got {bcg_xy!r}")
    ctx = dict(context)
    if "pixel_scale_arcsec" in ctx:
        if not np.isclose(float(ctx.pop("pixel_scale_arcsec")), ps):
            raise ValueError(f"context pixel_scale_arcsec {context['pixel_scale_arcsec']} differs from "
                             f"pixel_scale_arcsec {ps}")
    unknown, missing = sorted(set(ctx) - set(CONTEXT_KEYS)), [key for key in CONTEXT_KEYS if key not in ctx]
    if unknown or missing:
        raise ValueError(f"context keys must be {list(CONTEXT_KEYS)} (plus optional pixel_scale_arcsec); "
                         f"unknown {unknown}, missing {missing}")

    sc = segment_colours(segments, bands, min_snr=min_snr)
    res = robust_colour_consistency(sc.colours, sc.colour_cov, reddening=reddening_vector(lam, r_v=r_v),
                                    intrinsic_scatter_mag=intrinsic_scatter_mag, ebv_constraint=ebv_constraint)
    n = len(segments)
    nan = float("nan")
    row: dict = {key: nan for key in cluster_feature_names(bands)}
    row.update(n_segments=int(n), n_segments_used=sc.n_used,
               colour_consistency=float(res["consistent_fraction_dereddened"]),
               colour_consistency_raw=float(res["consistent_fraction"]),
               colour_mahalanobis_median=float(np.nanmedian(res["mahalanobis"])) if res["n_used"] >= 2 else nan,
               colour_dispersion_mag=float(res["colour_dispersion"]))
    used = sc.colours[sc.keep]
    if len(used):
        for j, (a, b) in enumerate(zip(bands, bands[1:])):
            row[f"median_colour_{a}_{b}"] = float(np.median(used[:, j]))
    r_used = segments["r_arcsec"].to_numpy(dtype=float)[sc.keep]
    ok = np.isfinite(r_used)
    if ok.sum() >= 3 and np.ptp(r_used[ok]) > 0:
        row["radial_colour_gradient"] = float(stats.theilslopes(used[ok, 0], r_used[ok])[0])

    if n:
        flux = np.column_stack([segments[f"flux_{b}"].to_numpy(dtype=float) for b in bands])
        w = np.nansum(np.clip(flux, 0.0, None), axis=1)
        if not w.sum() > 0:
            w = np.ones(n)
        col = {name: segments[name].to_numpy(dtype=float) for name in _GEOMETRY_COLUMNS if name != "segment_id"}

        def wmean(values):
            m = np.isfinite(values)
            return float(np.sum(w[m] * values[m]) / np.sum(w[m])) if m.any() and w[m].sum() > 0 else nan

        align = wmean(np.cos(np.deg2rad(2.0 * col["tangential_misalignment_deg"])))
        row["tangential_alignment"] = float(np.clip(align, -1.0, 1.0))
        kr = col["curvature_per_arcsec"] * col["r_arcsec"]
        m = np.isfinite(kr) & (w > 0)
        if m.any():
            row["arc_curvature"] = _weighted_median(kr[m], w[m])
        off = col["curvature_center_offset_arcsec"]
        if np.isfinite(off).any():
            row["curvature_center_offset_arcsec"] = float(np.nanmedian(off))
        rel = np.deg2rad(2.0 * (col["orientation_deg"] - col["phi_deg"] - 90.0))
        cx, cy = wmean(np.cos(rel)), wmean(np.sin(rel))
        row["ellipticity_coherence"] = float(min(np.hypot(cx, cy), 1.0))
        if np.isfinite(col["length_arcsec"]).any():
            row["total_arc_length_arcsec"] = float(np.nansum(col["length_arcsec"]))
        r = col["r_arcsec"][np.isfinite(col["r_arcsec"])]
        if len(r):
            row["bcg_distance_mean_arcsec"] = float(r.mean())
        if len(r) >= 2:
            row["bcg_distance_std_arcsec"] = float(r.std(ddof=1))
        xy = np.column_stack([col["x_px"], col["y_px"]]) * ps
        xy = xy[np.all(np.isfinite(xy), axis=1)]
        if len(xy) >= 2:
            diff = xy[:, None, :] - xy[None, :, :]
            iu = np.triu_indices(len(xy), 1)
            row["pairwise_separation_rms_arcsec"] = float(np.sqrt(np.mean(np.sum(diff ** 2, axis=-1)[iu])))
        mr = np.isfinite(col["r_arcsec"]) & (w > 0)
        if mr.any():
            r_med = _weighted_median(col["r_arcsec"][mr], w[mr])
            near = np.abs(col["r_arcsec"][mr] - r_med) <= RADIAL_CONCENTRATION_HALF_WIDTH * r_med
            row["radial_concentration"] = float(w[mr][near].sum() / w[mr].sum())
        mxy = np.isfinite(col["x_px"]) & np.isfinite(col["y_px"]) & (w > 0)
        if mxy.any():
            centre = np.average(np.column_stack([col["x_px"], col["y_px"]])[mxy], axis=0, weights=w[mxy])
            row["arc_centroid_offset_arcsec"] = float(np.hypot(*(centre - bcg)) * ps)

    row["pixel_scale_arcsec"] = ps
    for key in CONTEXT_KEYS:
        row[key] = float(ctx[key])
    return row


def cluster_features_schema(bands: Sequence[str]) -> pa.DataFrameSchema:
    """pandera schema of a table of :func:`cluster_features` rows plus ``objid`` (unique), ``survey`` and
    ``label`` (1 lens, 0 non-lens, -1 unlabeled). Strict: exactly these columns, any order."""
    bands = _check_bands(bands)
    f = float

    def num(*checks, desc=""):
        return pa.Column(f, list(checks), nullable=True, description=desc)

    frac = pa.Check.in_range(0.0, 1.0)
    nonneg = pa.Check.ge(0.0)
    cols = {
        "objid": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "survey": pa.Column(str, pa.Check.isin(SURVEY_NAMES)),
        "label": pa.Column(int, pa.Check.isin([-1, 0, 1]), description="1 lens, 0 non-lens, -1 unlabeled"),
        "n_segments": pa.Column(int, pa.Check.ge(0)),
        "n_segments_used": pa.Column(int, pa.Check.ge(0)),
        "colour_consistency": num(frac, desc="consistent fraction after differential-extinction removal"),
        "colour_consistency_raw": num(frac),
        "colour_mahalanobis_median": num(nonneg),
        "colour_dispersion_mag": num(nonneg, desc="mag"),
    }
    for a, b in zip(bands, bands[1:]):
        cols[f"median_colour_{a}_{b}"] = num(desc=f"m_{a} - m_{b}, mag")
    cols.update({
        "radial_colour_gradient": num(desc="mag/arcsec"),
        "tangential_alignment": num(pa.Check.in_range(-1.0, 1.0), desc="1 tangential, -1 radial"),
        "arc_curvature": num(desc="curvature x BCG distance; 1 for a circle about the BCG"),
        "curvature_center_offset_arcsec": num(nonneg),
        "ellipticity_coherence": num(frac),
        "total_arc_length_arcsec": num(nonneg),
        "bcg_distance_mean_arcsec": num(nonneg),
        "bcg_distance_std_arcsec": num(nonneg),
        "pairwise_separation_rms_arcsec": num(nonneg),
        "radial_concentration": num(frac),
        "arc_centroid_offset_arcsec": num(nonneg),
        "pixel_scale_arcsec": num(pa.Check.gt(0.0)),
        "seeing_arcsec": num(pa.Check.gt(0.0)),
        "psf_fwhm_arcsec": num(pa.Check.gt(0.0)),
        "depth_mag": num(desc="AB mag"),
    })
    checks = [pa.Check(lambda df: df["n_segments_used"] <= df["n_segments"],
                       error="n_segments_used must not exceed n_segments")]
    return pa.DataFrameSchema(cols, checks=checks, strict=True, ordered=False)
