"""Bologna Lens Finding Challenge metrics (Metcalf et al. 2019) and calibration error.

Definitions (docs/metrics.md):

* TPR0: fraction of lenses scored strictly above the highest non-lens score.
* TPR10: fraction of lenses scored strictly above the 10th-highest non-lens score
  (fewer than ten false positives). It depends on how many non-lenses there are:
  report ``n_nonlenses`` beside it. With fewer than ten non-lenses every
  threshold makes fewer than ten false positives, so TPR10 is 1.
* ``tpr_at_fpr(0.1)``: the highest TPR with FPR <= 0.1 (an operating point, not TPR10).
* ECE: 15 equal-mass bins of calibrated probability.
* FNR per lensed-flux-ratio bin (< 0.1, 0.1-0.3, >= 0.3) at the TPR10 threshold.

Where the simulation's truth gives each lens's arc S/N (the matched-filter S/N of
its noiseless lensed light), :func:`noise_limited_fnr` is the FNR that an observer
who knew every arc exactly would have at the same number of false positives: the
floor set by the noise, below which no classifier can go.
"""

from __future__ import annotations

import numpy as np

__all__ = ["threshold_at_n_false_positives", "tpr_at_n_false_positives", "tpr0", "tpr10", "tpr_at_fpr",
           "expected_calibration_error", "fnr_by_bins", "noise_limited_fnr", "FLUX_RATIO_BINS", "THETA_E_BINS",
           "ARC_SNR_BINS", "bologna_metrics", "bootstrap_interval", "BOOTSTRAP_METRICS", "paired_win_rate",
           "paired_by_bins", "auroc_by_kind", "error_rate_by_uncertainty"]

FLUX_RATIO_BINS = (("lt_0.1", 0.0, 0.1), ("0.1_0.3", 0.1, 0.3), ("ge_0.3", 0.3, np.inf))
# Einstein radius (arcsec): below ~0.8" a ground-based survey's seeing hides the arcs
THETA_E_BINS = (("lt_0.8", 0.0, 0.8), ("0.8_1.2", 0.8, 1.2), ("1.2_2", 1.2, 2.0), ("ge_2", 2.0, np.inf))
THETA_E_HALVES = (("lt_1.2", 0.0, 1.2), ("ge_1.2", 1.2, np.inf))  # the summary table's two rows
# matched-filter S/N of the lensed light: below ~3 the arcs are in the noise for any detector
ARC_SNR_BINS = (("lt_3", 0.0, 3.0), ("3_5", 3.0, 5.0), ("5_10", 5.0, 10.0), ("10_30", 10.0, 30.0),
                ("ge_30", 30.0, np.inf))
# lenses whose arcs no survey could miss: their AUROC against every non-lens says whether a finder that fails a
# set fails it on visibility (the labels of lenses nobody could see) or on learning (it misses plain arcs)
BRIGHT_ARC_SNR = 100.0


def _split(labels, scores):
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        bad = sorted(v.item() for v in np.unique(y) if v not in (0, 1))
        raise ValueError(f"labels must be 0 or 1, got values {bad[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0:
        raise ValueError("no lenses (label 1) among the labels")
    return pos, neg


def threshold_at_n_false_positives(labels, scores, n: int) -> float:
    """The score a lens must strictly exceed to be found with fewer than ``n + 1`` false positives:
    the (n+1)-th highest non-lens score (``-inf`` when there are at most ``n`` non-lenses)."""
    _, neg = _split(labels, scores)
    if len(neg) <= n:
        return -np.inf
    return float(np.sort(neg)[::-1][n])


def tpr_at_n_false_positives(labels, scores, n: int) -> float:
    """Fraction of lenses scored strictly above the (n+1)-th highest non-lens score."""
    pos, _ = _split(labels, scores)
    return float(np.mean(pos > threshold_at_n_false_positives(labels, scores, n)))


def tpr0(labels, scores) -> float:
    return tpr_at_n_false_positives(labels, scores, 0)


def tpr10(labels, scores) -> float:
    """Lenses found before the tenth false positive: strictly above the 10th-highest non-lens."""
    return tpr_at_n_false_positives(labels, scores, 9)


def tpr_at_fpr(labels, scores, max_fpr: float) -> float:
    """Highest TPR over thresholds whose FPR is at most ``max_fpr`` (scikit-learn's ROC curve)."""
    from sklearn.metrics import roc_curve

    _split(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= max_fpr].max())


def expected_calibration_error(labels, probs, *, n_bins: int = 15) -> float:
    """ECE with equal-mass bins: sum over bins of (bin share) x |observed lens rate - mean probability|."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    order = np.argsort(p, kind="stable")
    ece = 0.0
    for idx in np.array_split(order, min(n_bins, len(p))):
        if len(idx):
            ece += len(idx) / len(p) * abs(y[idx].mean() - p[idx].mean())
    return float(ece)


def fnr_by_bins(labels, scores, values, bins, *, threshold: float) -> dict:
    """False-negative rate of lenses in each ``(name, low, high)`` bin of ``values`` at ``threshold``
    (a lens is found when its score is strictly above it), with the bin's lens count."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    v = np.asarray(values, dtype=float)
    out = {}
    for name, lo, hi in bins:
        m = (y == 1) & (v >= lo) & (v < hi)
        out[name] = {"n_lenses": int(m.sum()),
                     "fnr": float(np.mean(s[m] <= threshold)) if m.any() else float("nan")}
    return out


def noise_limited_fnr(arc_snr, *, n_nonlenses: int, n_false_positives: int = 9) -> np.ndarray:
    """Per lens, the chance that an observer who knew its noiseless lensed light exactly misses it at the
    threshold that lets ``n_false_positives`` of ``n_nonlenses`` through (TPR10: 9, i.e. fewer than ten).

    That observer's statistic (the matched filter) is N(0, 1) on a cutout without
    the arcs and N(arc_snr, 1) with them, so the threshold is
    ``z = Φ⁻¹(1 - (n_false_positives + 1) / n_nonlenses)`` and the miss probability
    ``Φ(z - arc_snr)``. It is a floor: a real finder does not know where the arcs
    are or what they look like, and hard negatives look like arcs.
    """
    from scipy.stats import norm

    if n_nonlenses <= n_false_positives:
        return np.zeros(np.shape(arc_snr))
    z = norm.isf((n_false_positives + 1) / n_nonlenses)
    return norm.cdf(z - np.asarray(arc_snr, dtype=float))


def bologna_metrics(labels, scores, *, flux_ratio=None, theta_e=None, arc_snr=None, probs=None) -> dict:
    """The report's headline figures (report.json and metadata keys: docs/metrics.md).

    Ranking figures use ``scores``; ECE uses ``probs``. FNR per flux-ratio bin and
    recall per θE bin (``recall_theta_e_<bin>``) are taken at the TPR10 threshold; ``auroc_flux_ratio_<bin>`` and
    ``auroc_theta_e_<bin>`` rank each bin's lenses against every non-lens.
    With ``arc_snr`` (NaN where unknown): recall per arc-S/N bin
    (``recall_arc_snr_<bin>``), the AUROC of the lenses of arc S/N ≥ 100 against every
    non-lens (``auroc_arc_snr_ge_100``) and, per flux-ratio bin, the noise-limited FNR floor
    (``noise_limited_fnr_flux_ratio_<bin>``, :func:`noise_limited_fnr`) over lenses
    whose arc S/N is known.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    pos, neg = _split(labels, scores)
    out = {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "tpr0": tpr0(labels, scores),
        "tpr10": tpr10(labels, scores),
        "tpr_at_fpr_0.1": tpr_at_fpr(labels, scores, 0.1),
        "tpr_at_fpr_0.001": tpr_at_fpr(labels, scores, 1e-3),
        "n_test_lenses": float(len(pos)),
        "n_test_nonlenses": float(len(neg)),
    }
    if probs is not None:
        out["ece"] = expected_calibration_error(labels, probs)
    if flux_ratio is not None:
        thr = threshold_at_n_false_positives(labels, scores, 9)
        for name, v in fnr_by_bins(labels, scores, flux_ratio, FLUX_RATIO_BINS, threshold=thr).items():
            out[f"fnr_flux_ratio_{name}"] = v["fnr"]
            out[f"n_lenses_flux_ratio_{name}"] = float(v["n_lenses"])
        # the ranking behind that FNR, which stays informative where the FNR is 1: the bin's lenses against every
        # non-lens (NaN for an empty bin)
        for name, lo, hi in FLUX_RATIO_BINS:
            out[f"auroc_flux_ratio_{name}"] = _auroc_of_bin(labels, scores, flux_ratio, lo, hi)
    if theta_e is not None:
        thr = threshold_at_n_false_positives(labels, scores, 9)
        for name, v in fnr_by_bins(labels, scores, theta_e, THETA_E_BINS, threshold=thr).items():
            out[f"recall_theta_e_{name}"] = 1.0 - v["fnr"]
            out[f"n_lenses_theta_e_{name}"] = float(v["n_lenses"])
        for name, lo, hi in THETA_E_BINS + THETA_E_HALVES:  # the bin's lenses against every non-lens (NaN: none)
            out[f"auroc_theta_e_{name}"] = _auroc_of_bin(labels, scores, theta_e, lo, hi)
    if arc_snr is not None:
        thr = threshold_at_n_false_positives(labels, scores, 9)
        for name, v in fnr_by_bins(labels, scores, arc_snr, ARC_SNR_BINS, threshold=thr).items():
            out[f"recall_arc_snr_{name}"] = 1.0 - v["fnr"]
            out[f"n_lenses_arc_snr_{name}"] = float(v["n_lenses"])
        out["auroc_arc_snr_ge_100"] = _auroc_of_bin(labels, scores, arc_snr, BRIGHT_ARC_SNR, np.inf)
        if flux_ratio is not None:
            y, snr, fr = np.asarray(labels), np.asarray(arc_snr, dtype=float), np.asarray(flux_ratio, dtype=float)
            floor = noise_limited_fnr(snr, n_nonlenses=len(neg))
            for name, lo, hi in FLUX_RATIO_BINS:
                m = (y == 1) & (fr >= lo) & (fr < hi) & np.isfinite(snr)
                out[f"noise_limited_fnr_flux_ratio_{name}"] = float(floor[m].mean()) if m.any() else float("nan")
    return out


def _auroc_of_bin(labels, scores, values, lo: float, hi: float) -> float:
    """AUROC of the lenses whose ``values`` lie in [lo, hi) against every non-lens; NaN when either is empty."""
    from sklearn.metrics import roc_auc_score

    y, s, v = np.asarray(labels), np.asarray(scores, dtype=float), np.asarray(values, dtype=float)
    m = (y == 1) & (v >= lo) & (v < hi)
    neg = s[y == 0]
    if not m.any() or not len(neg):
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(m.sum()), np.zeros(len(neg))], np.r_[s[m], neg]))


BOOTSTRAP_METRICS = ("auroc", "tpr0", "tpr10")


def _weighted_bootstrap(pos, neg, metric, w_pos, w_neg):
    """``metric`` for each row of resampling counts ``w_pos`` (B, n1) over sorted ``pos`` and ``w_neg``
    (B, n0) over sorted ``neg``: a resample is a multiset, so every figure is a weighted count."""
    n1, n0 = len(pos), len(neg)
    if metric == "auroc":
        cum = np.concatenate([np.zeros((len(w_neg), 1)), np.cumsum(w_neg, axis=1)], axis=1)  # (B, n0 + 1)
        below = cum[:, np.searchsorted(neg, pos, side="left")]  # negatives strictly below each lens
        tied = cum[:, np.searchsorted(neg, pos, side="right")] - below
        return ((below + 0.5 * tied) * w_pos).sum(axis=1) / (n1 * n0)
    n_fp = 0 if metric == "tpr0" else 9
    # the (n_fp + 1)-th highest resampled non-lens: first position from the top where the count reaches it
    from_top = np.cumsum(w_neg[:, ::-1], axis=1)
    k = (from_top < n_fp + 1).sum(axis=1)  # index from the top; == n0 when there are too few non-lenses
    thr = np.where(k < n0, neg[::-1][np.minimum(k, n0 - 1)], -np.inf)
    cum_pos = np.concatenate([np.zeros((len(w_pos), 1)), np.cumsum(w_pos, axis=1)], axis=1)
    at_or_below = np.take_along_axis(cum_pos, np.searchsorted(pos, thr, side="right")[:, None], axis=1)[:, 0]
    return (n1 - at_or_below) / n1


def _counts(rng, n, size):
    """(size, n) counts of each of ``n`` items in ``size`` resamples of ``n`` draws with replacement."""
    idx = rng.integers(0, n, (size, n)) + (np.arange(size) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=size * n).reshape(size, n).astype(float)


def bootstrap_interval(labels, scores, metric: str, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                       chunk: int = 100) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` (one of :data:`BOOTSTRAP_METRICS`), resampling lenses
    and non-lenses separately (stratified: every resample keeps the class counts).

    Vectorized: a resample is a row of counts over the sorted scores, ``chunk``
    resamples at a time (1,000 resamples of 10,000 rows take about a second).
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {list(BOOTSTRAP_METRICS)}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    pos, neg = _split(labels, scores)
    if len(neg) == 0:
        raise ValueError("no non-lenses (label 0) among the labels")
    pos, neg = np.sort(pos), np.sort(neg)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        stats.append(_weighted_bootstrap(pos, neg, metric, _counts(rng, len(pos), size), _counts(rng, len(neg), size)))
    lo, hi = np.quantile(np.concatenate(stats), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_win_rate(pair_ids, labels, scores) -> dict:
    """Lens/twin pairs (the same scene rendered with and without deflection): the fraction of pairs whose lens
    scores above its twin (ties count one half), the AUROC of lens members against twin members, and the
    number of complete pairs. Rows whose pair lacks exactly one lens and one twin are left out (counted)."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    df = pd.DataFrame({"pair": np.asarray(pair_ids, dtype=str), "y": np.asarray(labels),
                       "s": np.asarray(scores, dtype=float)})
    df = df[df["pair"] != ""]
    grouped = df.groupby("pair")["y"].agg(["size", "sum"])
    complete = grouped.index[(grouped["size"] == 2) & (grouped["sum"] == 1)]
    pairs = df[df["pair"].isin(complete)]
    out = {"n_pairs": float(len(complete)), "n_rows_not_in_complete_pairs": float(len(df) - len(pairs))}
    if not len(complete):
        return {**out, "win_rate": float("nan"), "auroc": float("nan")}
    wide = pairs.pivot(index="pair", columns="y", values="s")
    diff = wide[1] - wide[0]
    out["win_rate"] = float(((diff > 0) + 0.5 * (diff == 0)).mean())
    out["auroc"] = float(roc_auc_score(pairs["y"], pairs["s"]))
    return out


def paired_by_bins(pair_ids, labels, scores, values, bins) -> dict:
    """:func:`paired_win_rate` of the complete pairs whose lens member's ``values`` (e.g. θE) falls in each bin of
    ``bins`` ((name, low, high), low inclusive): ``{name: {"auroc", "win_rate", "n_pairs"}}``, NaN figures and 0
    pairs for an empty bin. A pair's bin is its lens's: the twin is the same scene, whatever its own row says."""
    import pandas as pd

    df = pd.DataFrame({"pair": np.asarray(pair_ids, dtype=str), "y": np.asarray(labels),
                       "s": np.asarray(scores, dtype=float), "v": np.asarray(values, dtype=float)})
    lens_value = df[df["y"] == 1].groupby("pair")["v"].first()
    out = {}
    for name, lo, hi in bins:
        part = df[df["pair"].isin(lens_value.index[(lens_value >= lo) & (lens_value < hi)])]
        r = paired_win_rate(part["pair"].to_numpy(), part["y"].to_numpy(), part["s"].to_numpy())
        out[name] = {k: r[k] for k in ("auroc", "win_rate", "n_pairs")}
    return out


def auroc_by_kind(labels, scores, kinds) -> dict:
    """AUROC of every lens against the non-lenses of each kind: ``{kind: {"auroc", "n", "share"}}`` (``n`` the
    non-lenses of that kind, ``share`` their fraction of all non-lenses), kinds in order of AUROC, lowest first:
    which non-lens types a finder takes for lenses. The AUROC over all non-lenses is exactly
    ``sum(share * auroc)`` (each non-lens's pairs with every lens), so ``share * (1 - auroc)`` is what a type costs.
    Empty when there are no lenses; a blank or missing kind counts as ``"unknown"``."""
    from sklearn.metrics import roc_auc_score

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    kinds = np.array(["unknown" if k is None or (isinstance(k, float) and np.isnan(k)) or k == "" else str(k)
                      for k in kinds], dtype=object)
    pos = scores[labels == 1]
    if not len(pos):
        return {}
    out = {}
    for kind in sorted(set(kinds[labels == 0])):
        neg = scores[(labels == 0) & (kinds == kind)]
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        out[kind] = {"auroc": float(roc_auc_score(y, np.r_[pos, neg])), "n": float(len(neg)),
                     "share": float(len(neg) / np.count_nonzero(labels == 0))}
    return dict(sorted(out.items(), key=lambda kv: kv[1]["auroc"]))


def error_rate_by_uncertainty(labels, probs, uncertainty, *, n_bins: int = 10, threshold: float = 0.5) -> dict:
    """Whether the flagged-uncertain predictions are where the errors are.

    An error is a prediction on the wrong side of ``threshold`` (calibrated probability >= ``threshold`` for a
    non-lens, below it for a lens). Rows are ordered by ``uncertainty`` and cut into ``n_bins`` equal-count bins
    (deciles by default), least uncertain first; each bin gives its row count, uncertainty range and mean, and error
    rate. ``error_auroc`` is the AUROC of the uncertainty as a detector of the errors (0.5: it says nothing about
    them; NaN without both errors and correct predictions), ``margin_error_auroc`` the same for the probability's
    closeness to the threshold alone (``-|p - threshold|``: what an uncertainty must beat to add anything),
    ``spearman`` the rank correlation of bin order and error rate. Rows with a non-finite uncertainty are left out
    and counted (``n_unmeasured``); with none measured the bins are empty.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    u = np.asarray(uncertainty, dtype=float)
    ok = np.isfinite(u)
    out = {"n": int(ok.sum()), "n_unmeasured": int((~ok).sum()), "threshold": float(threshold), "bins": [],
           "error_auroc": float("nan"), "margin_error_auroc": float("nan"), "spearman": float("nan"),
           "error_rate": float("nan")}
    if not ok.any():
        return out
    y, p, u = y[ok], p[ok], u[ok]
    wrong = ((p >= threshold).astype(int) != y).astype(float)
    out["error_rate"] = float(wrong.mean())
    order = np.argsort(u, kind="stable")
    for i, idx in enumerate(np.array_split(order, min(n_bins, len(u)))):
        out["bins"].append({"bin": i + 1, "n": int(len(idx)), "uncertainty_low": float(u[idx].min()),
                            "uncertainty_high": float(u[idx].max()), "uncertainty_mean": float(u[idx].mean()),
                            "error_rate": float(wrong[idx].mean())})
    if 0 < wrong.sum() < len(wrong):
        out["error_auroc"] = float(roc_auc_score(wrong, u))
        out["margin_error_auroc"] = float(roc_auc_score(wrong, -np.abs(p - threshold)))
    rates = [b["error_rate"] for b in out["bins"]]
    if len(rates) > 1 and np.ptp(rates) > 0:
        out["spearman"] = float(spearmanr(np.arange(len(rates)), rates).statistic)
    return out
