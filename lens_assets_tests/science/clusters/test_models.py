"""fit_cluster_models' anomaly model, and the component table and fused scores built on the models."""

import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lens_assets.science.clusters.features import cluster_feature_names
from lens_assets.science.clusters.models import (SCORE_COLUMNS, TRUTH_COLUMNS, component_table, fit_cluster_models,
                                                 fuse_scores)
from lens_assets.science.clusters.track_a import TrackAConfig
from lens_assets.science.metrics import tpr_at_fpr
from lens_assets.science.surveys import get_survey

FAST = TrackAConfig(n_estimators=60, learning_rate=0.2, max_depth=3, n_jobs=1)


def _table(n=800, seed=0):
    """Fields with random features but for colour_consistency (informative) and, for half of the lenses, an
    total_arc_length_arcsec far outside the non-lenses' range (what only an anomaly detector of non-lenses may catch
    without the lens labels). Splits: 40 % train, 20 % val (stop/calibrate), 20 % test, 20 % held-out family."""
    rng = np.random.default_rng(seed)
    bands = get_survey("des").band_names
    feats = cluster_feature_names(bands)
    y = (np.arange(n) % 2).astype(int)
    t = pd.DataFrame(rng.normal(size=(n, len(feats))), columns=feats)
    t["colour_consistency"] = np.clip(0.5 + 0.15 * y + 0.2 * rng.normal(size=n), 0, 1)
    odd = (y == 1) & (rng.uniform(size=n) < 0.5)
    t.loc[odd, "total_arc_length_arcsec"] += 6.0
    t.loc[rng.uniform(size=n) < 0.05, "colour_consistency"] = np.nan
    t["label"], t["objid"] = y, [f"f{i}" for i in range(n)]
    split = np.repeat(["train", "val", "test", "heldout"], [2 * n // 5, n // 5, n // 5, n - 4 * n // 5])
    t["split"] = split
    t["val_role"] = np.where(split == "val", np.where(np.arange(n) % 4 < 2, "stop", "calibrate"), "")
    t["sim_family"] = np.where(split == "heldout", "cluster_heldout", "cluster")
    t["sim_kind"], t["theta_e"], t["n_arcs"], t["arc_sb"] = "single", 5.0 * y, y, np.where(y == 1, 24.0, 99.0)
    return t, bands


@pytest.fixture(scope="module")
def fitted():
    table, bands = _table()
    return table, fit_cluster_models(table, bands=bands, config=FAST, pu_labeled=(), seed=0)


def test_the_anomaly_model_is_fit_on_training_non_lenses_and_scored_like_the_others(fitted):
    table, m = fitted
    assert "total_arc_length_arcsec" in cluster_feature_names(get_survey("des").band_names)
    train_nonlens = table[(table["split"] == "train") & (table["label"] == 0)]
    np.testing.assert_allclose(m.anomaly.median, np.nanmedian(train_nonlens[m.anomaly.columns], axis=0))
    rows = m.scores[m.scores["model"] == "anomaly"]
    assert list(rows.columns) == list(SCORE_COLUMNS) and len(rows) == 320
    assert set(rows["set"]) == {"test", "cluster_heldout"}
    scored = table[table["split"].isin(["test", "heldout"])]
    np.testing.assert_allclose(rows["logit"], m.anomaly.standardized_score(scored))
    np.testing.assert_allclose(rows["prob"], m.calibrators["anomaly"].predict(rows["logit"]))
    assert m.calibrators["anomaly"].method == "isotonic"
    odd = scored["total_arc_length_arcsec"].to_numpy() > 4.0
    assert roc_auc_score(odd, rows["logit"]) > 0.9  # the out-of-range lenses stand out without labels
    # the calibrator maps that score to lens probabilities: the odd fields (all lenses) near 1, the rest at
    # their lens rate, so the probability ranks lenses above non-lenses
    prob = rows["prob"].to_numpy()
    assert prob[odd].mean() > 0.9
    assert prob[~odd].mean() == pytest.approx(scored["label"].to_numpy()[~odd].mean(), abs=0.1)
    assert roc_auc_score(scored["label"], prob) > 0.65


def test_the_component_table_has_one_row_per_val_test_and_heldout_field(fitted):
    table, m = fitted
    extra = pd.DataFrame({"objid": table["objid"][::-1], "track_b": np.arange(len(table), dtype=float)})
    lacking = [f"f{i}" for i in range(480, 490)]  # 10 test fields without a track_b score
    ct = component_table(table, m, extra=extra[~extra["objid"].isin(lacking)])
    rows = table[table["split"] != "train"]
    assert ct["objid"].tolist() == rows["objid"].tolist()
    assert set(ct["set"]) == {"val", "test", "cluster_heldout"}
    assert {"split", "val_role", *TRUTH_COLUMNS, "track_a", "anomaly", "colour_consistency", "track_b"} <= set(ct)
    np.testing.assert_allclose(ct["track_a"], m.track_a["track_a"].logit(rows))
    want_b = extra.set_index("objid")["track_b"].drop(lacking).reindex(ct["objid"]).to_numpy()
    np.testing.assert_array_equal(ct["track_b"].to_numpy(), want_b)
    assert ct.loc[ct["track_b"].isna(), "objid"].tolist() == lacking
    with pytest.raises(ValueError, match=r"extra holds objids more than once: \['f0'\]"):
        component_table(table, m, extra=pd.concat([extra.tail(1), extra.tail(1)]))
    with pytest.raises(ValueError, match=r"extra's columns \['anomaly'\] are already in the component table"):
        component_table(table, m, extra=extra.rename(columns={"track_b": "anomaly"}))


def test_fused_scores_cover_test_and_heldout_and_use_track_b_only_when_present(fitted):
    table, m = fitted
    ct = component_table(table, m)
    rows, fusion = fuse_scores(ct, seed=0, n_random=2)
    assert list(rows.columns) == list(SCORE_COLUMNS) and set(rows["model"]) == {"fused"}
    assert set(rows["set"]) == {"test", "cluster_heldout"} and len(rows) == 320
    assert fusion.components == ["track_a", "colour_consistency", "anomaly"]
    assert any("fused without ['track_b', 'field_view']" in n for n in fusion.notes)
    assert fusion.n_missing["colour_consistency"] > 0  # the NaN colour consistencies were imputed
    assert rows["prob"].between(0, 1).all()
    # the fused score finds the lenses about as well as Track A alone, on the test and held-out rows; the fusion is
    # fit on the 80 val calibrate rows (40 non-lenses, k = 4), so its recall is noisy (0.52 vs Track A's 0.59 here;
    # with 1600 fields, 0.616 vs 0.622)
    both = pd.concat([m.scores, rows])
    tpr = {k: tpr_at_fpr(g["label"], g["logit"], 0.1) for k, g in both.groupby("model")}
    assert tpr["fused"] >= tpr["track_a"] - 0.1
    assert fusion.fit_role == "calibrate" and (fusion.n_fit_nonlenses, fusion.k) == (40, 4)
    assert any("40 non-lenses (fewer than 50)" in n for n in fusion.notes)
    # a Track B column joins the fusion
    good_b = ct.assign(track_b=ct["label"] * 2.0 + np.random.default_rng(1).normal(size=len(ct)))
    _, with_b = fuse_scores(good_b, seed=0, n_random=2)
    assert with_b.components == ["track_a", "track_b", "colour_consistency", "anomaly"]
    assert with_b.weights["track_b"] > 0.3
    with pytest.raises(ValueError, match=r"lacks columns \['track_c'\]"):
        fuse_scores(ct, components=["track_a", "track_c"])


def test_the_anomaly_models_imputations_are_recorded(fitted):
    table, m = fitted
    feats = m.anomaly.columns
    train_nonlens = table[(table["split"] == "train") & (table["label"] == 0)]
    assert m.anomaly.n_imputed_fit == {"colour_consistency": int(train_nonlens["colour_consistency"].isna().sum())}
    test = table[table["split"] == "test"]
    n_test = int(test["colour_consistency"].isna().sum())
    assert n_test > 0
    assert any(f"anomaly: {n_test} missing features of the 160 test rows" in n for n in m.notes)
    ct = component_table(table, m)
    rows = table[table["split"] != "train"]
    np.testing.assert_array_equal(ct["anomaly_n_imputed"], rows[feats].isna().sum(axis=1))


def test_fused_scores_record_scoring_imputations_and_refuse_missing_required_components(fitted):
    table, m = fitted
    ct = component_table(table, m)
    ct["track_b"] = ct["label"] * 2.0 + np.random.default_rng(2).normal(size=len(ct))
    lacking = ct.index[ct["split"] == "heldout"][[3, 7, 11]]
    ct.loc[lacking, "track_b"] = np.nan
    _, fusion = fuse_scores(ct, seed=0, n_random=1)
    want = {s: {c: int(g[c].isna().sum()) for c in fusion.components}
            for s, g in ct[ct["split"].isin(["test", "heldout"])].groupby("set")}
    assert fusion.n_imputed_scored == want
    assert want["cluster_heldout"]["track_b"] == 3 and want["test"]["track_b"] == 0
    assert any(n.startswith("scoring cluster_heldout (160 rows)") and "track_b 3" in n for n in fusion.notes)
    assert fusion.to_dict()["n_imputed_scored"] == want
    objids = ct.loc[lacking, "objid"].tolist()
    with pytest.raises(ValueError, match=r"required component 'track_b' is missing \(NaN\) for 3 fields, e.g. objids "
                                         + re.escape(str(objids))):
        fuse_scores(ct, seed=0, n_random=1, required=("track_b",))
    complete = ct.assign(track_b=ct["track_b"].fillna(0.0))
    _, ok = fuse_scores(complete, seed=0, n_random=1, required=("track_b",))
    assert ok.n_imputed_scored["cluster_heldout"]["track_b"] == 0
    with pytest.raises(ValueError, match=r"required components \['track_b'\] are not among the fused components"):
        fuse_scores(complete, components=["track_a", "anomaly"], required=("track_b",))


def test_the_fusion_is_fit_on_the_calibrate_rows_not_the_stop_rows(fitted):
    table, m = fitted
    ct = component_table(table, m)
    _, fusion = fuse_scores(ct, seed=0, n_random=1)
    cal = ct[(ct["split"] == "val") & (ct["val_role"] == "calibrate")]
    assert fusion.fit_role == "calibrate"
    assert (fusion.n_fit_lenses, fusion.n_fit_nonlenses) == (int(cal["label"].sum()), int((cal["label"] == 0).sum()))
    assert fusion.mean["track_a"] == pytest.approx(cal["track_a"].mean())
    stop = (ct["split"] == "val") & (ct["val_role"] == "stop")
    moved = ct.assign(track_a=np.where(stop, ct["track_a"] + 5 * ct["label"], ct["track_a"]))  # optimistic there
    _, again = fuse_scores(moved, seed=0, n_random=1)
    assert again.weights == fusion.weights
