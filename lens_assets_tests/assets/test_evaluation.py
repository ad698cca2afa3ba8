"""The whole graph on a tiny SDSS survey: ensemble scores, the calibrator and the Bologna report.

One materialization (the session's ``trained_survey``) feeds every test; a test
that rewrites a file or re-materializes an asset works on a private copy
(``graph_copy``). The report figures are recomputed here from the scores table
with scikit-learn and numpy.
"""

import hashlib
import json
from itertools import pairwise
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lens_assets.assets.evaluation import GATE_FIELDS, SCORED_SPLITS, bologna_report, score_calibrator
from lens_assets.model_registry import load_scoring
from lens_assets.science.calibration import Calibrator
from lens_assets.science.metrics import FLUX_RATIO_BINS
from lens_assets_tests.helpers import PERMISSIVE_GATES as PERMISSIVE
from lens_assets_tests.helpers import TRAINED_MEMBER as MEMBER
from lens_assets_tests.helpers import TRAINED_N_HELDOUT as N_HELDOUT
from lens_assets_tests.helpers import TRAINED_SURVEY as SURVEY

DESIGN_KEYS = ("auroc", "auprc", "tpr0", "tpr10", "tpr_at_fpr_0.1", "ece", "fnr_flux_ratio_lt_0.1",
               "n_test_lenses", "n_test_nonlenses", "heldout_auroc", "heldout_tpr0", "heldout_tpr10")
CHECKS = {"auroc_at_least_gate", "tpr10_at_least_gate", "ece_at_most_gate"}
NEW_CHECKS = {"heldout_auroc_at_least_gate", "lensing_only_auroc_at_least_gate", "fnr_flux_ratio_lt_0_1_at_most_gate"}


def _metadata(result, key):
    (mat,) = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


def _checks(result, names=CHECKS, asset="bologna_report"):
    """``asset``'s checks among ``names``: name -> passed."""
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()
            if e.asset_key == dg.AssetKey(asset) and e.check_name in names}


@pytest.fixture
def graph(trained_survey):
    """(storage, run record) of the shared trained survey: read only."""
    return trained_survey.storage(), trained_survey.run


@pytest.fixture
def graph_copy(trained_survey_copy):
    """(storage, run record) of a private copy of the trained survey, for tests that change its files."""
    return trained_survey_copy.storage(), trained_survey_copy.run


def _report_only(storage, gates):
    return dg.materialize([bologna_report], partition_key=SURVEY, resources={"storage": storage},
                          run_config={"ops": {"bologna_report": {"config": gates}}},
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)  # gates are blocking


def _scores(storage):
    return pd.read_parquet(storage.path("scores", SURVEY, "ensemble_logits.parquet"))


def _tpr_above(y, s, n_false_positives):
    """Fraction of lenses strictly above the (n+1)-th highest non-lens (every lens if there are fewer)."""
    neg = np.sort(s[y == 0])[::-1]
    thr = neg[n_false_positives] if len(neg) > n_false_positives else -np.inf
    return float(np.mean(s[y == 1] > thr)), thr


def _ece(y, p, n_bins=15):
    """Equal-mass bins by rank: bin k holds ranks [k n / B, (k + 1) n / B) as numpy's array_split lays them."""
    order = np.argsort(p, kind="stable")
    y, p, n = y[order].astype(float), p[order], len(p)
    sizes = [n // n_bins + (1 if k < n % n_bins else 0) for k in range(n_bins)]
    edges = np.cumsum([0, *sizes])
    return sum((hi - lo) / n * abs(y[lo:hi].mean() - p[lo:hi].mean()) for lo, hi in pairwise(edges))


def test_report_metadata_has_every_design_key_as_a_float_and_the_report_files(graph):
    storage, result = graph
    meta = _metadata(result, "bologna_report")
    for key in DESIGN_KEYS:
        assert isinstance(meta[key], float), key
    out_dir = storage.path("reports", SURVEY, "bologna")
    assert Path(meta["report_path"]) == out_dir / "report.md"
    for name in ("report.json", "report.md", "roc.png", "score_histograms.png", "reliability.png"):
        assert (out_dir / name).stat().st_size > 0, name
    for name in ("roc.png", "score_histograms.png", "reliability.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = json.loads((out_dir / "report.json").read_text())
    for key in DESIGN_KEYS[:9]:
        assert report["in_distribution"][key] == pytest.approx(meta[key], nan_ok=True), key
    assert report["heldout"]["auroc"] == pytest.approx(meta["heldout_auroc"])
    assert report["gates"] == {**PERMISSIVE, **{target: None for _, target in GATE_FIELDS.values()}}  # no targets
    md = (out_dir / "report.md").read_text()
    assert md.startswith(f"# Bologna report: {SURVEY}") and "![ROC](roc.png)" in md


def test_report_figures_equal_metrics_recomputed_from_the_scores(graph):
    storage, result = graph
    meta = _metadata(result, "bologna_report")
    scores = _scores(storage)
    test = scores[scores["split"] == "test"]
    y, s, p = test["label"].to_numpy(), test["logit"].to_numpy(), test["probability"].to_numpy()
    assert 0 < y.sum() < len(y)
    assert meta["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert meta["auprc"] == pytest.approx(average_precision_score(y, s))
    tpr0, _ = _tpr_above(y, s, 0)
    tpr10, thr10 = _tpr_above(y, s, 9)
    assert (meta["tpr0"], meta["tpr10"]) == (pytest.approx(tpr0), pytest.approx(tpr10))
    fpr, tpr, _ = roc_curve(y, s)
    assert meta["tpr_at_fpr_0.1"] == pytest.approx(tpr[fpr <= 0.1].max())
    assert meta["ece"] == pytest.approx(_ece(y, p))  # on calibrated probabilities, not the logit
    faint = (y == 1) & (test["flux_ratio"].to_numpy() >= 0) & (test["flux_ratio"].to_numpy() < 0.1)
    fnr = float(np.mean(s[faint] <= thr10)) if faint.any() else float("nan")
    assert meta["fnr_flux_ratio_lt_0.1"] == pytest.approx(fnr, nan_ok=True)
    faint_auroc = (roc_auc_score(np.r_[np.ones(faint.sum()), np.zeros((y == 0).sum())], np.r_[s[faint], s[y == 0]])
                   if faint.any() else float("nan"))
    assert meta["auroc_flux_ratio_lt_0.1"] == pytest.approx(faint_auroc, nan_ok=True)
    assert (meta["n_test_lenses"], meta["n_test_nonlenses"]) == (float(y.sum()), float((y == 0).sum()))
    # the noise floor: matched-filter misses at the TPR10 false-alarm rate, from each lens's simulated arc S/N
    from scipy.stats import norm

    snr, fr = test["arc_snr"].to_numpy(), test["flux_ratio"].to_numpy()
    assert (snr[y == 1] > 0).all() and (snr[y == 0] == 0).all()
    z = norm.isf(10 / (y == 0).sum())
    for name, lo, hi in FLUX_RATIO_BINS:
        m = (y == 1) & (fr >= lo) & (fr < hi)
        floor = float(norm.cdf(z - snr[m]).mean()) if m.any() else float("nan")
        assert meta[f"noise_limited_fnr_flux_ratio_{name}"] == pytest.approx(floor, nan_ok=True), name
    strong = (y == 1) & (snr >= 10) & (snr < 30)
    assert meta["recall_arc_snr_10_30"] == pytest.approx(
        float(np.mean(s[strong] > thr10)) if strong.any() else float("nan"), nan_ok=True)
    assert "noise floor" in (storage.path("reports", SURVEY, "bologna", "report.md")).read_text()

    # AUROC against each non-lens type: every test lens against that type's test non-lenses, in the report and
    # as the report page's table
    by_kind = json.loads(storage.path("reports", SURVEY, "bologna", "report.json").read_text())["by_kind"]["test"]
    kinds = test["sim_kind"].to_numpy()
    assert set(by_kind) == set(kinds[y == 0]) and len(by_kind) >= 2
    for kind, fig in by_kind.items():
        neg = s[(y == 0) & (kinds == kind)]
        assert fig["n"] == len(neg)
        assert fig["auroc"] == pytest.approx(roc_auc_score(np.r_[np.ones((y == 1).sum()), np.zeros(len(neg))],
                                                           np.r_[s[y == 1], neg])), kind
    assert [v["auroc"] for v in by_kind.values()] == sorted(v["auroc"] for v in by_kind.values())
    assert sum(v["share"] * v["auroc"] for v in by_kind.values()) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert "## AUROC against each non-lens type" in (
        storage.path("reports", SURVEY, "bologna", "report.md")).read_text()
    assert f"| {next(iter(by_kind))} | " in meta["auroc_by_nonlens_type"]

    held = scores[scores["split"] == "heldout"]
    hy, hs = held["label"].to_numpy(), held["logit"].to_numpy()
    assert 0 < hy.sum() < len(hy)
    assert meta["heldout_auroc"] == pytest.approx(roc_auc_score(hy, hs))
    assert meta["heldout_tpr0"] == pytest.approx(_tpr_above(hy, hs, 0)[0])
    assert meta["heldout_tpr10"] == pytest.approx(_tpr_above(hy, hs, 9)[0])


def test_report_gives_the_error_rate_by_uncertainty_decile_of_the_test_split(graph):
    """The scores carry each row's uncertainty; the report's deciles are recomputed here from them."""
    storage, result = graph
    scores = _scores(storage)
    test = scores[scores["split"] == "test"]
    assert np.isfinite(scores["uncertainty"]).all() and (scores["uncertainty"] >= 0).all()  # isotonic plateaus: 0
    assert (scores["uncertainty"] > 0).any()
    # one member: the spread is its MC-dropout std, seen through the calibrated probability
    cal = Calibrator.from_dict(
        json.loads(storage.path("calibrators", SURVEY, "calibrator.json").read_text())["calibrator"])
    z, s = scores["logit"].to_numpy(), scores[f"logit_std_mc_{MEMBER}"].to_numpy()
    np.testing.assert_allclose(scores["uncertainty"], (cal.predict(z + s) - cal.predict(z - s)) / 2, rtol=1e-6)
    np.testing.assert_allclose(scores["logit_std_mc"], s, rtol=1e-6)
    unc = json.loads(storage.path("reports", SURVEY, "bologna", "report.json").read_text())["uncertainty"]
    assert sum(b["n"] for b in unc["bins"]) == len(test) == unc["n"] and len(unc["bins"]) == 10
    order = np.argsort(test["uncertainty"].to_numpy(), kind="stable")
    wrong = ((test["probability"].to_numpy() >= 0.5).astype(int) != test["label"].to_numpy())
    for b, idx in zip(unc["bins"], np.array_split(order, 10)):
        assert b["error_rate"] == pytest.approx(wrong[idx].mean())
    assert unc["error_rate"] == pytest.approx(wrong.mean())
    if 0 < wrong.sum() < len(wrong):
        assert unc["error_auroc"] == pytest.approx(roc_auc_score(wrong, test["uncertainty"]))
    md = storage.path("reports", SURVEY, "bologna", "report.md").read_text()
    assert "## Error rate by uncertainty decile (test split)" in md
    meta = _metadata(result, "bologna_report")
    assert "| decile (least uncertain first) |" in meta["error_rate_by_uncertainty_decile"]
    assert meta["uncertainty_error_auroc"] == pytest.approx(unc["error_auroc"], nan_ok=True)


def test_test_rows_are_the_test_split_and_heldout_rows_the_heldout_family(graph):
    storage, result = graph
    meta = _metadata(result, "bologna_report")
    scores = _scores(storage)
    splits = pd.read_parquet(storage.path("splits", SURVEY, "dataset_splits.parquet"))
    catalog = pd.read_parquet(storage.path("catalog", SURVEY, "cutout_catalog.parquet"))
    test_ids = set(splits.loc[splits["split"] == "test", "objid"])
    assert meta["n_test_lenses"] + meta["n_test_nonlenses"] == len(test_ids)
    assert set(scores.loc[scores["split"] == "test", "objid"]) == test_ids
    assert set(scores.loc[scores["split"] == "val", "objid"]) == set(splits.loc[splits["split"] == "val", "objid"])
    heldout_ids = set(catalog.loc[catalog["sim_family"] == "heldout", "objid"])
    assert len(heldout_ids) == N_HELDOUT
    assert set(scores.loc[scores["split"] == "heldout", "objid"]) == heldout_ids
    assert heldout_ids.isdisjoint(splits["objid"])
    assert scores["objid"].is_unique and {"val", "test", "heldout"} <= set(scores["split"]) <= set(SCORED_SPLITS)
    assert (scores.loc[scores["split"] == "heldout", "sim_family"] == "heldout").all()
    pairs = scores["split"] == "lensing_only"
    assert (scores.loc[pairs, "sim_family"] == "lensing_only").all()
    training_family = scores.loc[scores["split"].isin(["val", "test"]), "sim_family"]
    assert training_family.nunique() == 1 and training_family.iloc[0] not in ("heldout", "galsim", "lensing_only")


def test_checks_follow_the_gates(graph_copy):
    storage, result = graph_copy
    assert _checks(result) == dict.fromkeys(CHECKS, True)  # permissive gates (the original three; new ones below)
    meta = _metadata(result, "bologna_report")
    auroc, tpr10, ece = meta["auroc"], meta["tpr10"], meta["ece"]
    assert auroc < 1.0 and tpr10 < 1.0 and ece > 0.0  # so that each gate can be missed
    # gates at the measured values pass (>= and <=); just beyond them fail, each check on its own gate
    first = _report_only(storage, {"min_auroc": float(np.nextafter(auroc, 2)), "min_tpr10": tpr10, "max_ece": ece})
    assert _checks(first) == {"auroc_at_least_gate": False, "tpr10_at_least_gate": True, "ece_at_most_gate": True}
    second = _report_only(storage, {"min_auroc": auroc, "min_tpr10": float(np.nextafter(tpr10, 2)),
                                    "max_ece": float(np.nextafter(ece, -1))})
    assert _checks(second) == {"auroc_at_least_gate": True, "tpr10_at_least_gate": False, "ece_at_most_gate": False}
    assert _metadata(second, "bologna_report")["auroc"] == auroc  # the same scores: the same figures
    gates = json.loads(storage.path("reports", SURVEY, "bologna", "report.json").read_text())["gates"]
    assert gates["min_auroc"] == auroc
    assert _checks(_report_only(storage, PERMISSIVE)) == dict.fromkeys(CHECKS, True)  # leave the report as it was


def _evaluations(result, asset="bologna_report"):
    return {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key == dg.AssetKey(asset)}


def test_a_missed_gate_blocks_and_a_missed_target_warns_and_the_pair_is_still_promoted(graph_copy):
    """The same threshold just above the measured AUROC fails the run as a gate (ERROR, blocking) and, as a target,
    only warns: the run succeeds and promoted_model promotes the pair, listing the missed target. report.json records
    the gate, the target and whether the check blocks; a figure with neither passes as "not gated"."""
    from lens_assets.assets.promotion import promoted_model

    from lens_assets.demo import check_verdict

    storage, result = graph_copy
    auroc, held = _metadata(result, "bologna_report")["auroc"], _metadata(result, "bologna_report")["heldout_auroc"]
    above = float(np.nextafter(auroc, 2))
    report_json = storage.path("reports", SURVEY, "bologna", "report.json")
    try:
        gated = _report_only(storage, {**PERMISSIVE, "min_auroc": above, "target_auroc": above})
        assert not gated.success
        check = _evaluations(gated)["auroc_at_least_gate"]
        assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR and check_verdict(check) == "FAILED"
        assert json.loads(report_json.read_text())["checks"]["auroc_at_least_gate"] == {
            "passed": False, "value": auroc, "gate": above, "target": above, "blocking": True}

        # the demo's way for the held-out families: no gate, a target
        config = {**PERMISSIVE, "min_auroc": 0.0, "target_auroc": above, "min_tpr10": None, "target_ece": 1.0,
                  "min_heldout_auroc": None, "target_heldout_auroc": float(np.nextafter(held, 2))}
        run = dg.materialize([bologna_report, promoted_model], partition_key=SURVEY, resources={"storage": storage},
                             run_config={"ops": {"bologna_report": {"config": config}}},
                             instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
        assert run.success
        evaluations = _evaluations(run)
        check = evaluations["auroc_at_least_gate"]
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert (check.metadata["gate_met"].value, check.metadata["target_met"].value) == (True, False)
        assert check_verdict(check) == f"target {above} not met (WARN, not blocking)"
        heldout = evaluations["heldout_auroc_at_least_gate"]
        assert not heldout.passed and heldout.severity == dg.AssetCheckSeverity.WARN
        assert heldout.metadata["gate"].value == "not gated" and check_verdict(heldout).startswith("target ")
        assert evaluations["ece_at_most_gate"].passed  # a gate and a target, both met
        assert evaluations["ece_at_most_gate"].severity == dg.AssetCheckSeverity.ERROR
        assert check_verdict(evaluations["ece_at_most_gate"]) == "passed"
        tpr10 = evaluations["tpr10_at_least_gate"]
        assert tpr10.passed and tpr10.severity == dg.AssetCheckSeverity.WARN
        assert (tpr10.metadata["gate"].value, tpr10.metadata["target"].value) == ("not gated", "none")
        assert check_verdict(tpr10) == "not gated"
        recorded = json.loads(report_json.read_text())["checks"]
        assert recorded["auroc_at_least_gate"] == {"passed": False, "value": auroc, "gate": 0.0, "target": above,
                                                   "blocking": False}
        tpr10_value = _metadata(run, "bologna_report")["tpr10"]
        assert recorded["tpr10_at_least_gate"] == {"passed": True, "value": tpr10_value, "gate": "not gated",
                                                   "target": None, "blocking": False}
        assert (recorded["heldout_auroc_at_least_gate"]["passed"], recorded["heldout_auroc_at_least_gate"]["blocking"]
                ) == (False, False)
        (promoted,) = run.asset_materializations_for_node("promoted_model")
        why = promoted.metadata["why"].value
        assert (f"| auroc_at_least_gate | {auroc:.3f} | 0.0 | {above} | target {above} not met "
                "(WARN, not blocking) |") in why
        assert f"| tpr10_at_least_gate | {tpr10_value:.3f} | not gated | none | not gated |" in why
        promotion = json.loads(storage.path("promoted", SURVEY, "promotion.json").read_text())
        assert promotion["checks"] == recorded
    finally:
        _report_only(storage, PERMISSIVE)  # leave the report as it was


def test_calibrator_json_reproduces_the_probabilities_in_the_scores(graph):
    storage, result = graph
    doc = json.loads(storage.path("calibrators", SURVEY, "calibrator.json").read_text())
    meta = _metadata(result, "score_calibrator")
    assert Path(meta["path"]) == storage.path("calibrators", SURVEY, "calibrator.json")
    scores = _scores(storage)
    cal = Calibrator.from_dict(doc["calibrator"])
    assert cal.method == meta["method"]
    np.testing.assert_allclose(cal.predict(scores["logit"].to_numpy()), scores["probability"].to_numpy(),
                               rtol=0, atol=1e-12)
    assert scores["probability"].between(0.0, 1.0).all()
    # mean fusion of one member: the fused logit is the member's logit
    assert doc["fusion"] == {"method": "mean", "weights": [1.0], "bias": 0.0}
    np.testing.assert_allclose(scores["logit"], scores[f"logit_{MEMBER}"].astype(float), rtol=0, atol=0)
    assert doc["n_val"] == meta["n_val"] == int((scores["split"] == "val").sum())
    # fit on the calibrate half of the val split only (the stop half early-stopped the members)
    calibrate = scores["val_role"] == "calibrate"
    assert doc["n_calibrate"] == int(calibrate.sum()) > 0 and set(scores.loc[calibrate, "split"]) == {"val"}
    assert cal.train_prevalence == pytest.approx(scores.loc[calibrate, "label"].mean())
    assert all("path" not in m for m in doc["members"])  # no machine-specific absolute paths in the document


def test_load_scoring_gives_what_score_calibrator_used(graph):
    storage, _ = graph
    ensemble, fusion, cal, doc = load_scoring(storage, SURVEY)
    scores = _scores(storage)
    fused = fusion(scores[[f"logit_{MEMBER}"]].to_numpy())
    np.testing.assert_allclose(fused, scores["logit"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cal.predict(fused), scores["probability"], rtol=0, atol=1e-12)
    assert [m["name"] for m in ensemble["members"]] == [m["name"] for m in doc["members"]] == [MEMBER]
    assert Path(ensemble["members"][0]["path"]) == storage.path("models", SURVEY, MEMBER, "best.ckpt")


def test_ensemble_json_lists_members_with_checkpoints_relative_to_the_storage_root(graph):
    storage, result = graph
    ensemble = json.loads(storage.path("models", SURVEY, "ensemble.json").read_text())
    assert ensemble["survey"] == SURVEY
    assert [m["name"] for m in ensemble["members"]] == [MEMBER]
    (member,) = ensemble["members"]
    assert member["checkpoint"] == f"models/{SURVEY}/{MEMBER}/best.ckpt"
    assert not Path(member["checkpoint"]).is_absolute()
    ckpt = storage.path(member["checkpoint"])
    assert member["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert member["sha256"] == _metadata(result, "lens_classifier")[f"{MEMBER}/checkpoint_sha256"]


def test_load_scoring_fails_when_a_checkpoint_changed_after_calibration(graph_copy):
    storage, _ = graph_copy
    ckpt = storage.path("models", SURVEY, MEMBER, "best.ckpt")
    original = ckpt.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    try:
        ckpt.write_bytes(bytes(changed))
        with pytest.raises(dg.Failure, match=rf"{ckpt}: sha256 [0-9a-f]{{16}} differs from [0-9a-f]{{16}} in "
                                             rf".*ensemble.json; re-materialize lens_classifier"):
            load_scoring(storage, SURVEY)
    finally:
        ckpt.write_bytes(original)
    load_scoring(storage, SURVEY)  # restored: loads again


def test_load_scoring_fails_when_the_calibrator_was_fit_for_other_checkpoints(graph_copy):
    storage, _ = graph_copy
    path = storage.path("calibrators", SURVEY, "calibrator.json")
    original = path.read_text()
    doc = json.loads(original)
    doc["members"][0]["sha256"] = "0" * 64  # as if lens_classifier had been retrained since
    try:
        path.write_text(json.dumps(doc))
        with pytest.raises(dg.Failure, match=rf"{path} was fit for other checkpoints than \S*models/{SURVEY}/"
                                             "ensemble.json lists: re-materialize score_calibrator"):
            load_scoring(storage, SURVEY)
    finally:
        path.write_text(original)


def test_report_without_scores_is_a_clear_failure(storage):
    with pytest.raises(dg.Failure, match=rf"ensemble_logits.parquet does not exist: materialize score_calibrator "
                                         rf"for {SURVEY} first"):
        dg.materialize([bologna_report], partition_key=SURVEY, resources={"storage": storage},
                       run_config={"ops": {"bologna_report": {"config": PERMISSIVE}}},
                       instance=dg.DagsterInstance.ephemeral())


def test_score_calibrator_without_an_ensemble_is_a_clear_failure(storage):
    with pytest.raises(dg.Failure, match=rf"ensemble.json does not exist: materialize lens_classifier for {SURVEY}"):
        dg.materialize([score_calibrator], partition_key=SURVEY, resources={"storage": storage},
                       instance=dg.DagsterInstance.ephemeral())


# ---------------------------------------------------------------- shortcut audit, held-out families, pairs, summary


def test_shortcut_audit_scores_the_test_split_and_each_heldout_family_from_the_train_split(graph):
    storage, result = graph
    meta = _metadata(result, "shortcut_audit")
    doc = json.loads(storage.path("reports", SURVEY, "shortcut", "shortcut.json").read_text())
    assert 0.0 <= meta["shortcut_auroc"] <= 1.0 and meta["shortcut_auroc"] == pytest.approx(doc["auroc"]["test"])
    assert meta["heldout_shortcut_auroc"] == pytest.approx(doc["auroc"]["heldout"])
    assert meta["heldout_heldout_shortcut_auroc"] == meta["heldout_shortcut_auroc"]
    assert np.isnan(meta["heldout_galsim_shortcut_auroc"])
    assert meta["lensing_only_shortcut_auroc"] == pytest.approx(doc["auroc"]["lensing_only"], nan_ok=True)
    assert list(meta)[0] == "summary" and "| galsim | no objects | undefined | 0 | 0 |" in meta["summary"]
    splits = pd.read_parquet(storage.path("splits", SURVEY, "dataset_splits.parquet"))
    features = pd.read_parquet(storage.path("reports", SURVEY, "shortcut", "features.parquet"))
    assert doc["n_train"] == (splits["split"] == "train").sum()
    assert set(features.loc[features["split"] == "test", "objid"]) == set(splits.loc[splits["split"] == "test",
                                                                                       "objid"])
    assert (features["split"] == "heldout").sum() == N_HELDOUT == doc["n_lenses"]["heldout"] + doc["n_nonlenses"][
        "heldout"]
    assert sum(doc["feature_importance"].values()) == pytest.approx(1.0)
    png = storage.path("reports", SURVEY, "shortcut", "importance.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checks = _checks(result, {"shortcut_auroc_at_most_gate"}, asset="shortcut_audit")
    assert checks == {"shortcut_auroc_at_most_gate": meta["shortcut_auroc"] <= 0.65}
    # the report reads the audit
    assert _metadata(result, "bologna_report")["shortcut_auroc"] == pytest.approx(meta["shortcut_auroc"])
    # each row's score, and the AUROC of every test lens against each non-lens type recomputed from it
    from sklearn.metrics import roc_auc_score

    assert features.loc[features["split"] == "train", "shortcut_score"].isna().all()
    test = features[features["split"] == "test"].merge(
        pd.read_parquet(storage.path("catalog", SURVEY, "cutout_catalog.parquet"), columns=["objid", "sim_kind"]),
        on="objid", suffixes=("", "_catalog"))
    assert (test["sim_kind"] == test["sim_kind_catalog"]).all()
    assert roc_auc_score(test["label"], test["shortcut_score"]) == pytest.approx(doc["auroc"]["test"])
    by = meta["shortcut_auroc_by_kind"]["test"]
    assert set(by) == set(test.loc[test["label"] == 0, "sim_kind"])
    lens = test.loc[test["label"] == 1, "shortcut_score"]
    for kind, v in by.items():
        other = test.loc[(test["label"] == 0) & (test["sim_kind"] == kind), "shortcut_score"]
        assert v["auroc"] == pytest.approx(roc_auc_score(np.r_[np.ones(len(lens)), np.zeros(len(other))],
                                                         np.r_[lens, other]))
    assert "Shortcut AUROC of every lens against each non-lens type" in meta["summary"]
    # the same classifier trained and scored without the twins (the lens/twin pairs have no such figure)
    from lens_assets.science.shortcut import shortcut_auroc

    cols = list(doc["feature_importance"])
    nt = features[features["sim_kind"] != "twin"]
    tr, te = nt[nt["split"] == "train"], nt[nt["split"] == "test"]
    again = shortcut_auroc(tr[cols], tr["label"], {"test": (te[cols], te["label"])}, seed=0)["auroc"]["test"]
    assert meta["shortcut_auroc_without_twins"] == pytest.approx(again) == doc["auroc_without_twins"]["test"]
    for part in ("train", "test"):  # else the recomputation would repeat the figure with the twins
        assert ((features["split"] == part) & (features["sim_kind"] == "twin")).any()
    assert "lensing_only" not in doc["auroc_without_twins"] and "without_twins_note" not in doc
    assert "held-out: lensing_only" not in meta["summary"]  # the pairs' one type is their shortcut AUROC
    report = storage.path("reports", SURVEY, "bologna", "report.md").read_text()
    assert "## Shortcut AUROC against each non-lens type" in report
    assert (f"| shortcut AUROC without the twins (trained and scored without them) | "
            f"{meta['shortcut_auroc_without_twins']:.3f} |") in report
    block = json.loads(storage.path("reports", SURVEY, "bologna", "report.json").read_text())["shortcut"]
    assert block["auroc_without_twins"]["test"] == meta["shortcut_auroc_without_twins"]
    assert block["auroc"] == doc["auroc"]


def test_shortcut_audit_scores_files_held_out_by_their_simrole_under_their_own_family(graph_copy):
    """The audit scores the rows bologna_report scores: a held-out family renamed to one no config lists, still
    SIMROLE heldout, is scored under its new name, with every one of its rows."""
    from lens_assets.assets.evaluation import shortcut_audit

    storage, _ = graph_copy
    path = storage.path("catalog", SURVEY, "cutout_catalog.parquet")
    catalog = pd.read_parquet(path)
    held = catalog["sim_family"] == "heldout"
    assert (catalog.loc[held, "sim_role"] == "heldout").all() and held.sum() == N_HELDOUT
    catalog.loc[held, "sim_family"] = "renamed"
    catalog.to_parquet(path, index=False)
    run = dg.materialize([shortcut_audit], partition_key=SURVEY, resources={"storage": storage},
                         instance=dg.DagsterInstance.ephemeral())
    doc = json.loads(storage.path("reports", SURVEY, "shortcut", "shortcut.json").read_text())
    features = pd.read_parquet(storage.path("reports", SURVEY, "shortcut", "features.parquet"))
    assert doc["families"] == ["heldout", "galsim", "renamed", "lensing_only"]
    assert (features["split"] == "renamed").sum() == N_HELDOUT and not (features["split"] == "heldout").any()
    assert set(features.loc[features["split"] == "renamed", "objid"]) == set(catalog.loc[held, "objid"])
    meta = _metadata(run, "shortcut_audit")
    assert meta["heldout_renamed_shortcut_auroc"] == pytest.approx(doc["auroc"]["renamed"])
    # "heldout" and "galsim" have no rows now: the headline held-out figure is the first family that has one
    assert np.isnan(meta["heldout_heldout_shortcut_auroc"]) and np.isnan(meta["heldout_galsim_shortcut_auroc"])
    assert meta["heldout_shortcut_auroc"] == meta["heldout_renamed_shortcut_auroc"]
    assert 0.0 <= doc["auroc"]["renamed"] <= 1.0


def test_shortcut_audit_gate_follows_its_config(graph_copy):
    storage, _ = graph_copy
    auroc = json.loads(storage.path("reports", SURVEY, "shortcut", "shortcut.json").read_text())["auroc"]["test"]
    for gate, passed in ((auroc, True), (float(np.nextafter(auroc, -1)), False)):
        from lens_assets.assets.evaluation import shortcut_audit

        run = dg.materialize([shortcut_audit], partition_key=SURVEY, resources={"storage": storage},
                             run_config={"ops": {"shortcut_audit": {"config": {"max_shortcut_auroc": gate}}}},
                             instance=dg.DagsterInstance.ephemeral())
        assert _checks(run, {"shortcut_auroc_at_most_gate"}, asset="shortcut_audit") == {
            "shortcut_auroc_at_most_gate": passed}
        assert _metadata(run, "shortcut_audit")["shortcut_auroc"] == auroc  # seeded: the same figure


def test_report_leads_with_the_summary_table_and_says_no_objects_for_an_absent_family(graph):
    storage, result = graph
    meta = _metadata(result, "bologna_report")
    assert list(meta)[0] == "summary"
    table = meta["summary"]
    lines = table.splitlines()
    assert lines[0] == "| figure | test split | held-out: heldout | held-out: galsim |"
    auroc_row = next(line for line in lines if line.startswith("| AUROC |")).split(" | ")
    assert auroc_row[1] == f"{meta['auroc']:.3f} [{meta['auroc_ci_low']:.3f}, {meta['auroc_ci_high']:.3f}]"
    assert auroc_row[2].startswith(f"{meta['heldout_auroc']:.3f} [") and auroc_row[3] == "no objects |"
    for name in ("AUPRC", "TPR0", "TPR10", "ECE", "FNR (flux ratio < 0.1)", "AUROC, lenses of flux ratio < 0.1",
                 "lensing-only AUROC", "shortcut AUROC"):
        assert any(line.startswith(f"| {name}") for line in lines), name
    assert "nan" not in table
    md = storage.path("reports", SURVEY, "bologna", "report.md").read_text()
    assert md.startswith(f"# Bologna report: {SURVEY}\n\n{table}")


def test_report_has_every_heldout_family_and_bootstrap_intervals_around_the_point_estimates(graph):
    storage, result = graph
    meta = _metadata(result, "bologna_report")
    assert meta["heldout_families"] == "heldout,galsim"  # what bench_quality reads the families' keys by
    for k in ("auroc", "tpr0", "tpr10"):
        assert meta[f"heldout_heldout_{k}"] == meta[f"heldout_{k}"]
        assert np.isnan(meta[f"heldout_galsim_{k}"])
        assert meta[f"{k}_ci_low"] <= meta[k] <= meta[f"{k}_ci_high"], k
    from lens_assets.science.metrics import paired_win_rate

    pairs = _scores(storage).query("split == 'lensing_only'")
    want = paired_win_rate(pairs["pair_id"], pairs["label"], pairs["logit"]) if len(pairs) else {
        "auroc": float("nan"), "n_pairs": 0.0}
    assert meta["lensing_only_auroc"] == pytest.approx(want["auroc"], nan_ok=True)
    assert meta["n_lensing_only_pairs"] == want["n_pairs"]
    for name in ("lt_0.8", "0.8_1.2", "1.2_2", "ge_2", "lt_1.2", "ge_1.2"):  # bench_ablation reads ge_1.2
        assert f"lensing_only_auroc_theta_e_{name}" in meta, name
    doc = json.loads(storage.path("calibrators", SURVEY, "calibrator.json").read_text())
    assert doc["heldout_families"] == ["heldout", "galsim"]
    assert _checks(result, NEW_CHECKS) == {"heldout_auroc_at_least_gate": True,
                                           # without pairs the lensing-only gate cannot pass
                                           "lensing_only_auroc_at_least_gate": want["n_pairs"] > 0,
                                           # PERMISSIVE does not gate it (None): passes, saying so
                                           "fnr_flux_ratio_lt_0_1_at_most_gate": True}
    recorded = json.loads(storage.path("reports", SURVEY, "bologna", "report.json").read_text())["checks"]
    fnr = recorded["fnr_flux_ratio_lt_0_1_at_most_gate"]
    assert (fnr["passed"], fnr["gate"], fnr["target"], fnr["blocking"]) == (True, "not gated", None, False)


def test_new_gates_pass_at_the_measured_values_and_fail_just_beyond(graph_copy):
    """Held-out AUROC and FNR(flux ratio < 0.1) gates at their measured values pass, one ulp beyond fail. The tiny
    fixture may hold no faint-arc test lens, so a third of its test lenses are given flux ratio 0.05 (their logits
    stay as scored): the FNR is then measured on real scores."""
    storage, _ = graph_copy
    path = storage.path("scores", SURVEY, "ensemble_logits.parquet")
    original = path.read_bytes()
    scores = pd.read_parquet(path)
    lenses = scores.index[(scores["split"] == "test") & (scores["label"] == 1)]
    assert len(lenses) >= 3
    scores.loc[lenses[::3], "flux_ratio"] = 0.05
    others = scores.index[(scores["split"] == "test") & ~scores.index.isin(lenses[::3])]
    scores.loc[others, "flux_ratio"] = scores.loc[others, "flux_ratio"].clip(lower=0.1)
    checks = NEW_CHECKS - {"lensing_only_auroc_at_least_gate"}
    try:
        scores.to_parquet(path, index=False)
        meta = _metadata(_report_only(storage, PERMISSIVE), "bologna_report")
        held, fnr = meta["heldout_auroc"], meta["fnr_flux_ratio_lt_0.1"]
        assert not np.isnan(held) and 0.0 <= fnr <= 1.0
        at = _report_only(storage, {**PERMISSIVE, "min_heldout_auroc": held, "max_fnr_flux_ratio_lt_0_1": fnr})
        assert _checks(at, checks) == dict.fromkeys(checks, True)
        beyond = _report_only(storage, {**PERMISSIVE, "min_heldout_auroc": float(np.nextafter(held, 2)),
                                        "max_fnr_flux_ratio_lt_0_1": max(float(np.nextafter(fnr, -1)), 0.0)})
        expected = {"heldout_auroc_at_least_gate": False, "fnr_flux_ratio_lt_0_1_at_most_gate": fnr == 0.0}
        assert _checks(beyond, checks) == expected  # an FNR of 0 cannot be beaten: that gate still passes
    finally:
        path.write_bytes(original)


def test_lensing_only_pairs_give_the_auroc_and_win_rate_of_lenses_over_their_twins(graph_copy):
    storage, _ = graph_copy
    path = storage.path("scores", SURVEY, "ensemble_logits.parquet")
    original = path.read_bytes()
    scores = pd.read_parquet(path)
    test = scores[scores["split"] == "test"]
    rng = np.random.default_rng(0)
    n = 30
    lens_logit, twin_logit = rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)
    pairs = pd.concat([test.iloc[:1]] * (2 * n), ignore_index=True).assign(
        objid=[f"pair-{i}-{m}" for m in ("lens", "twin") for i in range(n)], split="lensing_only",
        sim_family="lensing_only", pair_id=[f"p{i}" for _ in range(2) for i in range(n)],
        label=np.repeat([1, 0], n), logit=np.r_[lens_logit, twin_logit], flux_ratio=-1.0)
    try:
        kept = scores[scores["split"] != "lensing_only"].assign(pair_id="")  # only the synthetic pairs
        pd.concat([kept, pairs], ignore_index=True).to_parquet(path, index=False)
        run = _report_only(storage, {**PERMISSIVE, "min_lensing_only_auroc": 0.5})
        meta = _metadata(run, "bologna_report")
        assert meta["lensing_only_auroc"] == pytest.approx(roc_auc_score(np.repeat([1, 0], n),
                                                                         np.r_[lens_logit, twin_logit]))
        assert meta["lensing_only_win_rate"] == pytest.approx(np.mean(lens_logit > twin_logit))
        assert meta["n_lensing_only_pairs"] == n
        assert meta["auroc"] == pytest.approx(roc_auc_score(test["label"], test["logit"]))  # test split unchanged
        row = next(line for line in meta["summary"].splitlines() if line.startswith("| lensing-only AUROC"))
        assert f"{meta['lensing_only_auroc']:.3f} [" in row and f"{n} pairs" in row
        assert _checks(run, {"lensing_only_auroc_at_least_gate"}) == {"lensing_only_auroc_at_least_gate": True}
        strict = _report_only(storage, {**PERMISSIVE, "min_lensing_only_auroc": 1.0})
        assert _checks(strict, {"lensing_only_auroc_at_least_gate"}) == {"lensing_only_auroc_at_least_gate": False}
    finally:
        path.write_bytes(original)


def test_report_without_a_shortcut_audit_says_not_run(graph_copy):
    storage, _ = graph_copy
    path = storage.path("reports", SURVEY, "shortcut", "shortcut.json")
    original = path.read_bytes()
    try:
        path.unlink()
        meta = _metadata(_report_only(storage, PERMISSIVE), "bologna_report")
        assert np.isnan(meta["shortcut_auroc"])
        assert ("| shortcut AUROC (lensing-agnostic statistics) | not run (materialize shortcut_audit)"
                in meta["summary"])
    finally:
        path.write_bytes(original)


def test_shortcut_audit_without_splits_is_a_clear_failure(storage):
    from lens_assets.assets.evaluation import shortcut_audit

    with pytest.raises(dg.Failure, match=rf"dataset_splits.parquet does not exist: materialize dataset_splits for "
                                         rf"{SURVEY} first"):
        dg.materialize([shortcut_audit], partition_key=SURVEY, resources={"storage": storage},
                       instance=dg.DagsterInstance.ephemeral())


def test_the_shortcut_figure_without_twins_says_why_it_is_missing():
    from lens_assets.assets.evaluation import without_twins_cell

    assert without_twins_cell(0.61234, "") == "0.612"
    assert without_twins_cell(float("nan"), "") == "undefined"
    assert without_twins_cell(float("nan"), "not trained: 3 lenses and 2 non-lenses") == "not trained"


def test_lensing_only_pairs_are_reported_by_their_lens_einstein_radius():
    """The pairs' AUROC per θE bin in the figures, the summary table and the page, recomputed with sklearn."""
    from lens_assets.assets.evaluation import report_figures, report_markdown, summary_table
    from lens_assets.science.metrics import THETA_E_BINS

    rng = np.random.default_rng(3)
    n_test, n_pairs = 40, 50
    theta_e = rng.uniform(0.4, 1.9, n_pairs)  # no pair reaches the >= 2" bin
    lens_logit = rng.normal(size=n_pairs) + 2.0 * (theta_e < 1.2)
    twin_logit = rng.normal(size=n_pairs)
    test = pd.DataFrame({"split": "test", "label": np.tile([1, 0], n_test // 2), "logit": rng.normal(size=n_test),
                         "pair_id": "", "theta_e": -1.0})
    pairs = pd.DataFrame({"split": "lensing_only", "label": np.tile([1, 0], n_pairs),
                          "logit": np.column_stack([lens_logit, twin_logit]).ravel(),
                          "pair_id": np.repeat([f"p{i}" for i in range(n_pairs)], 2),
                          "theta_e": np.column_stack([theta_e, np.full(n_pairs, -1.0)]).ravel()})
    scores = pd.concat([test, pairs], ignore_index=True)
    scores["probability"] = 1 / (1 + np.exp(-scores["logit"]))
    scores["flux_ratio"], scores["arc_snr"], scores["sim_family"] = -1.0, -1.0, ""
    lo = report_figures(scores, heldout_families=())["lensing_only"]
    for name, low, high in THETA_E_BINS + (("lt_1.2", 0.0, 1.2), ("ge_1.2", 1.2, np.inf)):
        m = (theta_e >= low) & (theta_e < high)
        assert lo[f"n_pairs_theta_e_{name}"] == m.sum(), name
        if m.any():
            want = roc_auc_score(np.r_[np.ones(m.sum()), np.zeros(m.sum())], np.r_[lens_logit[m], twin_logit[m]])
            assert lo[f"auroc_theta_e_{name}"] == pytest.approx(want), name
        else:
            assert np.isnan(lo[f"auroc_theta_e_{name}"]), name
    figures = report_figures(scores, heldout_families=())
    table = summary_table(figures, None)
    small = (theta_e < 1.2).sum()
    assert f"| lensing-only AUROC, pairs of θE < 1.2″ | {lo['auroc_theta_e_lt_1.2']:.3f} ({small} pairs) |" in table
    assert f"| lensing-only AUROC, pairs of θE ≥ 1.2″ | {lo['auroc_theta_e_ge_1.2']:.3f} ({n_pairs - small} pairs) |" \
        in table
    md = report_markdown(SURVEY, figures, {"calibrator": {"method": "isotonic"}, "fusion": {"method": "mean"},
                                           "members": [{"name": "m"}], "n_val": 10})
    assert "## Lensing-only AUROC by Einstein radius" in md
    no_truth = report_figures(scores.drop(columns="theta_e"), heldout_families=())  # nothing to split the pairs by
    assert "n_pairs_theta_e_lt_1.2" not in no_truth["lensing_only"]
    assert "pairs of θE" not in summary_table(no_truth, None)
    assert "| ≥ 2 | no objects | 0 |" in md and "nan" not in md.split("## Lensing-only AUROC by Einstein radius")[1]


def test_rows_held_out_by_their_simrole_alone_are_scored_under_their_family(tmp_path):
    """A held-out drop under a family name no config lists (SIMROLE heldout) and pairs of another name (SIMROLE
    pairs) are scored as held-out rows and as pairs; training-role rows outside the splits and unlabeled rows are
    not; a catalog without sim_role scores by family name alone."""
    from lens_assets import layout
    from lens_assets.assets.evaluation import _rows_to_score
    from lens_assets.resources.storage import LocalStorage

    storage = LocalStorage(root=str(tmp_path))
    ids = [f"o{i}" for i in range(9)]
    catalog = pd.DataFrame({
        "objid": ids, "label": [0, 1, 1, 0, 1, 0, 1, 0, -1],
        "sim_family": ["physical", "physical", "heldout", "heldout", "renamed", "renamed", "twins_b", "twins_b",
                       "renamed"],
        "sim_role": ["train", "train", "heldout", "heldout", "heldout", "heldout", "pairs", "pairs", "heldout"],
        "sim_kind": "", "pair_id": ["", "", "", "", "", "", "p1", "p1", ""], "source_file": ids,
        "source_sha256": "0" * 64})
    storage.write_parquet(catalog, *layout.catalog_table("des"))
    storage.write_parquet(pd.DataFrame({"objid": ids}), *layout.shards_rows("des"))
    storage.write_parquet(pd.DataFrame({"objid": ["o0", "o1"], "split": ["test", "test"], "sky_group": [0, 1],
                                        "val_role": ["", ""]}), *layout.splits_table("des"))
    rows = _rows_to_score(storage, "des", ["heldout"])
    assert dict(zip(rows["objid"], rows["split"])) == {"o0": "test", "o1": "test", "o2": "heldout",
                                                        "o3": "heldout", "o4": "heldout", "o5": "heldout",
                                                        "o6": "lensing_only", "o7": "lensing_only"}
    assert rows.set_index("objid").loc[["o4", "o5"], "sim_family"].tolist() == ["renamed", "renamed"]
    assert "sim_role" not in rows
    storage.write_parquet(catalog.drop(columns="sim_role"), *layout.catalog_table("des"))
    assert sorted(_rows_to_score(storage, "des", ["heldout"])["objid"]) == ["o0", "o1", "o2", "o3"]
