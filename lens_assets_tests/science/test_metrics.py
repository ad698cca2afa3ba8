import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lens_assets.science.metrics import (FLUX_RATIO_BINS, auroc_by_kind, bologna_metrics, bootstrap_interval,
                                         expected_calibration_error, fnr_by_bins, paired_by_bins, paired_win_rate,
                                         threshold_at_n_false_positives, tpr0, tpr10, tpr_at_fpr)


def test_tpr0_on_six_scores_with_a_tie():
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.8, 0.3, 0.1]
    # highest non-lens 0.8; only 0.9 is strictly above (the lens tied at 0.8 does not count)
    assert tpr0(labels, scores) == pytest.approx(1 / 3)


def test_tpr10_counts_lenses_strictly_above_the_tenth_highest_nonlens():
    neg = np.arange(20, dtype=float)  # 0..19: tenth highest is 10
    pos = np.array([10.0, 10.5, 12.0, 25.0, 3.0])
    labels = np.r_[np.ones(5), np.zeros(20)].astype(int)
    scores = np.r_[pos, neg]
    assert threshold_at_n_false_positives(labels, scores, 9) == 10.0
    assert tpr10(labels, scores) == pytest.approx(3 / 5)  # 10.5, 12, 25; the lens at 10.0 ties
    assert tpr0(labels, scores) == pytest.approx(1 / 5)  # only 25 beats 19


def test_tpr10_with_fewer_than_ten_nonlenses_is_one():
    assert tpr10([1, 0, 0], [0.1, 0.5, 0.9]) == 1.0


def test_tpr_at_fpr_is_the_best_tpr_within_the_fpr_budget_and_not_tpr10():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(300), np.zeros(700)].astype(int)
    scores = np.r_[rng.normal(1.5, 1, 300), rng.normal(0, 1, 700)]
    fpr, tpr, _ = roc_curve(labels, scores)
    assert tpr_at_fpr(labels, scores, 0.1) == tpr[fpr <= 0.1].max()
    assert tpr_at_fpr(labels, scores, 0.1) != tpr10(labels, scores)


def test_tpr_at_fpr_admits_a_threshold_at_exactly_the_fpr_budget():
    # non-lenses 0..9, lenses 8.5 and 9.5: above 8.5 lie both lenses and one non-lens (9), FPR exactly 1/10
    labels = np.r_[np.zeros(10), 1, 1].astype(int)
    scores = np.r_[np.arange(10.0), 8.5, 9.5]
    assert tpr_at_fpr(labels, scores, 0.1) == 1.0
    assert tpr_at_fpr(labels, scores, 0.099) == 0.5  # only 9.5 without a false positive


def test_bologna_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(200), np.zeros(800)].astype(int)
    scores = np.round(np.r_[rng.normal(2, 1, 200), rng.normal(0, 1, 800)], 1)  # rounded: many ties
    m = bologna_metrics(labels, scores)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["auprc"] == pytest.approx(average_precision_score(labels, scores))
    assert (m["n_test_lenses"], m["n_test_nonlenses"]) == (200.0, 800.0)
    assert m["tpr0"] <= m["tpr10"] <= 1.0


def test_ece_with_equal_mass_bins_by_hand():
    # 4 bins of 2 (n_bins >= n falls back to one bin per prediction when asked for more than there are)
    labels = [0, 0, 1, 0, 1, 1, 1, 1]
    probs = [0.1, 0.1, 0.4, 0.4, 0.6, 0.6, 0.9, 0.9]
    # bins: (0.1,0.1)->|0-0.1|=0.1; (0.4,0.4)->|0.5-0.4|=0.1; (0.6,0.6)->|1-0.6|=0.4; (0.9,0.9)->|1-0.9|=0.1
    assert expected_calibration_error(labels, probs, n_bins=4) == pytest.approx((0.1 + 0.1 + 0.4 + 0.1) / 4)
    rng = np.random.default_rng(2)
    p = rng.uniform(size=200_000)
    assert expected_calibration_error(rng.uniform(size=p.size) < p, p) < 0.005  # calibrated by construction


def test_fnr_by_flux_ratio_bins_at_a_threshold():
    labels = [1, 1, 1, 1, 0]
    scores = [0.2, 0.9, 0.6, 0.4, 0.5]
    flux = [0.05, 0.05, 0.2, 0.5, 0.0]
    out = fnr_by_bins(labels, scores, flux, FLUX_RATIO_BINS, threshold=0.5)
    assert out["lt_0.1"] == {"n_lenses": 2, "fnr": 0.5}
    assert out["0.1_0.3"] == {"n_lenses": 1, "fnr": 0.0}
    assert out["ge_0.3"] == {"n_lenses": 1, "fnr": 1.0}


def test_auroc_per_flux_ratio_bin_by_hand():
    # two faint lenses (0.2, 0.9) against the non-lenses (0.5, 0.3): they win 0 + 2 of 4 pairs -> 0.5;
    # the one mid-flux lens (0.6) wins both -> 1.0; the bright one (0.1) loses both -> 0.0
    labels = [1, 1, 1, 1, 0, 0]
    scores = [0.2, 0.9, 0.6, 0.1, 0.5, 0.3]
    flux = [0.05, 0.05, 0.2, 0.5, 0.0, 0.0]
    m = bologna_metrics(labels, scores, flux_ratio=flux)
    assert m["auroc_flux_ratio_lt_0.1"] == pytest.approx(0.5)
    assert m["auroc_flux_ratio_0.1_0.3"] == pytest.approx(1.0)
    assert m["auroc_flux_ratio_ge_0.3"] == pytest.approx(0.0)
    assert m["auroc_flux_ratio_lt_0.1"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.2, 0.9, 0.5, 0.3]))
    assert np.isnan(bologna_metrics([1, 0], [0.4, 0.1], flux_ratio=[0.5, 0.0])["auroc_flux_ratio_lt_0.1"])


def test_auroc_per_einstein_radius_bin_by_hand():
    # lenses at theta_E 0.5 (score 0.2), 1.0 (0.9), 1.5 (0.6), 2.5 (0.1) against non-lenses 0.5, 0.3 (theta_E 0)
    labels = [1, 1, 1, 1, 0, 0]
    scores = [0.2, 0.9, 0.6, 0.1, 0.5, 0.3]
    theta = [0.5, 1.0, 1.5, 2.5, 0.0, 0.0]
    m = bologna_metrics(labels, scores, theta_e=theta)
    assert (m["auroc_theta_e_lt_0.8"], m["auroc_theta_e_0.8_1.2"]) == (pytest.approx(0.0), pytest.approx(1.0))
    assert (m["auroc_theta_e_1.2_2"], m["auroc_theta_e_ge_2"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert m["auroc_theta_e_lt_1.2"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.2, 0.9, 0.5, 0.3]))  # 2 of 4
    assert m["auroc_theta_e_ge_1.2"] == pytest.approx(0.5)  # 0.6 wins both, 0.1 neither
    assert np.isnan(bologna_metrics([1, 0], [0.4, 0.1], theta_e=[0.5, 0.0])["auroc_theta_e_ge_1.2"])


def test_auroc_of_the_bright_arc_lenses_by_hand():
    # lenses at arc S/N 150 (score 0.2) and 400 (0.9) against non-lenses 0.5, 0.3: 2 of 4 pairs won -> 0.5; the
    # S/N-20 lens (0.1) is left out, though it would lower the AUROC of all lenses
    labels = [1, 1, 1, 0, 0]
    scores = [0.2, 0.9, 0.1, 0.5, 0.3]
    m = bologna_metrics(labels, scores, arc_snr=[150.0, 400.0, 20.0, 0.0, 0.0])
    assert m["auroc_arc_snr_ge_100"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(2 / 6)
    assert np.isnan(bologna_metrics([1, 0], [0.4, 0.1], arc_snr=[50.0, 0.0])["auroc_arc_snr_ge_100"])


@pytest.mark.parametrize("labels,scores,match", [
    ([1, 0], [0.5], r"labels and scores must be 1-D of one length"),
    ([1, 2], [0.5, 0.1], r"labels must be 0 or 1, got values \[2\]"),
    ([0, 0], [0.5, 0.1], r"no lenses \(label 1\) among the labels"),
    ([1, 0], [np.nan, 0.1], r"scores must be finite"),
])
def test_bad_inputs_are_clear_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        tpr0(labels, scores)


def test_recall_by_einstein_radius_bins_at_the_tpr10_threshold_by_hand():
    from lens_assets.science.metrics import THETA_E_BINS

    assert [b[0] for b in THETA_E_BINS] == ["lt_0.8", "0.8_1.2", "1.2_2", "ge_2"]
    # twelve non-lenses scored 1..12: the 10th-highest is 3, so a lens is found when its score is > 3
    neg_scores = np.arange(1.0, 13.0)
    neg_theta = np.full(12, 1.0)  # a non-lens's θE (here inside a bin) never counts
    lenses = [  # (θE arcsec, score)
        (0.5, 2.0), (0.7, 3.0), (0.79, 3.5),  # lt_0.8: missed, tied at the threshold (missed), found -> 1/3
        (0.8, 10.0), (1.0, 1.0),  # 0.8_1.2 (0.8 is its lower edge): found, missed -> 1/2
        (1.2, 4.0), (1.5, 20.0), (1.99, 13.0), (1.6, 0.5),  # 1.2_2: found, found, found, missed -> 3/4
        (2.0, 2.5),  # ge_2 (2.0 is its lower edge): missed -> 0/1
        (np.nan, 50.0),  # unknown θE: found, but in no bin
    ]
    theta = np.r_[[t for t, _ in lenses], neg_theta]
    scores = np.r_[[s for _, s in lenses], neg_scores]
    labels = np.r_[np.ones(len(lenses)), np.zeros(12)].astype(int)
    m = bologna_metrics(labels, scores, theta_e=theta)
    expected = {"lt_0.8": (3, 1 / 3), "0.8_1.2": (2, 1 / 2), "1.2_2": (4, 3 / 4), "ge_2": (1, 0.0)}
    for name, (n, recall) in expected.items():
        assert m[f"n_lenses_theta_e_{name}"] == n, name
        assert m[f"recall_theta_e_{name}"] == pytest.approx(recall), name
    assert m["tpr10"] == pytest.approx(6 / 11)  # the five found in bins and the one with unknown θE
    assert "fnr_flux_ratio_lt_0.1" not in m  # flux-ratio bins only when flux ratios are given

    # without the lens at θE 2.0 the ge_2 bin is empty: no lenses, recall undefined (NaN), not 0 or 1
    keep = theta != 2.0
    m = bologna_metrics(labels[keep], scores[keep], theta_e=theta[keep])
    assert m["n_lenses_theta_e_ge_2"] == 0 and np.isnan(m["recall_theta_e_ge_2"])
    assert m["recall_theta_e_1.2_2"] == pytest.approx(3 / 4)


def test_noise_limited_fnr_is_the_matched_filter_miss_rate_at_the_tpr10_false_alarm_rate():
    from scipy.stats import norm

    from lens_assets.science.metrics import noise_limited_fnr

    # 1000 non-lenses, 9 false positives allowed: the threshold is the 1% upper tail, z = 2.3263
    z = 2.3263478740408408
    got = noise_limited_fnr([0.0, z, z + 1.6448536269514722, 30.0], n_nonlenses=1000)
    np.testing.assert_allclose(got, [0.99, 0.5, 0.05, 0.0], atol=1e-9)
    # an independent check: a lens with S/N 3 against N(0,1) noise cutouts, by simulation
    rng = np.random.default_rng(0)
    null = rng.standard_normal(200_000)
    thr = np.quantile(null, 1 - 10 / 1000)
    assert np.mean(3.0 + rng.standard_normal(200_000) <= thr) == pytest.approx(
        noise_limited_fnr([3.0], n_nonlenses=1000)[0], abs=0.005)
    assert noise_limited_fnr([1.0, 2.0], n_nonlenses=9).tolist() == [0.0, 0.0]  # no threshold below 10 non-lenses
    assert norm.cdf(z - 0.0) == pytest.approx(0.99)


def test_recall_by_arc_snr_and_the_noise_floor_per_flux_bin_by_hand():
    from lens_assets.science.metrics import ARC_SNR_BINS, noise_limited_fnr

    assert [b[0] for b in ARC_SNR_BINS] == ["lt_3", "3_5", "5_10", "10_30", "ge_30"]
    neg_scores = np.arange(1.0, 13.0)  # the 10th-highest is 3: a lens is found when its score is > 3
    lenses = [  # (arc S/N, flux ratio, score)
        (1.0, 0.05, 2.0), (2.5, 0.05, 9.0),  # lt_3: missed, found -> 1/2
        (4.0, 0.2, 1.0),  # 3_5: missed -> 0
        (7.0, 0.5, 20.0), (50.0, 0.5, 30.0),  # 5_10 found; ge_30 found
        (np.nan, 0.05, 40.0),  # unknown S/N: in no S/N bin, not in the floor
    ]
    snr = np.r_[[a for a, _, _ in lenses], np.zeros(12)]
    fr = np.r_[[f for _, f, _ in lenses], np.full(12, np.nan)]
    scores = np.r_[[s for _, _, s in lenses], neg_scores]
    labels = np.r_[np.ones(len(lenses)), np.zeros(12)].astype(int)
    m = bologna_metrics(labels, scores, flux_ratio=fr, arc_snr=snr)
    assert (m["recall_arc_snr_lt_3"], m["n_lenses_arc_snr_lt_3"]) == (0.5, 2)
    assert (m["recall_arc_snr_3_5"], m["recall_arc_snr_5_10"], m["recall_arc_snr_ge_30"]) == (0.0, 1.0, 1.0)
    assert m["n_lenses_arc_snr_10_30"] == 0 and np.isnan(m["recall_arc_snr_10_30"])
    floor = noise_limited_fnr([1.0, 2.5, 4.0, 7.0, 50.0], n_nonlenses=12)
    assert m["noise_limited_fnr_flux_ratio_lt_0.1"] == pytest.approx(floor[:2].mean())
    assert m["noise_limited_fnr_flux_ratio_0.1_0.3"] == pytest.approx(floor[2])
    assert m["noise_limited_fnr_flux_ratio_ge_0.3"] == pytest.approx(floor[3:].mean())
    assert "noise_limited_fnr_flux_ratio_lt_0.1" not in bologna_metrics(labels, scores, flux_ratio=fr)


# ---------------------------------------------------------------- bootstrap intervals and lens/twin pairs


def _sample(rng, n, *, separation=1.0):
    y = np.repeat([0, 1], n // 2)
    return y, rng.normal(separation * y, 1.0)


@pytest.mark.parametrize("metric", ["auroc", "tpr0", "tpr10"])
def test_weighted_resamples_equal_the_metric_on_explicitly_repeated_rows(metric):
    from lens_assets.science.metrics import _counts, _weighted_bootstrap

    rng = np.random.default_rng(3)
    pos, neg = np.sort(np.round(rng.normal(1, 1, 40), 1)), np.sort(np.round(rng.normal(0, 1, 60), 1))  # ties
    w_pos, w_neg = _counts(rng, 40, 7), _counts(rng, 60, 7)
    got = _weighted_bootstrap(pos, neg, metric, w_pos, w_neg)
    for b in range(7):
        p, n = np.repeat(pos, w_pos[b].astype(int)), np.repeat(neg, w_neg[b].astype(int))
        y, s = np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n]
        want = {"auroc": roc_auc_score(y, s), "tpr0": tpr0(y, s), "tpr10": tpr10(y, s)}[metric]
        assert got[b] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("metric", ["auroc", "tpr0", "tpr10"])
def test_bootstrap_interval_contains_the_point_estimate(metric):
    y, s = _sample(np.random.default_rng(0), 2000)
    point = {"auroc": roc_auc_score(y, s), "tpr0": tpr0(y, s), "tpr10": tpr10(y, s)}[metric]
    lo, hi = bootstrap_interval(y, s, metric, n_boot=400, seed=1)
    assert lo <= point <= hi and lo < hi


@pytest.mark.parametrize("seed", [0, 1])
def test_bootstrap_interval_of_auroc_has_the_width_of_its_level_under_delong(seed):
    """The percentile interval at level 0.95 spans about 2 x 1.96 DeLong standard errors (DeLong et al. 1988,
    from the placement values); at level 0.9 it would span 2 x 1.645 of them, 16% less."""
    from scipy.stats import norm

    y, s = _sample(np.random.default_rng(seed), 2000)
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    se = np.sqrt(psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg))
    for level in (0.95, 0.9):
        lo, hi = bootstrap_interval(y, s, "auroc", n_boot=2000, seed=seed, level=level)
        assert (hi - lo) / (2 * norm.ppf((1 + level) / 2) * se) == pytest.approx(1.0, abs=0.07)


def test_bootstrap_interval_of_auroc_narrows_as_one_over_root_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (1000, 4000, 16000):
        lo, hi = bootstrap_interval(*_sample(rng, n), "auroc", n_boot=500, seed=2)
        widths.append(hi - lo)
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.25)
    assert widths[1] / widths[2] == pytest.approx(2.0, rel=0.25)


@pytest.mark.parametrize("metric", ["auroc", "tpr0", "tpr10"])
def test_bootstrap_interval_of_a_perfectly_separating_score_is_one_one(metric):
    y = np.repeat([0, 1], 50)
    assert bootstrap_interval(y, y + 0.1 * np.arange(100) / 100, metric, n_boot=200) == (1.0, 1.0)


def test_bootstrap_interval_is_reproducible_from_its_seed_and_fast():
    import time

    y, s = _sample(np.random.default_rng(0), 10000)
    t0 = time.perf_counter()
    a = bootstrap_interval(y, s, "auroc", n_boot=1000, seed=4)
    assert time.perf_counter() - t0 < 10.0  # vectorized: 1,000 resamples of 10,000 rows in a few seconds
    assert bootstrap_interval(y, s, "auroc", n_boot=1000, seed=4) == a


def test_bootstrap_interval_refuses_an_unknown_metric():
    with pytest.raises(ValueError, match=r"metric 'ece' is not one of \['auroc', 'tpr0', 'tpr10'\]"):
        bootstrap_interval([0, 1], [0.1, 0.2], "ece")


def test_bootstrap_interval_refuses_a_level_outside_zero_one():
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 95"):
        bootstrap_interval([0, 1], [0.1, 0.2], "auroc", level=95)


def test_bootstrap_interval_refuses_zero_resamples():
    with pytest.raises(ValueError, match="n_boot must be at least 1, got 0"):
        bootstrap_interval([0, 1], [0.1, 0.2], "auroc", n_boot=0)


def test_bootstrap_interval_refuses_labels_without_nonlenses():
    with pytest.raises(ValueError, match=r"no non-lenses \(label 0\) among the labels"):
        bootstrap_interval([1, 1], [0.1, 0.2], "auroc")


def test_paired_win_rate_by_hand():
    #              pair a: lens wins   b: tie   c: twin wins   d: lens only (incomplete)   "": not a pair
    pairs = ["a", "a", "b", "b", "c", "c", "d", ""]
    labels = [1, 0, 1, 0, 1, 0, 1, 0]
    scores = [2.0, 1.0, 0.5, 0.5, 0.0, 3.0, 9.0, 9.0]
    out = paired_win_rate(pairs, labels, scores)
    assert out["n_pairs"] == 3.0 and out["n_rows_not_in_complete_pairs"] == 1.0
    assert out["win_rate"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert out["auroc"] == pytest.approx(roc_auc_score([1, 0, 1, 0, 1, 0], [2.0, 1.0, 0.5, 0.5, 0.0, 3.0]))


def test_paired_by_bins_groups_pairs_by_their_lens_value_and_matches_sklearn():
    rng = np.random.default_rng(5)
    n = 60
    theta_e = rng.uniform(0.3, 3.0, n)
    lens_s = rng.normal(size=n) + (theta_e < 1.2)  # the lens wins more often at small radii
    twin_s = rng.normal(size=n)
    pairs = np.repeat([f"p{i}" for i in range(n)], 2)
    labels = np.tile([1, 0], n)
    scores = np.column_stack([lens_s, twin_s]).ravel()
    values = np.column_stack([theta_e, np.full(n, -1.0)]).ravel()  # the twin row's own value is ignored
    bins = (("small", 0.0, 1.2), ("large", 1.2, np.inf), ("none", 5.0, 6.0))
    out = paired_by_bins(pairs, labels, scores, values, bins)
    for name, lo, hi in bins[:2]:
        m = (theta_e >= lo) & (theta_e < hi)
        assert out[name]["n_pairs"] == m.sum()
        want = roc_auc_score(np.r_[np.ones(m.sum()), np.zeros(m.sum())], np.r_[lens_s[m], twin_s[m]])
        assert out[name]["auroc"] == pytest.approx(want)
        assert out[name]["win_rate"] == pytest.approx(np.mean(lens_s[m] > twin_s[m]))
    assert out["none"]["n_pairs"] == 0 and np.isnan(out["none"]["auroc"])


def test_paired_win_rate_without_pairs_is_nan():
    out = paired_win_rate(["", ""], [1, 0], [1.0, 0.0])
    assert out["n_pairs"] == 0.0 and np.isnan(out["win_rate"]) and np.isnan(out["auroc"])


def test_auroc_by_kind_by_hand_lowest_first():
    # lenses score 2 and 4. Rings at 3 and 5: of the 4 lens-ring pairs the lenses win one (4 > 3) -> 0.25.
    # Twins at 0 and 1: both lenses win all 4 pairs -> 1.0
    labels = [1, 1, 0, 0, 0, 0, 0]
    scores = [2.0, 4.0, 3.0, 5.0, 0.0, 1.0, 4.0]
    kinds = ["extended", "quasar", "ring", "ring", "twin", "twin", None]
    out = auroc_by_kind(labels, scores, kinds)
    assert list(out) == ["ring", "unknown", "twin"]
    assert out["ring"] == {"auroc": pytest.approx(0.25), "n": 2.0, "share": pytest.approx(0.4)}
    assert out["twin"] == {"auroc": pytest.approx(1.0), "n": 2.0, "share": pytest.approx(0.4)}
    # one unknown non-lens at 4: beats lens 2, ties lens 4 -> (0 + 0.5) / 2
    assert out["unknown"]["auroc"] == pytest.approx(0.25)
    assert out["ring"]["auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [2.0, 4.0, 3.0, 5.0]))
    assert auroc_by_kind([0, 0], [1.0, 2.0], ["ring", "twin"]) == {}


def test_auroc_is_the_share_weighted_mean_of_the_auroc_by_kind():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # ties across kinds too
    kinds = rng.choice(["twin", "ring", "spiral", "blob"], 500, p=[0.4, 0.3, 0.2, 0.1])
    out = auroc_by_kind(labels, scores, kinds)
    assert sum(v["share"] for v in out.values()) == pytest.approx(1.0)
    assert sum(v["share"] * v["auroc"] for v in out.values()) == pytest.approx(roc_auc_score(labels, scores),
                                                                               abs=1e-12)


def test_error_rate_by_uncertainty_bins_by_hand():
    """Ten rows, two bins: the five least uncertain hold one error, the five most uncertain three."""
    from lens_assets.science.metrics import error_rate_by_uncertainty

    labels = [1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1]
    probs = [0.9, 0.8, 0.1, 0.2, 0.3, 0.2, 0.7, 0.9, 0.6, 0.4, 0.5]
    unc = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, float("nan")]
    out = error_rate_by_uncertainty(labels, probs, unc, n_bins=2)
    # errors (p >= 0.5 is a lens): rows 4 (lens at 0.3), 5 (lens at 0.2), 6 and 7 (non-lenses at 0.7, 0.9)
    assert out["n"] == 10 and out["n_unmeasured"] == 1
    assert [b["n"] for b in out["bins"]] == [5, 5]
    assert [b["error_rate"] for b in out["bins"]] == [pytest.approx(0.2), pytest.approx(0.6)]
    assert out["bins"][0]["uncertainty_low"] == 0.1 and out["bins"][1]["uncertainty_high"] == 1.0
    assert out["error_rate"] == pytest.approx(0.4)
    wrong = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    from sklearn.metrics import roc_auc_score

    assert out["error_auroc"] == pytest.approx(roc_auc_score(wrong, unc[:10]))
    assert out["margin_error_auroc"] == pytest.approx(roc_auc_score(wrong, -np.abs(np.array(probs[:10]) - 0.5)))
    assert out["spearman"] == pytest.approx(1.0)
    none = error_rate_by_uncertainty([1, 0], [0.9, 0.1], [float("nan")] * 2)
    assert none["bins"] == [] and none["n_unmeasured"] == 2 and np.isnan(none["error_auroc"])
