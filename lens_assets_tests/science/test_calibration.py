import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from lens_assets.science.calibration import (METHODS, Calibrator, cross_fit, fit_calibrator, fit_platt, fit_temperature,
                                             nll, prior_shift)
from lens_assets.science.metrics import expected_calibration_error


def _overconfident(n, t_true, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, n)  # logits a model reports
    y = (rng.uniform(size=n) < expit(z / t_true)).astype(int)  # truth follows logits / T
    return z, y


def test_temperature_scaling_recovers_the_true_temperature():
    z, y = _overconfident(50_000, 2.5)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)


def test_calibration_lowers_ece_and_auto_choice_is_by_cross_validated_nll():
    z, y = _overconfident(20_000, 3.0, seed=1)
    raw = expected_calibration_error(y, expit(z))
    cal = fit_calibrator(z, y)
    assert set(cal.cv_nll) == {"temperature", "isotonic", "platt"}
    assert cal.method == min(cal.cv_nll, key=cal.cv_nll.get)
    zt, yt = _overconfident(20_000, 3.0, seed=2)  # fresh data
    assert expected_calibration_error(yt, cal.predict(zt)) < min(0.02, raw / 3)
    assert nll(yt, cal.predict(zt)) < nll(yt, expit(zt))


def test_isotonic_is_monotone_and_bounded():
    z, y = _overconfident(5000, 1.0, seed=3)
    cal = fit_calibrator(z, y, method="isotonic")
    grid = np.linspace(-30, 30, 501)
    p = cal.predict(grid)
    assert (np.diff(p) >= 0).all() and p.min() >= 0 and p.max() <= 1


def test_prior_shift_by_hand_and_identity():
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(prior_shift(p, 0.5, 0.5), p)
    # from prevalence 0.5 to 0.1: odds scale by (0.1/0.9)/(0.5/0.5) = 1/9; p=0.5 -> odds 1/9 -> 0.1
    assert prior_shift(0.5, 0.5, 0.1) == pytest.approx(0.1)
    assert prior_shift(0.9, 0.5, 0.1) == pytest.approx(0.5)  # odds 9 -> 1
    z, y = _overconfident(4000, 1.0, seed=4)
    cal = fit_calibrator(z, y, method="temperature", target_prevalence=0.01)
    assert cal.predict(z).mean() < expit(z).mean()


def test_option_errors():
    with pytest.raises(ValueError, match=r"method 'sigmoid' is not one of \['auto', 'temperature', 'isotonic', "
                                         r"'platt'\]"):
        fit_calibrator([0.0, 1.0], [0, 1], method="sigmoid")
    with pytest.raises(ValueError, match="needs both lenses and non-lenses"):
        fit_calibrator([0.0, 1.0], [1, 1])
    with pytest.raises(ValueError, match=r"target_prevalence must be in \(0, 1\), got 1.5"):
        fit_calibrator([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1], method="temperature", target_prevalence=1.5)


def test_isotonic_map_equals_scikit_learn_and_round_trips_through_json():
    from sklearn.isotonic import IsotonicRegression

    z, y = _overconfident(3000, 2.0, seed=5)
    cal = fit_calibrator(z, y, method="isotonic", target_prevalence=0.05)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, y)
    grid = np.linspace(-40, 40, 2001)
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(back.predict(grid), prior_shift(iso.predict(grid), y.mean(), 0.05), atol=1e-12)
    temp = fit_calibrator(z, y, method="temperature")
    np.testing.assert_array_equal(Calibrator.from_dict(temp.to_dict()).predict(grid), temp.predict(grid))
    with pytest.raises(ValueError, match=r"calibrator fields \['bias'\] are not known"):
        Calibrator.from_dict({**temp.to_dict(), "bias": 1.0})


# --------------------------------------------------------------------------- Platt scaling


def _platt_data(n, a, b, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    return z, (rng.uniform(size=n) < expit(a * z + b)).astype(int)


def test_platt_recovers_slope_and_intercept_within_their_standard_errors():
    z, y = _platt_data(20_000, 2.0, -1.5, seed=10)
    a, b = fit_platt(z, y)
    # the MLE's covariance is the inverse Fisher information, sum p (1 - p) x x^T at the true (a, b)
    x = np.column_stack([z, np.ones_like(z)])
    p = expit(x @ [2.0, -1.5])
    se = np.sqrt(np.diag(np.linalg.inv((x * (p * (1 - p))[:, None]).T @ x)))
    assert abs(a - 2.0) < 4 * se[0] and abs(b + 1.5) < 4 * se[1], (a, b, se)
    assert se.max() < 0.05  # the tolerance is tight enough to mean something


def test_platt_equals_unpenalized_logistic_regression_of_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    z, y = _platt_data(3000, 0.7, 0.4, seed=11)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    np.testing.assert_allclose(fit_platt(z, y), [lr.coef_[0, 0], lr.intercept_[0]], rtol=1e-6)
    cal = fit_calibrator(z, y, method="platt")
    np.testing.assert_allclose(cal.predict(z), lr.predict_proba(z[:, None])[:, 1], atol=1e-7)


def test_platt_corrects_a_shifted_logit_that_temperature_cannot():
    # right scale, logits 2 too high (e.g. mean fusion of biased members)
    z, y = _platt_data(20_000, 1.0, -2.0, seed=12)
    zt, yt = _platt_data(20_000, 1.0, -2.0, seed=13)
    platt = fit_calibrator(z, y, method="platt")
    temp = fit_calibrator(z, y, method="temperature")
    assert nll(yt, platt.predict(zt)) < nll(yt, temp.predict(zt)) - 0.01
    assert expected_calibration_error(yt, platt.predict(zt)) < 0.015 < expected_calibration_error(yt, temp.predict(zt))
    assert fit_calibrator(z, y).method in ("platt", "isotonic")  # auto never keeps the biased temperature fit


def test_platt_round_trips_and_calibrators_written_before_platt_still_load():
    z, y = _platt_data(2000, 1.5, 0.5, seed=14)
    cal = fit_calibrator(z, y, method="platt")
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(back.predict(z), cal.predict(z))
    # the fields a calibrator.json held before Platt scaling existed
    old = {"method": "temperature", "temperature": 2.0, "isotonic_x": None, "isotonic_y": None,
           "train_prevalence": 0.3, "target_prevalence": None, "cv_nll": {"temperature": 0.5, "isotonic": 0.6}}
    np.testing.assert_allclose(Calibrator.from_dict(old).predict([2.0, -4.0]), expit([1.0, -2.0]))
    with pytest.raises(ValueError, match=r"a platt calibrator needs numbers platt_a and platt_b, got "
                                         r"platt_a=1.0, platt_b=None"):
        Calibrator.from_dict({"method": "platt", "platt_a": 1.0})
    assert "platt" in METHODS


# --------------------------------------------------------------------------- cross-fitting


def test_cross_fitted_ece_of_isotonic_on_noise_logits_is_larger_than_its_in_sample_ece():
    """Logits that carry no information: isotonic regression fits the noise, which only shows out of sample.

    The 15-bin ECE of 200 rows has a sampling floor of several percent, so the comparison is over 30 data sets:
    the in-sample figure must be below the cross-fitted one by more than three standard errors of the mean
    difference, and the cross-fitted figure must be nearer the ECE on fresh data than the in-sample one is.
    """
    in_sample, crossfit, fresh = [], [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n = 200
        z, y = rng.normal(size=n), (rng.uniform(size=n) < 0.3).astype(int)
        cal = fit_calibrator(z, y, method="isotonic")
        in_sample.append(expected_calibration_error(y, cal.predict(z)))
        oof = cross_fit(lambda zt, yt: fit_calibrator(zt, yt, method="isotonic").predict, z, y, np.arange(n) // 2)
        crossfit.append(expected_calibration_error(y, oof))
        zf, yf = rng.normal(size=n), (rng.uniform(size=n) < 0.3).astype(int)
        fresh.append(expected_calibration_error(yf, cal.predict(zf)))
    gap = np.subtract(crossfit, in_sample)
    assert gap.mean() > 3 * gap.std(ddof=1) / np.sqrt(len(gap)), (gap.mean(), gap.std())
    assert abs(np.mean(crossfit) - np.mean(fresh)) < np.mean(fresh) - np.mean(in_sample)


def test_cross_fit_keeps_groups_whole_and_predicts_every_row_from_the_other_folds():
    rng = np.random.default_rng(21)
    groups = rng.integers(0, 40, 200)
    y = (groups % 3 == 0).astype(int)  # labels constant per group
    seen = []

    def fit(x_train, y_train):
        train_groups = set(x_train[:, 0].astype(int))
        seen.append(train_groups)
        return lambda x_test: np.where([int(g) in train_groups for g in x_test[:, 0]], np.nan, len(seen))

    out = cross_fit(fit, groups[:, None].astype(float), y, groups, n_folds=4)
    assert len(seen) == 4 and not np.isnan(out).any()  # no test row's group was in its fit
    for fold in range(1, 5):
        assert set(groups[out == fold]).isdisjoint(seen[fold - 1])
    per_group = pd.Series(out).groupby(groups).nunique()
    assert (per_group == 1).all()


def test_cross_fit_and_auto_need_two_groups_of_each_label():
    y = np.array([1, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"cross-fitting a calibrator needs at least 2 sky groups with lenses and 2 "
                                         r"with non-lenses, got 1 and 2"):
        cross_fit(lambda x, t: (lambda v: v[:, 0]), np.zeros((6, 1)), y, [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"choosing a calibrator \(method='auto'\) needs at least 2 rows with "
                                         r"lenses and 2 with non-lenses, got 1 and 3"):
        fit_calibrator([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 0])


def test_auto_choice_with_groups_keeps_them_whole():
    z, y = _overconfident(3000, 2.0, seed=22)
    grouped = fit_calibrator(z, y, groups=np.arange(3000) // 3)
    assert set(grouped.cv_nll) == set(METHODS) and grouped.method == min(grouped.cv_nll, key=grouped.cv_nll.get)
    assert grouped.cv_nll != fit_calibrator(z, y).cv_nll  # other folds
