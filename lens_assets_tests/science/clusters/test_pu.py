import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lens_assets.science.clusters.pu import estimate_label_frequency, fit_pu, pu_xgboost_fit_fn, simulate_pu_labels
from lens_assets.science.clusters.track_a import TrackAConfig


def _gaussians(n, separation, seed, prevalence=0.4):
    """Two unit 2-D Gaussians ``separation`` apart along the diagonal: P(y=1|x) is logistic in x0 + x1."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < prevalence).astype(int)
    X = rng.normal(size=(n, 2))
    X[y == 1] += separation / np.sqrt(2)
    return X, y


def _logistic_fit_fn(X, s):
    clf = LogisticRegression(C=1e6, max_iter=1000).fit(X, s)
    return lambda Z: clf.predict_proba(Z)[:, 1]


def _oracle_fit_fn(X, s):
    """g = the label frequency among the true positives of its training rows (column "y"), 0 on negatives."""
    freq = s[X["y"].to_numpy() == 1].mean()
    return lambda Z: np.where(Z["y"].to_numpy() == 1, freq, 0.0)


def test_label_frequency_is_the_mean_of_g_on_held_out_positives():
    assert estimate_label_frequency([0.2, 0.4, 0.3]) == pytest.approx(0.3)
    assert estimate_label_frequency(np.ones(4)) == 1.0
    with pytest.raises(ValueError, match="at least one held-out labeled positive, got none"):
        estimate_label_frequency([])
    with pytest.raises(ValueError, match="g is 0 on all 3 held-out labeled positives"):
        estimate_label_frequency([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], got values \[1.5\]"):
        estimate_label_frequency([0.5, 1.5])


def test_the_held_out_correction_gives_the_population_label_frequency_exactly():
    # 200 positives, 60 labeled (c = 0.3), 12 held out (h = 0.2): g's training rows have c_fit = 48 / 188
    y = np.r_[np.ones(200, int), np.zeros(300, int)]
    s = simulate_pu_labels(y, 60, seed=0)
    m = fit_pu(pd.DataFrame({"y": y}), s, fit_fn=_oracle_fit_fn, holdout_fraction=0.2, seed=1)
    assert (m.n_labeled_fit, m.n_labeled_holdout, m.n_unlabeled) == (48, 12, 440)
    assert m.holdout_fraction == 0.2
    assert m.c_fit == pytest.approx(48 / 188)
    assert m.c == pytest.approx(0.3)
    assert np.all(s[m.holdout_index] == 1)
    # prob: clip(g / c_fit) is 1 on positives and 0 on negatives; g = c_fit / 2 has odds 1 / (1 - h c) = 1 / 0.94
    assert np.array_equal(m.prob(pd.DataFrame({"y": [1, 0]})), [1.0, 0.0])
    half = type(m)(g=lambda Z: np.full(len(Z), m.c_fit / 2), **{k: getattr(m, k) for k in (
        "c", "c_fit", "holdout_fraction", "n_labeled_fit", "n_labeled_holdout", "n_unlabeled", "holdout_index")})
    assert half.prob(np.zeros((1, 1)))[0] == pytest.approx(1 / 1.94)


def test_fit_fn_sees_all_unlabeled_rows_and_only_the_fit_part_of_the_labeled():
    y = np.r_[np.ones(50, int), np.zeros(50, int)]
    s = simulate_pu_labels(y, 20, seed=2)
    seen = {}

    def fit_fn(X, s_fit):
        seen["n"], seen["labeled"] = len(X), int(s_fit.sum())
        return lambda Z: np.full(len(Z), 0.5)

    X = pd.DataFrame({"x": np.arange(100.0)})
    m = fit_pu(X, s, fit_fn=fit_fn, holdout_fraction=0.25, seed=3)
    assert seen == {"n": 95, "labeled": 15} and m.n_labeled_holdout == 5


def test_e1_with_a_logistic_g_recovers_c_on_well_separated_classes():
    X, y = _gaussians(4000, 6.0, seed=4)
    s = simulate_pu_labels(y, int(round(0.3 * y.sum())), seed=4)
    m = fit_pu(X, s, fit_fn=_logistic_fit_fn, seed=4)
    assert abs(m.c - 0.3) < 0.07
    assert m.c_fit < m.c  # g's training rows lack the held-out labeled lenses


def test_pu_probabilities_rank_like_a_fully_supervised_classifier():
    X, y = _gaussians(6000, 2.0, seed=5)  # overlapping classes: AUROC about 0.92
    Xt, yt = _gaussians(6000, 2.0, seed=6)
    s = simulate_pu_labels(y, int(round(0.3 * y.sum())), seed=5)
    m = fit_pu(X, s, fit_fn=_logistic_fit_fn, seed=5)
    p = m.prob(Xt)
    assert p.min() >= 0 and p.max() <= 1
    supervised = roc_auc_score(yt, LogisticRegression().fit(X, y).predict_proba(Xt)[:, 1])
    assert supervised > 0.9
    assert abs(roc_auc_score(yt, p) - supervised) < 0.03


def test_the_xgboost_fit_fn_keeps_g_calibrated_despite_class_weighting():
    X, y = _gaussians(3000, 3.0, seed=7)
    X = pd.DataFrame(X, columns=["colour_consistency", "tangential_alignment"])
    s = simulate_pu_labels(y, 150, seed=7)
    cfg = TrackAConfig(n_estimators=60, learning_rate=0.1, max_depth=2, n_jobs=1)
    g = pu_xgboost_fit_fn(cfg, monotone={"colour_consistency": 1, "tangential_alignment": 1})(X, s)
    assert np.mean(g(X)) == pytest.approx(s.mean(), abs=0.01)  # the log(scale_pos_weight) offset is undone
    m = fit_pu(X, s, fit_fn=pu_xgboost_fit_fn(cfg), seed=7)
    assert 0 < m.c <= 1
    Xt, yt = _gaussians(2000, 3.0, seed=8)
    assert roc_auc_score(yt, m.prob(pd.DataFrame(Xt, columns=X.columns))) > 0.95
    g_arr = pu_xgboost_fit_fn(cfg)(X.to_numpy(), s)  # arrays get columns f0, f1
    assert g_arr(Xt).shape == (2000,)


def test_simulate_pu_labels_picks_exactly_n_positives_deterministically():
    y = np.r_[np.zeros(30, int), np.ones(20, int), np.zeros(10, int)]
    s = simulate_pu_labels(y, 7, seed=11)
    assert s.sum() == 7 and np.all(y[s == 1] == 1) and set(np.unique(s)) == {0, 1}
    assert np.array_equal(s, simulate_pu_labels(y, 7, seed=11))
    assert not np.array_equal(s, simulate_pu_labels(y, 7, seed=12))
    assert simulate_pu_labels(y, 0, seed=0).sum() == 0 and simulate_pu_labels(y, 20, seed=0).sum() == 20
    with pytest.raises(ValueError, match="n_labeled=21 exceeds the 20 positives in y"):
        simulate_pu_labels(y, 21, seed=0)
    with pytest.raises(ValueError, match="n_labeled must be an integer >= 0, got -1"):
        simulate_pu_labels(y, -1, seed=0)
    with pytest.raises(ValueError, match="y must be a 1-D array of 0"):
        simulate_pu_labels(y * 2, 1, seed=0)


def test_fit_pu_errors_name_the_problem():
    X = np.zeros((10, 1))
    s = np.r_[1, np.zeros(9, int)]
    with pytest.raises(ValueError, match="at least 2 labeled positives .* got 1"):
        fit_pu(X, s, fit_fn=_logistic_fit_fn)
    with pytest.raises(ValueError, match=r"s must hold 1 \(labeled positive\) or 0 \(unlabeled\), got values \[2\]"):
        fit_pu(X, s * 2, fit_fn=_logistic_fit_fn)
    with pytest.raises(ValueError, match=r"holdout_fraction must lie in \(0, 1\), got 1.0"):
        fit_pu(X, np.r_[1, 1, np.zeros(8, int)], fit_fn=_logistic_fit_fn, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="needs unlabeled rows"):
        fit_pu(X[:2], np.ones(2, int), fit_fn=_logistic_fit_fn)
    with pytest.raises(ValueError, match=r"returned shape \(1, 2\) for 1 rows"):
        fit_pu(X, np.r_[1, 1, np.zeros(8, int)], fit_fn=lambda X, s: (lambda Z: np.full((len(Z), 2), 0.5)))
