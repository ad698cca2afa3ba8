import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lens_assets.science.clusters.anomaly import (DeepSVDD, _forward, _loss_and_grads, fit_deep_svdd,
                                                  robust_location_scale)

FAST = dict(epochs=30)  # layers (32, 16)


def _gaussian(n, seed, p=12, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, p)) * scale + shift, columns=[f"f{i}" for i in range(p)])


@pytest.fixture(scope="module")
def inlier_model():
    return fit_deep_svdd(_gaussian(2000, 0), seed=0, **FAST)


def test_points_from_a_shifted_or_wider_distribution_score_higher_than_held_out_inliers(inlier_model):
    inliers = inlier_model.score(_gaussian(500, 1))
    y = np.r_[np.zeros(500), np.ones(500)]
    for outliers in (_gaussian(500, 2, shift=2.0), _gaussian(500, 3, scale=3.0)):
        assert roc_auc_score(y, np.r_[inliers, inlier_model.score(outliers)]) > 0.9
    assert inlier_model.loss_history[-1] < 0.2 * inlier_model.loss_history[0]  # training pulled the rows to c


def test_the_network_has_no_bias_terms_and_the_centre_keeps_away_from_zero(inlier_model):
    # bias-free: the weights are matrices only, and phi maps the zero input to 0; the fixed offset puts that input at
    # the corner where every feature is clip robust sigmas below its median, far from the data
    assert [w.shape for w in inlier_model.weights] == [(12, 32), (32, 16)]
    assert inlier_model.n_parameters == 12 * 32 + 32 * 16
    assert inlier_model.offset == inlier_model.clip == 10.0
    corner = pd.DataFrame([inlier_model.median - 50 * inlier_model.scale], columns=inlier_model.columns)
    np.testing.assert_array_equal(inlier_model.transform(corner), np.zeros((1, 12)))
    assert np.array_equal(inlier_model.embed(corner), np.zeros((1, 16)))
    assert inlier_model.score(corner)[0] == pytest.approx(float(np.sum(inlier_model.c ** 2)))
    assert inlier_model.standardized_score(corner)[0] > 10
    assert np.abs(inlier_model.c).min() >= 0.1
    inputs = inlier_model.transform(_gaussian(500, 1, scale=30.0))
    assert inputs.min() >= 0 and inputs.max() <= 20


def test_the_most_typical_rows_are_not_anomalies(inlier_model):
    # before the offset, the median row was the origin: it scored ||c||^2 (standardized ~ +26 in 12-D), and inliers
    # shrunk towards the median scored higher than the inliers themselves (AUROC ~ 1)
    train_scores = inlier_model.score(_gaussian(2000, 0))
    median_row = pd.DataFrame([inlier_model.median], columns=inlier_model.columns)
    assert inlier_model.score(median_row)[0] <= np.median(train_scores)
    assert inlier_model.standardized_score(median_row)[0] <= 0
    inliers = _gaussian(500, 1)
    shrunk = inlier_model.median + 0.3 * (inliers - inlier_model.median)
    y = np.r_[np.zeros(500), np.ones(500)]
    assert roc_auc_score(y, np.r_[inlier_model.score(inliers), inlier_model.score(shrunk)]) <= 0.6
    # a field whose features are all missing is imputed to the median row: typical, not anomalous
    all_nan = pd.DataFrame(np.nan, index=[0], columns=inlier_model.columns)
    assert inlier_model.score(all_nan)[0] == inlier_model.score(median_row)[0]
    assert inlier_model.n_imputed(all_nan) == {c: 1 for c in inlier_model.columns}


def test_backpropagation_matches_torch_autograd_on_a_bias_free_mlp():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(6, 5)), rng.normal(size=(5, 4)), rng.normal(size=(4, 3))]
    z, c = rng.normal(size=(20, 6)), rng.normal(size=3)
    loss, grads = _loss_and_grads(weights, z, c, weight_decay=0.01, slope=0.1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.LeakyReLU(0.1),
                              torch.nn.Linear(5, 4, bias=False), torch.nn.LeakyReLU(0.1),
                              torch.nn.Linear(4, 3, bias=False)).double()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, w in zip(linears, weights):
            lin.weight.copy_(torch.from_numpy(w.T))
    out = net(torch.from_numpy(z))
    t_loss = ((out - torch.from_numpy(c)) ** 2).sum(1).mean() + 0.005 * sum((m.weight ** 2).sum() for m in linears)
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(_forward(weights, z, 0.1)[0], out.detach().numpy(), rtol=1e-12)
    for g, lin in zip(grads, linears):
        np.testing.assert_allclose(g, lin.weight.grad.numpy().T, rtol=1e-10, atol=1e-12)


def test_a_seed_gives_the_same_model_and_another_seed_another():
    X = _gaussian(300, 4)
    a, b, c = (fit_deep_svdd(X, seed=s, **FAST) for s in (7, 7, 8))
    Xt = _gaussian(50, 5)
    assert np.array_equal(a.score(Xt), b.score(Xt))
    assert not np.allclose(a.score(Xt), c.score(Xt))


def test_save_load_and_dict_round_trips_give_identical_scores(inlier_model, tmp_path):
    Xt = _gaussian(100, 6, shift=0.5)
    path = inlier_model.save(tmp_path / "svdd" / "anomaly.json")
    again = DeepSVDD.load(path)
    assert np.array_equal(again.score(Xt), inlier_model.score(Xt))
    via_json = DeepSVDD.from_dict(json.loads(json.dumps(inlier_model.to_dict())))
    assert np.array_equal(via_json.standardized_score(Xt), inlier_model.standardized_score(Xt))
    with pytest.raises(ValueError, match="the path must end in .json"):
        inlier_model.save(tmp_path / "anomaly.npz")
    d = inlier_model.to_dict()
    with pytest.raises(ValueError, match=r"fields \['bias'\] are not known"):
        DeepSVDD.from_dict({**d, "bias": [0.0]})
    with pytest.raises(ValueError, match="do not chain from 9 features"):
        DeepSVDD.from_dict({**d, "n_features": 9})


def test_nan_is_imputed_by_the_training_median_and_callers_data_is_untouched(inlier_model):
    X = _gaussian(5, 9)
    holes = X.copy()
    holes.loc[[0, 3], "f2"] = np.nan
    filled = X.copy()
    filled.loc[[0, 3], "f2"] = inlier_model.median[2]
    before = holes.copy()
    assert np.array_equal(inlier_model.score(holes), inlier_model.score(filled))
    pd.testing.assert_frame_equal(holes, before)
    assert inlier_model.n_imputed(holes) == {"f2": 2} and inlier_model.n_imputed(filled) == {}
    # columns are matched by name: order and extra columns do not matter
    shuffled = filled[filled.columns[::-1]].assign(objid="x")
    assert np.array_equal(inlier_model.score(shuffled), inlier_model.score(filled))


def test_the_nan_imputed_at_fit_time_are_recorded_per_feature():
    X = _gaussian(300, 11)
    X.loc[:9, "f3"] = np.nan
    X.loc[[5], "f7"] = np.nan
    m = fit_deep_svdd(X, seed=0, epochs=1)
    assert m.n_imputed_fit == {"f3": 10, "f7": 1}
    assert any("11 missing values of the 300 training rows" in n and "'f3': 10" in n for n in m.notes)
    assert DeepSVDD.from_dict(json.loads(json.dumps(m.to_dict()))).n_imputed_fit == {"f3": 10, "f7": 1}
    arr = fit_deep_svdd(X.to_numpy(), seed=0, epochs=1)
    assert arr.n_imputed_fit == {3: 10, 7: 1}
    assert DeepSVDD.from_dict(json.loads(json.dumps(arr.to_dict()))).n_imputed_fit == {3: 10, 7: 1}
    assert arr.n_imputed(X.to_numpy()[:6]) == {3: 6, 7: 1}
    assert fit_deep_svdd(_gaussian(50, 12), seed=0, epochs=1).n_imputed_fit == {}


def test_a_model_saved_before_the_offset_loads_with_offset_zero(inlier_model):
    d = inlier_model.to_dict()
    old = {k: v for k, v in d.items() if k not in ("offset", "n_imputed_fit")}
    legacy = DeepSVDD.from_dict(old)
    assert legacy.offset == 0.0
    row = pd.DataFrame([inlier_model.median], columns=inlier_model.columns)
    np.testing.assert_array_equal(legacy.transform(row), np.zeros((1, 12)))


def test_the_standardized_score_is_centred_on_the_training_rows(inlier_model):
    X = _gaussian(2000, 0)  # the training rows
    z = inlier_model.standardized_score(X)
    assert np.median(z) == pytest.approx(0.0, abs=1e-9)
    q75, q25 = np.percentile(z, [75, 25])
    assert (q75 - q25) / 1.349 == pytest.approx(1.0, rel=1e-9)


def test_robust_location_scale_by_hand():
    a = np.array([[1.0, 5.0, 2.0], [2.0, 5.0, np.nan], [3.0, 5.0, 4.0], [4.0, 5.0, np.nan], [5.0, 5.0, 6.0]])
    med, scale, constant = robust_location_scale(a)
    np.testing.assert_allclose(med, [3.0, 5.0, 4.0])
    np.testing.assert_allclose(scale, [2.0 / 1.349, 1.0, 2.0 / 1.349])  # IQR 4 - 2; constant column -> 1
    assert constant == [1]


def test_errors_name_the_column_or_option():
    X = _gaussian(20, 10)
    with pytest.raises(ValueError, match=r"features \['f3'\] are NaN in every training row"):
        fit_deep_svdd(X.assign(f3=np.nan), seed=0, epochs=1)
    with pytest.raises(ValueError, match=r"features \['f1'\] hold \+-inf"):
        fit_deep_svdd(X.assign(f1=np.r_[np.inf, np.zeros(19)]), seed=0, epochs=1)
    with pytest.raises(ValueError, match="column 'f0' has dtype object"):
        fit_deep_svdd(X.assign(f0="a"), seed=0, epochs=1)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        fit_deep_svdd(X, seed=0, epochs=0)
    m = fit_deep_svdd(X, seed=0, epochs=1)
    with pytest.raises(ValueError, match=r"lacks the model's feature columns \['f5'\]"):
        m.score(X.drop(columns="f5"))
    with pytest.raises(ValueError, match="pass a DataFrame"):
        m.score(X.to_numpy())
    with pytest.raises(ValueError, match="offset must be None or a finite number > 0, got -1.0"):
        fit_deep_svdd(X, seed=0, epochs=1, offset=-1.0)
    arr = fit_deep_svdd(X.to_numpy(), seed=0, epochs=1)
    with pytest.raises(ValueError, match="has 11 features, the model was fit on 12"):
        arr.score(X.to_numpy()[:, :11])
