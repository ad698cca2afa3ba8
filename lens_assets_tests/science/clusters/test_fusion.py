import json

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.calibration import fit_calibrator, nll
from lens_assets.science.clusters.fusion import Fusion, exact_objective, fit_fusion, surrogate_objective
from lens_assets.science.metrics import tpr_at_fpr, tpr_at_n_false_positives


def _frame(n, seed, kind, split="val"):
    """Components ``a`` and ``b`` of n fields, 30 % lenses. "noise": a is informative (lenses +1.5 sigma), b is
    pure noise. "complementary": lenses are of two kinds, each +2 sigma in one component only."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.3).astype(int)
    if kind == "noise":
        a, b = rng.normal(size=n) + 1.5 * y, rng.normal(size=n)
    else:
        first = rng.uniform(size=n) < 0.5
        a, b = rng.normal(size=n) + 2.0 * y * first, rng.normal(size=n) + 2.0 * y * ~first
    role = np.where(np.arange(n) % 2 == 0, "stop", "calibrate") if split == "val" else ""
    return pd.DataFrame({"objid": [f"o{seed}_{i}" for i in range(n)], "a": a, "b": b, "label": y,
                         "split": split, "val_role": role})


@pytest.fixture(scope="module")
def noise_fusion():
    return fit_fusion(_frame(1600, 0, "noise"), ["a", "b"], n_random=3)


def test_a_pure_noise_component_gets_a_weight_near_zero_and_costs_no_recall(noise_fusion):
    w = noise_fusion.weights
    assert abs(w["b"]) < 0.15 and w["a"] > 0.98
    assert np.hypot(w["a"], w["b"]) == pytest.approx(1.0)
    test = _frame(20000, 1, "noise", split="test")
    fused = tpr_at_fpr(test["label"], noise_fusion.logit(test), 0.1)
    best_single = max(tpr_at_fpr(test["label"], test[c], 0.1) for c in ("a", "b"))
    assert fused >= best_single - 0.02


@pytest.mark.parametrize("objective", ["pauc", "tpr"])
def test_complementary_components_fused_beat_each_alone(objective):
    f = fit_fusion(_frame(1600, 2, "complementary"), ["a", "b"], objective=objective, n_random=3)
    assert f.weights["a"] > 0.3 and f.weights["b"] > 0.3  # both used, with the sign that ranks lenses high
    test = _frame(20000, 3, "complementary", split="test")
    fused = tpr_at_fpr(test["label"], f.logit(test), 0.1)
    singles = [tpr_at_fpr(test["label"], test[c], 0.1) for c in ("a", "b")]
    assert fused > max(singles) + 0.05
    assert f.fit_exact >= max(f.fit_single.values())  # on the rows it was fit to, never worse than a start


def test_a_component_where_lenses_score_low_gets_a_negative_weight():
    frame = _frame(1200, 4, "noise").assign(a=lambda d: -d["a"])
    assert fit_fusion(frame, ["a", "b"], n_random=2).weights["a"] < -0.98


@pytest.mark.parametrize("objective", ["tpr", "pauc"])
def test_the_surrogate_tends_to_the_exact_figure_as_tau_shrinks(objective):
    rng = np.random.default_rng(5)
    y = (rng.uniform(size=3000) < 0.3).astype(int)
    s = rng.normal(size=3000) + y
    k = int(np.floor(0.1 * (y == 0).sum()))
    if objective == "tpr":
        exact = tpr_at_fpr(y, s, 0.1)  # the project's metric
    else:  # normalized partial AUC: mean TPR over 0..k-1 false positives
        exact = np.mean([tpr_at_n_false_positives(y, s, m) for m in range(k)])
    assert exact_objective(y, s, objective=objective) == pytest.approx(exact, abs=1e-12)
    gaps = [abs(surrogate_objective(y, s, tau=t, objective=objective) - exact) for t in (1.0, 0.1, 0.001)]
    assert gaps[0] > gaps[2] and gaps[2] < 2e-3


def test_exact_objective_by_hand():
    # ten non-lenses 0..9: FPR <= 0.1 allows one false positive, so the threshold is the 2nd highest (8)
    labels = [0] * 10 + [1, 1, 1]
    scores = list(range(10)) + [8.5, 9.5, 3.0]
    assert exact_objective(labels, scores, objective="tpr") == pytest.approx(2 / 3)  # 8.5 and 9.5 above 8
    assert exact_objective(labels, scores, objective="pauc") == pytest.approx(1 / 3)  # only 9.5 above 9 (k = 1)
    with pytest.raises(ValueError, match="at least 10 non-lenses"):
        exact_objective([0] * 9 + [1], list(range(10)), objective="tpr")


def test_scaling_or_shifting_a_component_changes_nothing(noise_fusion):
    frame = _frame(1600, 0, "noise")
    moved = fit_fusion(frame.assign(b=lambda d: 1e3 * d["b"] - 7.0), ["a", "b"], n_random=3)
    assert moved.weights == pytest.approx(noise_fusion.weights, abs=1e-6)
    test = _frame(200, 6, "noise", split="test")
    np.testing.assert_allclose(moved.logit(test.assign(b=lambda d: 1e3 * d["b"] - 7.0)), noise_fusion.logit(test),
                               atol=1e-6)


def test_a_seed_gives_the_same_fusion():
    frame = _frame(400, 7, "complementary")
    a, b = (fit_fusion(frame, ["a", "b"], seed=3, n_random=2) for _ in range(2))
    assert a.to_dict() == b.to_dict()


def test_nan_is_imputed_by_the_fit_rows_median_and_recorded():
    frame = _frame(400, 8, "noise")
    cal_median = float(np.median(frame.loc[(frame["val_role"] == "calibrate") & (frame.index % 10 != 1), "b"]))
    frame.loc[frame.index % 10 == 0, "b"] = np.nan  # 40 NaN in stop rows (not read)
    frame.loc[frame.index % 10 == 1, "b"] = np.nan  # 40 NaN in calibrate rows
    before = frame.copy()
    f = fit_fusion(frame, ["a", "b"], n_random=1)
    pd.testing.assert_frame_equal(frame, before)  # the caller's frame is untouched
    assert f.impute["b"] == pytest.approx(cal_median)
    assert f.n_missing == {"a": 0, "b": 40}
    assert any("b: 40 NaN in the val calibrate rows" in n for n in f.notes)
    row = frame.iloc[[1]]
    assert f.logit(row) == pytest.approx(f.logit(row.assign(b=cal_median)))
    assert f.n_imputed(frame) == {"a": 0, "b": 80}


def test_probabilities_come_from_out_of_fold_fused_scores_of_the_calibrate_rows(noise_fusion):
    f = noise_fusion
    assert f.calibrator.method == "isotonic" and f.fit_role == "calibrate" and f.n_folds == 5
    cal = _frame(1600, 0, "noise").query("val_role == 'calibrate'")
    assert (f.n_fit_lenses, f.n_fit_nonlenses) == (int(cal["label"].sum()), int((cal["label"] == 0).sum()))
    assert f.k == int(np.floor(0.1 * f.n_fit_nonlenses))
    p = f.prob(cal)
    assert p.min() >= 0 and p.max() <= 1
    assert p.mean() == pytest.approx(cal["label"].mean(), abs=0.02)
    assert (np.diff(p[np.argsort(f.logit(cal))]) >= 0).all()
    # not the in-sample isotonic fit on the final weights' scores (which keeps the mean exactly)
    in_sample = fit_calibrator(f.logit(cal), cal["label"].to_numpy(int), method="isotonic")
    assert not np.allclose(in_sample.predict(f.logit(cal)), p)


def _many_weak(n, seed, split="val"):
    """Five components, only ``c0`` informative (lenses +0.7 sigma), 30 % lenses: few rows overfit the weights."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.3).astype(int)
    comps = {f"c{j}": rng.normal(size=n) + (0.7 * y if j == 0 else 0.0) for j in range(5)}
    return pd.DataFrame({"label": y, **comps, "split": split, "val_role": "calibrate" if split == "val" else ""})


def test_out_of_fold_calibration_is_not_fooled_by_overfit_weights():
    frame = _many_weak(100, 2)
    comps = [f"c{j}" for j in range(5)]
    f = fit_fusion(frame, comps, n_random=0)
    y, z = frame["label"].to_numpy(int), f.logit(frame)
    in_sample = fit_calibrator(z, y, method="isotonic")  # the calibrator fit on the fit rows' own fused scores
    top = int(np.argmax(z))
    assert in_sample.predict(z)[top] == 1.0 and f.prob(frame)[top] < 0.8
    assert f.oof_exact < f.fit_exact  # the fit rows flatter the weights
    fresh = _many_weak(20000, 102, split="test")
    yf, zf = fresh["label"].to_numpy(int), f.logit(fresh)
    assert nll(yf, f.prob(fresh)) < nll(yf, in_sample.predict(zf)) - 0.2


def _all_splits(seed):
    """Val stop and calibrate rows, test rows and a held-out family."""
    parts = [_frame(600, seed, "complementary"), _frame(200, seed + 1, "complementary", split="test"),
             _frame(200, seed + 2, "complementary", split="heldout")]
    return pd.concat(parts, ignore_index=True)


def test_the_weights_do_not_depend_on_stop_test_or_heldout_rows():
    frame = _all_splits(20)
    base = fit_fusion(frame, ["a", "b"], n_random=1).to_dict()
    rng = np.random.default_rng(0)
    other = ~(frame["val_role"] == "calibrate")  # stop, test and held-out rows
    assert other.sum() == 700
    changed = frame.copy()
    changed.loc[other, "a"] = rng.normal(size=700) * 5 + 3
    changed.loc[other, "b"] = np.where(rng.uniform(size=700) < 0.2, np.nan, -changed.loc[other, "b"])
    changed.loc[other, "label"] = 1 - changed.loc[other, "label"]
    assert fit_fusion(changed, ["a", "b"], n_random=1).to_dict() == base
    # the former scheme was fit on the stop rows: there, their values change the weights
    stop = frame["val_role"] == "stop"
    old = fit_fusion(frame, ["a", "b"], n_random=1, fit_role="stop")
    moved = fit_fusion(frame.assign(a=np.where(stop, -frame["a"], frame["a"])), ["a", "b"], n_random=1,
                       fit_role="stop")
    assert old.fit_role == "stop" and moved.weights["a"] < 0 < old.weights["a"]
    assert any("fit_role='stop'" in n for n in old.notes)


def test_few_non_lenses_give_a_note_and_too_few_an_error():
    rng = np.random.default_rng(3)
    few = pd.DataFrame({"a": np.r_[rng.normal(size=12), rng.normal(size=12) + 2], "label": [0] * 12 + [1] * 12,
                        "split": "val", "val_role": "calibrate"})
    f = fit_fusion(few, ["a"], n_random=0)
    assert (f.n_fit_lenses, f.n_fit_nonlenses, f.k) == (12, 12, 1)
    assert any("12 non-lenses (fewer than 50)" in n and "k = 1" in n for n in f.notes)
    # with 5 folds, the other folds hold 9 or 10 non-lenses: folds short of 10 are fit allowing one false positive
    assert any("too few for FPR <= 0.1 to allow a false positive" in n for n in f.notes)
    assert not any("fewer than 50" in n for n in fit_fusion(_frame(400, 8, "noise"), ["a"], n_random=0).notes)
    with pytest.raises(ValueError, match=r"fusion on the val calibrate rows needs lenses and at least 10 non-lenses "
                                         r".* got 12 lenses and 9 non-lenses"):
        fit_fusion(few.iloc[3:], ["a"], n_random=0)


def test_dict_round_trip_gives_identical_scores(noise_fusion):
    test = _frame(300, 9, "noise", split="test")
    again = Fusion.from_dict(json.loads(json.dumps(noise_fusion.to_dict())))
    assert np.array_equal(again.logit(test), noise_fusion.logit(test))
    assert np.array_equal(again.prob(test), noise_fusion.prob(test))
    with pytest.raises(ValueError, match=r"fusion fields \['extra'\] are not known"):
        Fusion.from_dict({**noise_fusion.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match=r"fusion weights has keys \['a'\], expected the components \['a', 'b'\]"):
        Fusion.from_dict({**noise_fusion.to_dict(), "weights": {"a": 1.0}})
    # a fusion saved by the former scheme (weights fit on the stop rows) loads, marked as such
    d = noise_fusion.to_dict()
    legacy = {k: v for k, v in d.items() if k not in ("fit_role", "fit_exact", "fit_single", "oof_exact",
                                                       "n_fit_lenses", "n_fit_nonlenses", "k", "n_folds",
                                                       "n_imputed_scored")}
    legacy |= {"stop_exact": 0.5, "stop_single": {"a": 0.4, "b": 0.1}}
    old = Fusion.from_dict(json.loads(json.dumps(legacy)))
    assert (old.fit_role, old.fit_exact, old.fit_single) == ("stop", 0.5, {"a": 0.4, "b": 0.1})
    assert np.array_equal(old.prob(test), noise_fusion.prob(test))


def test_errors_name_the_column_or_the_split(noise_fusion):
    frame = _frame(200, 10, "noise")
    with pytest.raises(ValueError, match=r"lacks columns \['track_b'\]"):
        fit_fusion(frame, ["a", "track_b"])
    with pytest.raises(ValueError, match=r"lacks the fusion's component columns \['b'\]"):
        noise_fusion.logit(frame.drop(columns="b"))
    stop = frame["val_role"] == "stop"
    with pytest.raises(ValueError, match=r"the val calibrate rows need lenses and non-lenses, got labels \[1\]"):
        fit_fusion(frame.assign(label=np.where(stop, frame["label"], 1)), ["a", "b"])
    with pytest.raises(ValueError, match=r"the val stop rows need lenses and non-lenses, got labels \[0\]"):
        fit_fusion(frame.assign(label=np.where(stop, 0, frame["label"])), ["a", "b"], fit_role="stop")
    with pytest.raises(ValueError, match="component 'b' is NaN in all 100 val calibrate rows"):
        fit_fusion(frame.assign(b=np.where(stop, 1.0, np.nan)), ["a", "b"])
    with pytest.raises(ValueError, match=r"component 'b' is constant \(2.0\) on the 100 val calibrate rows"):
        fit_fusion(frame.assign(b=np.where(stop, frame["b"], 2.0)), ["a", "b"])
    with pytest.raises(ValueError, match="fit_role 'test' is not one of"):
        fit_fusion(frame, ["a"], fit_role="test")
    with pytest.raises(ValueError, match="n_folds must be an integer >= 2, got 1"):
        fit_fusion(frame, ["a"], n_folds=1)
    one_lens = frame[~stop & ((frame["label"] == 0) | (frame.index == frame.index[(frame["label"] == 1) & ~stop][0]))]
    with pytest.raises(ValueError, match="out-of-fold calibration of the fusion needs at least 2 lenses"):
        fit_fusion(one_lens, ["a"])
    with pytest.raises(ValueError, match="objective 'auc' is not one of"):
        fit_fusion(frame, ["a"], objective="auc")
    with pytest.raises(ValueError, match=r"components \['a'\] are listed twice"):
        fit_fusion(frame, ["a", "a"])
