"""Shortcut audit: can statistics that know nothing of lensing tell lenses from non-lenses?

A classifier trained on one simulator can score well on its own test split by
learning cues the simulator attached to its lenses (brighter, bluer, bigger,
more peaks) instead of the lensing itself. :func:`summary_statistics` measures
such cues on PSF-matched cutouts (total flux and colours, central colour,
concentration, second-moment size and ellipticity, asymmetry, peaks), and
:func:`shortcut_auroc` trains a gradient-boosted classifier on them: an AUROC
well above 0.5 on the test split says the labels can be read off without any
lensing, and the AUROC on each held-out family says whether that cue carries
over to other simulators.

Images are (N, bands, H, W) in nanomaggies with their variance (nanomaggies²),
bands listed blue to red; the statistics are vectorized over the batch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .metrics import auroc_by_kind

__all__ = ["summary_statistics", "shortcut_auroc", "MIN_PER_CLASS", "asinh_colour", "feature_names", "importance_plot"]

_POGSON = 2.5 / np.log(10.0)
MAX_PEAKS = 16  # brightest peaks per object kept for the separation


def feature_names(bands: Sequence[str]) -> list[str]:
    """The columns :func:`summary_statistics` returns for ``bands`` (blue to red)."""
    bands = list(bands)
    names = [f"flux_{b}" for b in bands]
    names += [f"colour_{a}_{b}" for a, b in zip(bands, bands[1:])]
    if len(bands) > 1:
        names += [f"colour_central_{bands[0]}_{bands[-1]}", f"colour_central_minus_total_{bands[0]}_{bands[-1]}"]
    names += ["concentration", "size_arcsec2", "ellipticity", "asymmetry", "n_peaks_5sigma",
              "max_peak_separation_arcsec", "peak_flux_fraction"]
    return names


def asinh_colour(flux_a, flux_b, softening) -> np.ndarray:
    """Colour ``m_a - m_b`` of asinh magnitudes (Lupton et al. 1999) with one softening ``b`` for both bands:
    ``-2.5/ln10 (asinh(f_a / 2b) - asinh(f_b / 2b))``. It is ``-2.5 log10(f_a / f_b)`` for bright
    positive fluxes, finite for zero and negative ones, and exactly 0 when ``f_a == f_b``."""
    b2 = 2.0 * np.asarray(softening, dtype=float)
    fa, fb = np.asarray(flux_a, dtype=float), np.asarray(flux_b, dtype=float)
    return -_POGSON * (np.arcsinh(fa / b2) - np.arcsinh(fb / b2))


def _check(images, variance, pixel_scale_arcsec, bands):
    x = np.asarray(images)
    v = np.asarray(variance)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, bands, H, W), got shape {x.shape}")
    if v.shape != x.shape:
        raise ValueError(f"variance has shape {v.shape}; images have shape {x.shape}")
    if x.shape[1] != len(bands):
        raise ValueError(f"images have {x.shape[1]} bands but bands lists {len(bands)}: {list(bands)}")
    if not pixel_scale_arcsec > 0:
        raise ValueError(f"pixel_scale_arcsec must be positive, got {pixel_scale_arcsec}")
    if (v < 0).any():
        raise ValueError("variance has negative pixels")
    return x.astype(np.float64), v.astype(np.float64)


def summary_statistics(images, variance, *, pixel_scale_arcsec: float, bands: Sequence[str],
                       central_radius_arcsec: float = 1.0, outer_radius_arcsec: float = 3.0,
                       moment_snr_min: float = 1.0, peak_snr_min: float = 5.0,
                       peak_footprint_arcsec: float = 1.0) -> pd.DataFrame:
    """Lensing-agnostic statistics of each cutout in a batch, one row per cutout (columns: :func:`feature_names`).

    * ``flux_<b>``: total flux per band (nanomaggies, the sum of the pixels).
    * ``colour_<a>_<b>``: adjacent-band colours of the total fluxes, asinh magnitudes softened by the
      per-object flux noise (:func:`asinh_colour`), so negative fluxes give finite colours.
    * ``colour_central_<blue>_<red>``: bluest minus reddest band inside ``central_radius_arcsec`` of the
      cutout centre, and its difference from the same total colour.
    * ``concentration``: positive flux of the band sum inside ``central_radius_arcsec`` over that inside
      ``outer_radius_arcsec`` (capped at the cutout's half width).
    * ``size_arcsec2``, ``ellipticity``: flux-weighted second moments of the band sum's positive pixels whose
      per-pixel S/N exceeds ``moment_snr_min``: size ``(Qxx + Qyy) / 2`` (σ² for a Gaussian) and
      ``|e| = sqrt((Qxx - Qyy)² + 4 Qxy²) / (Qxx + Qyy)`` ((a² - b²)/(a² + b²) for axes a, b).
    * ``asymmetry``: ``Σ|I - rot180(I)| / (2 Σ|I|)`` of the band sum (0 for a point-symmetric image).
    * ``n_peaks_5sigma``, ``max_peak_separation_arcsec``: local maxima of the detection image
      (band sum / its noise) within a ``peak_footprint_arcsec`` box that exceed ``peak_snr_min``, and
      the largest distance between two of the ``MAX_PEAKS`` brightest (0 for fewer than two).
    * ``peak_flux_fraction``: brightest pixel of the band sum over its total positive flux.

    Caller arrays are not modified.
    """
    from scipy.ndimage import maximum_filter

    bands = list(bands)
    x, v = _check(images, variance, pixel_scale_arcsec, bands)
    n, nb, h, w = x.shape
    out = {}
    flux = x.sum(axis=(2, 3))  # (N, B)
    flux_var = v.sum(axis=(2, 3))
    soft = np.sqrt(np.maximum(flux_var.mean(axis=1), 1e-30))  # one softening per object: flat spectrum -> 0
    for i, b in enumerate(bands):
        out[f"flux_{b}"] = flux[:, i]
    for i in range(nb - 1):
        out[f"colour_{bands[i]}_{bands[i + 1]}"] = asinh_colour(flux[:, i], flux[:, i + 1], soft)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r_arcsec = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) * pixel_scale_arcsec
    r_outer = min(outer_radius_arcsec, 0.5 * min(h, w) * pixel_scale_arcsec)
    inner = r_arcsec <= central_radius_arcsec
    outer = r_arcsec <= r_outer
    if nb > 1:
        central = x[:, [0, -1]][:, :, inner].sum(axis=2)  # (N, 2)
        c_soft = np.sqrt(np.maximum(v[:, :, inner].sum(axis=2).mean(axis=1), 1e-30))
        c_col = asinh_colour(central[:, 0], central[:, 1], c_soft)
        total = asinh_colour(flux[:, 0], flux[:, -1], soft)
        out[f"colour_central_{bands[0]}_{bands[-1]}"] = c_col
        out[f"colour_central_minus_total_{bands[0]}_{bands[-1]}"] = c_col - total

    img = x.sum(axis=1)  # (N, H, W) band sum
    noise = np.sqrt(np.maximum(v.sum(axis=1), 1e-30))
    snr = img / noise
    pos = np.clip(img, 0.0, None)
    pos_outer = pos[:, outer].sum(axis=1)
    out["concentration"] = np.divide(pos[:, inner].sum(axis=1), pos_outer, out=np.zeros(n), where=pos_outer > 0)

    wgt = np.where(snr > moment_snr_min, pos, 0.0)
    wsum = wgt.sum(axis=(1, 2))
    ok = wsum > 0
    safe = np.where(ok, wsum, 1.0)
    cy = (wgt * yy).sum(axis=(1, 2)) / safe
    cx = (wgt * xx).sum(axis=(1, 2)) / safe
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    qyy = (wgt * dy * dy).sum(axis=(1, 2)) / safe
    qxx = (wgt * dx * dx).sum(axis=(1, 2)) / safe
    qxy = (wgt * dx * dy).sum(axis=(1, 2)) / safe
    trace = qxx + qyy
    out["size_arcsec2"] = np.where(ok, trace / 2 * pixel_scale_arcsec**2, 0.0)
    out["ellipticity"] = np.divide(np.hypot(qxx - qyy, 2 * qxy), trace, out=np.zeros(n), where=trace > 0)

    absum = np.abs(img).sum(axis=(1, 2))
    rot = img[:, ::-1, ::-1]
    out["asymmetry"] = np.divide(np.abs(img - rot).sum(axis=(1, 2)), 2 * absum, out=np.zeros(n), where=absum > 0)

    half = max(1, int(round(peak_footprint_arcsec / pixel_scale_arcsec / 2)))
    is_peak = (snr == maximum_filter(snr, size=(1, 2 * half + 1, 2 * half + 1), mode="constant",
                                     cval=-np.inf)) & (snr > peak_snr_min)
    out["n_peaks_5sigma"] = is_peak.sum(axis=(1, 2)).astype(float)
    out["max_peak_separation_arcsec"] = _max_peak_separation(is_peak, snr) * pixel_scale_arcsec
    out["peak_flux_fraction"] = np.divide(img.max(axis=(1, 2)), pos.sum(axis=(1, 2)), out=np.zeros(n),
                                          where=pos.sum(axis=(1, 2)) > 0)
    return pd.DataFrame(out, columns=feature_names(bands))


def _max_peak_separation(is_peak: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Largest pixel distance between two of each object's MAX_PEAKS brightest peaks (0 with fewer than two)."""
    n, h, w = is_peak.shape
    ranked = np.where(is_peak, snr, -np.inf).reshape(n, -1)
    k = min(MAX_PEAKS, h * w)
    top = np.argpartition(-ranked, k - 1, axis=1)[:, :k]  # (N, k) flat indices
    valid = np.isfinite(np.take_along_axis(ranked, top, axis=1))
    py, px = np.divmod(top, w)
    d2 = (py[:, :, None] - py[:, None, :]) ** 2 + (px[:, :, None] - px[:, None, :]) ** 2
    d2 = np.where(valid[:, :, None] & valid[:, None, :], d2, 0)
    return np.sqrt(d2.max(axis=(1, 2)).astype(float))


def _auroc_or_nan(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")


MIN_PER_CLASS = 5  # lenses and non-lenses each that shortcut_auroc needs to train


def shortcut_auroc(train_X: pd.DataFrame, train_y, eval_sets: Mapping[str, tuple], *, seed: int = 0,
                   max_depth: int = 3, n_estimators: int = 400, learning_rate: float = 0.1,
                   early_stopping_fraction: float = 0.2, n_jobs: int = 1) -> dict:
    """Train an XGBoost classifier on lensing-agnostic features and score each evaluation set.

    ``eval_sets`` maps a name to ``(X, y)`` or ``(X, y, kinds)``, ``kinds`` each row's non-lens type (ignored for
    lenses). ``early_stopping_fraction`` of the training rows (stratified) is held out for
    early stopping on log loss. Returns ``auroc`` (name -> AUROC, NaN for a set
    without both classes), ``n_lenses``/``n_nonlenses`` per set, ``scores`` (name -> each row's probability),
    ``auroc_by_kind`` (name -> :func:`~.metrics.auroc_by_kind`, for the sets given with kinds: which non-lens
    types the statistics alone tell from lenses), ``feature_importance`` (gain, normalized to sum 1), ``n_train``
    and ``best_iteration``.
    """
    from sklearn.model_selection import train_test_split
    from xgboost import XGBClassifier

    X = pd.DataFrame(train_X)
    y = np.asarray(train_y)
    if len(X) != len(y):
        raise ValueError(f"train_X has {len(X)} rows but train_y has {len(y)}")
    if not np.isin(y, (0, 1)).all():
        bad = [v.item() for v in np.unique(y) if v not in (0, 1)]
        raise ValueError(f"train_y must be 0 or 1, got values {bad[:5]}")
    y = y.astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ValueError(f"shortcut_auroc needs at least {MIN_PER_CLASS} lenses and {MIN_PER_CLASS} non-lenses to "
                         f"train, got {counts[1]} lenses and {counts[0]} non-lenses")
    if not 0 < early_stopping_fraction < 1:
        raise ValueError(f"early_stopping_fraction must lie in (0, 1), got {early_stopping_fraction}")
    for name, (ex, ey, *kinds) in eval_sets.items():
        if list(pd.DataFrame(ex).columns) != list(X.columns):
            raise ValueError(f"eval set {name!r} has columns {list(pd.DataFrame(ex).columns)}, train_X has "
                             f"{list(X.columns)}")
        if kinds and len(kinds[0]) != len(ey):
            raise ValueError(f"eval set {name!r} has {len(ey)} rows but {len(kinds[0])} kinds")
    fit_X, stop_X, fit_y, stop_y = train_test_split(X, y, test_size=early_stopping_fraction, stratify=y,
                                                    random_state=seed)
    model = XGBClassifier(max_depth=max_depth, n_estimators=n_estimators, learning_rate=learning_rate,
                          subsample=0.8, colsample_bytree=0.8, eval_metric="logloss", early_stopping_rounds=30,
                          tree_method="hist", random_state=seed, n_jobs=n_jobs)
    model.fit(fit_X, fit_y, eval_set=[(stop_X, stop_y)], verbose=False)
    out = {"auroc": {}, "n_lenses": {}, "n_nonlenses": {}, "scores": {}, "auroc_by_kind": {}}
    for name, (ex, ey, *kinds) in eval_sets.items():
        ey = np.asarray(ey).astype(int)
        ex = pd.DataFrame(ex)
        s = model.predict_proba(ex)[:, 1] if len(ex) else np.empty(0)
        out["auroc"][name] = _auroc_or_nan(ey, s)
        out["scores"][name] = s
        if kinds:
            out["auroc_by_kind"][name] = auroc_by_kind(ey, s, kinds[0])
        out["n_lenses"][name] = int((ey == 1).sum())
        out["n_nonlenses"][name] = int((ey == 0).sum())
    gain = model.get_booster().get_score(importance_type="gain")
    total = sum(gain.values()) or 1.0
    out["feature_importance"] = {c: float(gain.get(c, 0.0) / total) for c in X.columns}
    out["n_train"] = int(len(X))
    out["best_iteration"] = int(getattr(model, "best_iteration", n_estimators - 1))
    return out


def importance_plot(importance: Mapping[str, float], path, *, title: str = ""):
    """Horizontal bars of the shortcut classifier's feature importances (gain share), largest on top; PNG at
    ``path``. matplotlib is imported only here."""
    from .plots import _pyplot, _save

    items = sorted(importance.items(), key=lambda kv: kv[1])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 0.22 * len(items) + 1.0))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:orange")
    ax.set_xlabel("share of total gain")
    ax.tick_params(axis="y", labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, path)
