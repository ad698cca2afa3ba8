import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lens_assets.science.calibration import Calibrator
from lens_assets.science.clusters.track_a import (TrackAConfig, TrackAModel, calibrate_track_a, fit_track_a,
                                                  plot_partial_dependence)

FAST = TrackAConfig(n_estimators=150, learning_rate=0.1, max_depth=3, n_jobs=1)


def _separable(n, seed):
    """f0, f1 informative (logit 4 f0 + 3 f1 - 1), f2 noise, ``const`` never split on."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"f0": rng.normal(size=n), "f1": rng.normal(size=n), "f2": rng.normal(size=n),
                      "const": np.zeros(n)})
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(4 * X.f0 + 3 * X.f1 - 1)))).astype(int)
    return X, y.to_numpy()


def _dipped(n, seed):
    """P(lens) rises with f0 except for an inverted window 0 < f0 < 1 (logit lowered by 5)."""
    rng = np.random.default_rng(seed)
    f0 = rng.uniform(-3, 3, n)
    X = pd.DataFrame({"f0": f0, "f1": rng.normal(size=n)})
    logit = 2 * f0 + X.f1.to_numpy() - 5 * ((f0 > 0) & (f0 < 1))
    return X, (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)


@pytest.fixture(scope="module")
def separable_model():
    X, y = _separable(3000, 0)
    Xs, ys = _separable(1000, 1)
    return fit_track_a(X, y, Xs, ys, config=FAST)


@pytest.fixture(scope="module")
def dipped_models():
    X, y = _dipped(4000, 0)
    Xs, ys = _dipped(1000, 1)
    cfg = TrackAConfig(n_estimators=300, learning_rate=0.1, max_depth=3, early_stopping_rounds=None, n_jobs=1)
    return (fit_track_a(X, y, Xs, ys, config=cfg, monotone={"f0": +1}),
            fit_track_a(X, y, Xs, ys, config=cfg), X)


def test_monotone_constraint_makes_the_sweep_non_decreasing_where_the_data_dips(dipped_models):
    constrained, free, X = dipped_models
    sweep = np.linspace(-3, 3, 121)
    pd_c = constrained.partial_dependence(X[:500], "f0", grid=sweep)
    pd_f = free.partial_dependence(X[:500], "f0", grid=sweep)
    assert np.diff(pd_c["mean_margin"]).min() >= 0
    assert np.diff(pd_f["mean_margin"]).min() < -0.5  # the unconstrained model learns the dip: the test can fail
    for f1 in (-1.0, 0.0, 1.5):  # each row's margin, not only the mean, is non-decreasing
        rows = pd.DataFrame({"f0": sweep, "f1": f1})
        assert np.diff(constrained.logit(rows)).min() >= 0
    assert constrained.monotone_constraints == {"f0": 1, "f1": 0}
    assert free.monotone_constraints == {"f0": 0, "f1": 0}


def test_unknown_monotone_keys_are_ignored_and_noted_and_config_can_turn_constraints_off():
    X, y = _separable(400, 2)
    m = fit_track_a(X, y, None, None, config=TrackAConfig(n_estimators=5, n_jobs=1),
                    monotone={"f0": 1, "seeing_arcsec": -1})
    assert m.monotone_constraints == {"f0": 1, "f1": 0, "f2": 0, "const": 0}
    assert any("seeing_arcsec" in n for n in m.notes)
    off = fit_track_a(X, y, None, None, config=TrackAConfig(n_estimators=5, monotone=False, n_jobs=1),
                      monotone={"f0": 1})
    assert set(off.monotone_constraints.values()) == {0}
    assert any("config.monotone=False" in n for n in off.notes)


def test_scale_pos_weight_auto_is_n_negative_over_n_positive():
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"f0": rng.normal(size=1000), "f1": rng.normal(size=1000)})
    y = np.r_[np.ones(100, int), np.zeros(900, int)]
    m = fit_track_a(X, y, None, None, config=TrackAConfig(n_estimators=3, n_jobs=1))
    assert m.scale_pos_weight == 9.0
    cfg = json.loads(m.booster.save_config())
    assert float(cfg["learner"]["objective"]["reg_loss_param"]["scale_pos_weight"]) == 9.0
    fixed = fit_track_a(X, y, None, None, config=TrackAConfig(n_estimators=3, scale_pos_weight=2.5, n_jobs=1))
    assert fixed.scale_pos_weight == 2.5


@pytest.mark.parametrize("metric", ["aucpr", "logloss"])
def test_early_stopping_stops_before_n_estimators_when_the_model_overfits(metric):
    rng = np.random.default_rng(4)
    X = pd.DataFrame(rng.normal(size=(600, 5)), columns=[f"f{i}" for i in range(5)])
    y = (rng.uniform(size=600) < 1 / (1 + np.exp(-0.5 * X.f0))).astype(int).to_numpy()  # weak signal, much noise
    cfg = TrackAConfig(n_estimators=300, learning_rate=0.3, max_depth=6, early_stopping_rounds=10,
                       eval_metric=metric, n_jobs=1)
    m = fit_track_a(X[:400], y[:400], X[400:], y[400:], config=cfg)
    assert m.best_iteration + cfg.early_stopping_rounds < cfg.n_estimators
    assert m.booster.num_boosted_rounds() == m.best_iteration + 1
    assert m.best_score is not None
    full = fit_track_a(X[:400], y[:400], None, None, config=TrackAConfig(n_estimators=20, n_jobs=1))
    assert full.best_iteration == 19 and full.booster.num_boosted_rounds() == 20 and full.best_score is None


def test_column_order_and_extra_columns_at_predict_time_give_identical_margins(separable_model):
    X, _ = _separable(300, 5)
    z = separable_model.logit(X)
    shuffled = X[["const", "f2", "f0", "f1"]].assign(field_id=np.arange(300))
    assert np.array_equal(separable_model.logit(shuffled), z)


def test_a_missing_feature_column_raises_naming_it(separable_model):
    X, _ = _separable(10, 6)
    with pytest.raises(ValueError, match=r"lacks the model's feature columns \['f1'\]"):
        separable_model.logit(X.drop(columns="f1"))


def test_train_and_stop_columns_must_match():
    X, y = _separable(200, 7)
    with pytest.raises(ValueError, match=r"only in X_train \['f2'\], only in X_stop \['f9'\]"):
        fit_track_a(X, y, X.rename(columns={"f2": "f9"}), y, config=FAST)


def test_save_load_round_trips_margins_exactly(separable_model, tmp_path):
    X, _ = _separable(500, 8)
    X.loc[::7, "f1"] = np.nan  # missing values take the learned default branch, in both copies
    path = separable_model.save(tmp_path / "track_a.json")
    assert (tmp_path / "track_a.meta.json").exists()
    back = TrackAModel.load(path)
    assert np.array_equal(back.logit(X), separable_model.logit(X))
    for f in ("feature_names", "best_iteration", "monotone_constraints", "scale_pos_weight", "config", "notes",
              "best_score"):
        assert getattr(back, f) == getattr(separable_model, f)
    with pytest.raises(ValueError, match="must end in .json"):
        separable_model.save(tmp_path / "track_a.ubj")


def test_auroc_on_a_separable_task_exceeds_0_9(separable_model):
    X, y = _separable(2000, 9)
    assert roc_auc_score(y, separable_model.logit(X)) > 0.9


def test_isotonic_calibration_is_monotone_in_the_margin_and_bounded(separable_model):
    X, y = _separable(2000, 10)
    cal = calibrate_track_a(separable_model, X, y)
    assert isinstance(cal, Calibrator) and cal.method == "isotonic"
    z = np.sort(np.r_[separable_model.logit(X), -50.0, 50.0])
    p = cal.predict(z)
    assert np.diff(p).min() >= 0 and p.min() >= 0 and p.max() <= 1
    # on fresh rows the probabilities are the task's own (sigmoid(4 f0 + 3 f1 - 1)), not just some monotone map
    Xf, yf = _separable(4000, 12)
    pf = cal.predict(separable_model.logit(Xf))
    truth = 1 / (1 + np.exp(-(4 * Xf.f0 + 3 * Xf.f1 - 1))).to_numpy()
    assert np.abs(pf - truth).mean() < 0.06
    assert pf.mean() == pytest.approx(yf.mean(), abs=0.03)
    assert roc_auc_score(yf, pf) == pytest.approx(roc_auc_score(yf, separable_model.logit(Xf)), abs=0.01)
    with pytest.raises(ValueError, match="not one of"):
        calibrate_track_a(separable_model, X, y, method="beta")


def test_importance_lists_every_feature_with_zero_for_unused(separable_model):
    imp = separable_model.importance()
    assert list(imp.feature) == ["f0", "f1", "f2", "const"]
    row = imp.set_index("feature")
    assert row.loc["const", "gain"] == 0 and row.loc["const", "n_splits"] == 0
    assert row.loc["f0", "total_gain"] > row.loc["f2", "total_gain"]
    assert imp.share.sum() == pytest.approx(1.0)


def test_partial_dependence_is_the_mean_margin_with_the_column_set_and_skips_nan_in_the_grid(separable_model):
    X, _ = _separable(200, 11)
    X.loc[:49, "f0"] = np.nan
    before = X.copy()
    table = separable_model.partial_dependence(X, "f0", grid=5)
    pd.testing.assert_frame_equal(X, before)  # the caller's frame is not modified
    expected_grid = np.quantile(X.f0.to_numpy()[50:], [0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(table["value"], expected_grid)
    v = table["value"].iloc[2]
    assert table["mean_margin"].iloc[2] == pytest.approx(separable_model.logit(X.assign(f0=v)).mean())
    with pytest.raises(ValueError, match="'seeing_arcsec' is not one of the model's features"):
        separable_model.partial_dependence(X, "seeing_arcsec")
    with pytest.raises(ValueError, match="NaN in every row"):
        separable_model.partial_dependence(X.assign(f0=np.nan), "f0")


def test_fitting_does_not_modify_the_callers_inputs():
    X, y = _separable(300, 12)
    X.loc[::5, "f2"] = np.nan
    Xc, yc = X.copy(), y.copy()
    fit_track_a(X, y, X, y, config=TrackAConfig(n_estimators=5, n_jobs=1), monotone={"f0": 1})
    pd.testing.assert_frame_equal(X, Xc)
    assert np.array_equal(y, yc)


@pytest.mark.parametrize("kwargs,match", [
    ({"scale_pos_weight": "balanced"}, r"TrackAConfig.scale_pos_weight must be 'auto' or a finite number > 0, "
                                       r"got 'balanced'"),
    ({"eval_metric": "auc"}, r"TrackAConfig.eval_metric must be one of \['aucpr', 'logloss'\], got 'auc'"),
    ({"subsample": 0.0}, r"TrackAConfig.subsample must be in \(0, 1\], got 0.0"),
    ({"n_estimators": 0}, r"TrackAConfig.n_estimators must be an integer >= 1, got 0"),
])
def test_config_errors_name_the_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrackAConfig(**kwargs)


def test_fit_errors_name_the_field_and_value():
    X, y = _separable(100, 13)
    with pytest.raises(ValueError, match=r"monotone\['f0'\] must be -1, 0 or \+1, got 2"):
        fit_track_a(X, y, None, None, config=FAST, monotone={"f0": 2})
    with pytest.raises(ValueError, match=r"y_train must hold 0 \(non-lens\) or 1 \(lens\), got values \[2\]"):
        fit_track_a(X, np.where(y == 1, 2, 0), None, None, config=FAST)
    with pytest.raises(ValueError, match="y_train needs both lenses and non-lenses"):
        fit_track_a(X, np.zeros(100, int), None, None, config=FAST)
    with pytest.raises(ValueError, match="X_train must be a pandas DataFrame"):
        fit_track_a(X.to_numpy(), y, None, None, config=FAST)
    with pytest.raises(ValueError, match="column 'f2' has dtype object"):
        fit_track_a(X.assign(f2="x"), y, None, None, config=FAST)
    with pytest.raises(ValueError, match="give both X_stop and y_stop"):
        fit_track_a(X, y, X, None, config=FAST)


def test_plot_partial_dependence_writes_a_png(dipped_models, tmp_path):
    constrained, _, X = dipped_models
    tables = {f: constrained.partial_dependence(X[:500], f, grid=10) for f in ("f0", "f1")}
    path = plot_partial_dependence(tables, tmp_path / "pd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"lacks columns \['mean_margin'\]"):
        plot_partial_dependence({"f0": tables["f0"].drop(columns="mean_margin")}, tmp_path / "bad.png")
