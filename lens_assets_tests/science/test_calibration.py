import numpy as np
import pytest
from scipy.special import expit

from lens_assets.science.calibration import fit_calibrator, fit_temperature, nll, prior_shift
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
    assert set(cal.cv_nll) == {"temperature", "isotonic"}
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
    with pytest.raises(ValueError, match=r"method 'platt' is not one of \['auto', 'temperature', 'isotonic'\]"):
        fit_calibrator([0.0, 1.0], [0, 1], method="platt")
    with pytest.raises(ValueError, match="needs both lenses and non-lenses"):
        fit_calibrator([0.0, 1.0], [1, 1])
    with pytest.raises(ValueError, match=r"target_prevalence must be in \(0, 1\), got 1.5"):
        fit_calibrator([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1], method="temperature", target_prevalence=1.5)


def test_isotonic_map_equals_scikit_learn_and_round_trips_through_json():
    import json

    from sklearn.isotonic import IsotonicRegression

    from lens_assets.science.calibration import Calibrator

    z, y = _overconfident(3000, 2.0, seed=5)
    cal = fit_calibrator(z, y, method="isotonic", target_prevalence=0.05)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, y)
    grid = np.linspace(-40, 40, 2001)
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(back.predict(grid), prior_shift(iso.predict(grid), y.mean(), 0.05), atol=1e-12)
    temp = fit_calibrator(z, y, method="temperature")
    np.testing.assert_array_equal(Calibrator.from_dict(temp.to_dict()).predict(grid), temp.predict(grid))
    with pytest.raises(ValueError, match=r"calibrator fields \['platt_a'\] are not known"):
        Calibrator.from_dict({**temp.to_dict(), "platt_a": 1.0})
