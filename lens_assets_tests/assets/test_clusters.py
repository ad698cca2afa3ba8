"""materialize() of the cluster track on tiny DES fields: every file accounted for, typed features, models, report."""

import json

import dagster as dg
import pandas as pd
import pytest

from lens_assets import layout
from lens_assets.assets.clusters import CLUSTER_ASSETS, ClusterReportConfig, arc_segments, cluster_report_checks
from lens_assets.science.clusters.features import cluster_features_schema
from lens_assets.resources.launchers import LocalSubprocessLauncher
from lens_assets.science.fileio import sha256_file
from lens_assets.science.surveys import get_survey
from lens_assets_tests.helpers import CLUSTER_FIELD_ARCSEC, small_cluster_family

FIELD_ARCSEC = CLUSTER_FIELD_ARCSEC  # the family helper's field


_small_family = small_cluster_family  # lens_assets_tests.helpers


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    from lens_assets.resources.storage import LocalStorage

    tmp = tmp_path_factory.mktemp("clusters")
    storage = LocalStorage(root=str(tmp / "root"))
    run_config = {"ops": {
        "cluster_fields": {"config": {"n_fields": 48, "n_heldout": 8, "seed": 2, "workers": 1,
                                      "family": _small_family(tmp, "cluster"),
                                      "heldout_family": _small_family(tmp, "cluster_heldout")}},
        "arc_segments": {"config": {"field_size_arcsec": FIELD_ARCSEC, "workers": 1}},
        "cluster_classifier": {"config": {"pu_labeled": [5, 10], "n_estimators": 60}},
        "cluster_track_b": {"config": {"epochs": 1, "workers": 1, "field_view_epochs": 2}},
        # a handful of val fields: a high FPR leaves the fusion a false positive to work with
        "cluster_fusion": {"config": {"max_fpr": 0.5, "components": ["track_a", "track_b", "field_view", "anomaly"]}},
        # 48 tiny fields: the gates are the subject of their own tests, not of this run
        "cluster_report": {"config": {"min_auroc": 0.0, "min_heldout_auroc": 0.0, "min_tpr_at_fpr_0_1": 0.0}},
    }}
    result = dg.materialize(CLUSTER_ASSETS, partition_key="des",
                            resources={"storage": storage, "launcher": LocalSubprocessLauncher()},
                            run_config=run_config, instance=dg.DagsterInstance.ephemeral(), raise_on_error=True)
    return storage, result


def _metadata(result, key):
    (mat,) = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


def test_fields_are_simulated_into_their_own_folder(cluster_run):
    storage, result = cluster_run
    meta = _metadata(result, "cluster_fields")
    assert meta["n_fields"] == 48 and meta["n_lenses"] + meta["n_nonlenses"] == 48
    files = list(storage.path("clusters", "raw", "des").rglob("*.fits"))
    assert len(files) == 48 + 8
    assert not storage.path("raw", "des").exists()  # never where cutout_catalog ingests galaxy cutouts


def test_every_file_is_a_field_or_quarantined_and_segments_name_their_field(cluster_run):
    storage, result = cluster_run
    meta = _metadata(result, "arc_segments")
    assert meta["n_files"] == meta["n_fields"] + meta["n_quarantined"] == 56
    fields = pd.read_parquet(storage.path("clusters", "segments", "des", "fields.parquet"))
    segments = pd.read_parquet(storage.path("clusters", "segments", "des", "segments.parquet"))
    # each field's file says what it is for: the held-out family's are "heldout", the training family's "train"
    assert fields.groupby("sim_family")["sim_role"].agg(set).to_dict() == {"cluster": {"train"},
                                                                          "cluster_heldout": {"heldout"}}
    assert set(segments["objid"]) <= set(fields["objid"])
    counts = segments.groupby("objid").size().reindex(fields["objid"], fill_value=0)
    assert (counts.to_numpy() == fields["n_segments"].to_numpy()).all()
    # lensed arcs are segments: lenses have more of them than their non-lenses
    per = fields.groupby("label")["n_segments"].mean()
    assert per[1] > per[0]


def test_features_are_typed_and_split_by_field(cluster_run):
    storage, _ = cluster_run
    table = pd.read_parquet(storage.path("clusters", "features", "des", "cluster_features.parquet"))
    schema = cluster_features_schema(get_survey("des").band_names)
    schema.validate(table[list(schema.columns)])
    assert set(table.loc[table["sim_family"] == "cluster_heldout", "split"]) == {"heldout"}
    train = table[table["sim_family"] != "cluster_heldout"]
    assert set(train["split"]) == {"train", "val", "test"}
    assert set(train.loc[train["split"] == "val", "val_role"]) == {"stop", "calibrate"}
    assert table["objid"].is_unique


def test_models_and_report_cover_every_model_and_set(cluster_run):
    storage, result = cluster_run
    scores = pd.read_parquet(storage.path("clusters", "models", "des", "fusion", "scores.parquet"))
    assert set(scores["model"]) == {"track_a", "track_a_no_colour", "pu_5", "pu_10", "anomaly", "track_b",
                                    "field_view", "fused"}
    # every default fusion component is a model with rows of its own, or a feature (what the report's check
    # every_model_on_every_set expects rows of)
    from lens_assets.science.clusters.models import FEATURE_COMPONENTS, FUSION_COMPONENTS

    assert set(FUSION_COMPONENTS) - set(FEATURE_COMPONENTS) <= set(scores["model"])
    assert not set(FEATURE_COMPONENTS) & set(scores["model"])
    # every model scores the same fields
    per_model = scores.groupby("model")["objid"].apply(frozenset)
    assert per_model.nunique() == 1
    assert set(scores["set"]) == {"test", "cluster_heldout"}
    assert scores["prob"].between(0, 1).all()
    report = json.loads(storage.path("reports", "des", "cluster", "report.json").read_text())
    assert set(report) == set(scores["model"])
    test = report["track_a"]["test"]
    assert test["n_lenses"] + test["n_nonlenses"] == int(((scores["model"] == "track_a")
                                                         & (scores["set"] == "test")).sum())
    lo, hi = test["auroc_ci"]
    assert 0.0 <= lo <= hi <= 1.0
    meta = _metadata(result, "cluster_report")
    assert meta["track_a_auroc"] == pytest.approx(test["auroc"])
    assert "cluster_heldout" in storage.path("reports", "des", "cluster", "report.md").read_text()


def test_arc_segments_refuses_an_empty_folder(tmp_path):
    from lens_assets.resources.storage import LocalStorage

    storage = LocalStorage(root=str(tmp_path))
    with pytest.raises(dg.Failure, match="no cluster fields under"):
        dg.materialize([arc_segments], partition_key="des", resources={"storage": storage},
                       instance=dg.DagsterInstance.ephemeral())


def test_report_checks_pass_on_the_run_with_zero_gates(cluster_run):
    _, result = cluster_run
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals == {"cluster_auroc_at_least_gate": True, "cluster_heldout_auroc_at_least_gate": True,
                     "cluster_tpr_at_fpr_0_1_at_least_gate": True, "every_model_on_every_set": True}
    # vetted: the manifest names track_a's files by their hashes and the arc_segments settings drops are read with
    from lens_assets.cluster_registry import load_cluster_model

    storage, _ = cluster_run
    manifest, model, calibrator = load_cluster_model(storage, "des")
    assert manifest["model"] == "track_a" and manifest["light"] == "median" and manifest["nsigma"] == 2.0
    assert manifest["field_size_px"] == _metadata(result, "arc_segments")["field_size_px"]
    assert _metadata(result, "cluster_report")["cluster_model_version"] == manifest["version"]
    # the settings come from arc_segments' settings.json through cluster_features' copy (with the segments' sha256)
    # and cluster_classifier's training.json, and the manifest names copies in vetted/<version>/ (a retrain
    # rewrites track_a.json, not them)
    settings = json.loads(storage.path(*layout.cluster_segments_settings("des")).read_text())
    assert settings == {"field_size_px": manifest["field_size_px"], "light": "median", "nsigma": 2.0,
                        "code_version": "cluster-1"}
    training = json.loads(storage.path(*layout.cluster_training_doc("des")).read_text())
    assert training["segments"] == {**settings, "segments_sha256": sha256_file(
        storage.path(*layout.cluster_segments_table("des")))}
    assert training["features_sha256"] == manifest["features_sha256"] == sha256_file(
        storage.path(*layout.cluster_features_table("des")))
    assert manifest["model_file"].startswith(f"clusters/models/des/vetted/{manifest['version']}/")


def test_data_versions_follow_the_content_each_asset_read_and_wrote(cluster_run):
    """A data version changes when what an asset read or wrote changes (so a retrain shows downstream, see
    test_cluster_vetting for the classifier and report before and after one): here, the segments' version is that
    of the field files on disk, hashed apart from the asset, and the fusion's that of the files it wrote."""
    import hashlib

    from lens_assets.assets._common import sha256_of_strings
    from lens_assets.assets.clusters import CLUSTER_CODE_VERSION, ClusterFusionConfig

    storage, result = cluster_run
    versions = {}
    for node in ("cluster_fields", "arc_segments", "cluster_features", "cluster_classifier", "cluster_fusion",
                 "cluster_report"):
        (mat,) = result.asset_materializations_for_node(node)
        versions[node] = mat.tags.get("dagster/data_version", "")
        assert len(versions[node]) == 16 and int(versions[node], 16) >= 0, node
    assert len(set(versions.values())) == len(versions)
    files = sorted(storage.path(*layout.cluster_raw_survey("des")).rglob("*.fits"))
    assert len(files) == 48 + 8
    on_disk = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    size = _metadata(result, "arc_segments")["field_size_px"]
    assert versions["arc_segments"] == sha256_of_strings(
        [CLUSTER_CODE_VERSION, "median", "2.0", str(size), *on_disk])[:16]
    written = [hashlib.sha256(storage.path(*p).read_bytes()).hexdigest()
               for p in (layout.cluster_fusion_file("des"), layout.cluster_report_scores("des"))]
    config = json.dumps(ClusterFusionConfig(max_fpr=0.5, components=["track_a", "track_b", "field_view",
                                                                     "anomaly"]).model_dump(), sort_keys=True)
    assert versions["cluster_fusion"] == sha256_of_strings([CLUSTER_CODE_VERSION, config, *written])[:16]


def test_drop_scoring_features_equal_the_cluster_features_asset_for_the_same_files(cluster_run):
    """The same FITS files through cluster_candidates' path (process_fields with the manifest's settings, then
    field_features) and through arc_segments + cluster_features: the same feature rows, and the same logits."""
    import numpy as np

    from lens_assets.assets.cluster_scoring import CLUSTER_SCORING_ASSETS
    from lens_assets.cluster_registry import load_cluster_model
    from lens_assets.inbox import cluster_candidate_table, publish_drop
    from lens_assets.partitions import scoring_key
    from lens_assets.science.clusters.catalog import process_fields
    from lens_assets.science.clusters.features import cluster_feature_names
    from lens_assets.science.clusters.scoring import field_features
    from lens_assets.science.ingest import find_fits, relative_names

    storage, _ = cluster_run
    survey = get_survey("des")
    manifest, model, _ = load_cluster_model(storage, "des")
    trained = pd.read_parquet(storage.path(*layout.cluster_features_table("des")))
    picked = trained.groupby("label", group_keys=False).head(3)  # lenses and non-lenses
    publish_drop(storage, "des", "same-fields", [storage.path(f) for f in picked["source_file"]], cluster=True)
    paths, names = relative_names(find_fits(storage.path(*layout.inbox_drop("des", "same-fields"))),
                                  storage.root_path)
    fields, segments, quarantine = process_fields(paths, names, survey, size_px=int(manifest["field_size_px"]),
                                                  light=manifest["light"], nsigma=float(manifest["nsigma"]),
                                                  workers=1, progress=False)
    assert quarantine.empty and sorted(fields["objid"]) == sorted(picked["objid"])
    cols = cluster_feature_names(survey.band_names)
    scored = field_features(fields, segments, bands=survey.band_names,
                            wavelengths_nm=[b.wavelength_nm for b in survey.bands]).set_index("objid")
    expected = trained.set_index("objid").loc[scored.index, cols]
    np.testing.assert_allclose(scored[cols].to_numpy(float), expected.to_numpy(float), rtol=0, atol=1e-9,
                               equal_nan=True)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("drops", ["same-fields"])
        dg.materialize(CLUSTER_SCORING_ASSETS, partition_key=str(scoring_key("des", "same-fields")),
                       resources={"storage": storage}, instance=instance,
                       run_config={"ops": {"cluster_candidates": {"config": {"workers": 1, "gallery_size": 0}}}})
    table = cluster_candidate_table(storage, "des", "same-fields").set_index("objid").loc[expected.index]
    np.testing.assert_allclose(table["logit"], model.logit(expected), rtol=0, atol=1e-9)


def _figs(auroc, tpr, held):
    return {"track_a": {"test": {"auroc": auroc, "tpr_at_fpr_0.1": tpr},
                        **{k: {"auroc": v} for k, v in held.items()}},
            "pu_10": {"test": {"auroc": 0.6}, **{k: {"auroc": 0.6} for k in held}}}


def test_report_gates_compare_the_scoring_model_with_each_threshold():
    config = ClusterReportConfig(min_auroc=0.8, min_heldout_auroc=0.75, min_tpr_at_fpr_0_1=0.5)
    ok = {c.check_name: c.passed for c in cluster_report_checks(_figs(0.8, 0.5, {"h1": 0.75, "h2": 0.9}), config)}
    assert all(ok.values())  # a figure equal to its gate passes
    bad = {c.check_name: c.passed for c in cluster_report_checks(_figs(0.79, 0.49, {"h1": 0.9, "h2": 0.74}), config)}
    assert bad == {"cluster_auroc_at_least_gate": False, "cluster_heldout_auroc_at_least_gate": False,
                   "cluster_tpr_at_fpr_0_1_at_least_gate": False, "every_model_on_every_set": True}
    # the other model's figures do not decide; a missing held-out family or a set without both classes fails
    assert not {c.check_name: c.passed for c in cluster_report_checks(_figs(0.9, 0.9, {}), config)}[
        "cluster_heldout_auroc_at_least_gate"]
    figs = _figs(0.9, 0.9, {"h1": 0.9})
    figs["pu_10"]["h1"] = {"n_lenses": 3, "n_nonlenses": 0}
    (every,) = [c for c in cluster_report_checks(figs, config) if c.check_name == "every_model_on_every_set"]
    assert not every.passed and every.metadata["missing"].value == "pu_10/h1"
    # a model or a set named from outside the scores (the fusion's components, the components table's sets) that
    # has no figures at all fails too; one that has them passes
    def missing(**expected):
        (c,) = [c for c in cluster_report_checks(_figs(0.9, 0.9, {"h1": 0.9}), config, **expected)
                if c.check_name == "every_model_on_every_set"]
        return c.passed, c.metadata["missing"].value

    assert missing(expected_models=("track_a", "pu_10"), expected_sets=("test", "h1")) == (True, "none")
    assert missing(expected_models=("track_a", "track_b")) == (False, "track_b/h1, track_b/test")
    assert missing(expected_sets=("test", "h1", "h2")) == (False, "track_a/h2, pu_10/h2")


def test_a_failed_gate_fails_the_run_and_leaves_the_scoring_model(cluster_run, tmp_path):
    import shutil

    from lens_assets.assets.clusters import cluster_report
    from lens_assets.resources.storage import LocalStorage

    storage, _ = cluster_run
    copy = LocalStorage(root=str(tmp_path / "root"))
    shutil.copytree(storage.path("clusters"), copy.path("clusters"))
    # the scoring model's test logits made perfectly wrong (minus the label): test AUROC 0, below any gate,
    # whatever the trained model scored on these few fields
    path = copy.path(*layout.cluster_report_scores("des"))
    scores = pd.read_parquet(path)
    rows = (scores["model"] == "track_a") & (scores["set"] == "test")
    scores.loc[rows, "logit"] = -scores.loc[rows, "label"].astype(float)
    scores.to_parquet(path, index=False)
    manifest = copy.path("clusters", "models", "des", "manifest.json")
    before = manifest.read_bytes()
    others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not cluster_report]
    result = dg.materialize([cluster_report, *others], partition_key="des", resources={"storage": copy},
                            run_config={"ops": {"cluster_report": {"config": {"min_auroc": 0.6}}}},
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["cluster_auroc_at_least_gate"].passed is False
    assert checks["cluster_auroc_at_least_gate"].metadata["auroc"].value == 0.0
    assert not result.success  # blocking
    assert manifest.read_bytes() == before
    assert _metadata(result, "cluster_report")["cluster_model_version"].startswith("not vetted: "
                                                                                   "cluster_auroc_at_least_gate")


def test_the_fusion_names_a_component_model_that_has_no_scores(cluster_run, tmp_path):
    import shutil

    from lens_assets import layout
    from lens_assets.assets.clusters import cluster_fusion
    from lens_assets.resources.storage import LocalStorage

    storage, _ = cluster_run
    copy = LocalStorage(root=str(tmp_path / "root"))
    shutil.copytree(storage.path("clusters"), copy.path("clusters"))
    for parts in (layout.cluster_track_b_scores("des"), layout.cluster_track_b_val_scores("des")):
        path = copy.path(*parts)  # Track B trained with field_view: false
        frame = pd.read_parquet(path)
        frame[frame["model"] != "field_view"].to_parquet(path, index=False)
    others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not cluster_fusion]
    with pytest.raises(dg.Failure, match="component 'field_view' has no scores .* with field_view: true"):
        dg.materialize([cluster_fusion, *others], partition_key="des", resources={"storage": copy},
                       instance=dg.DagsterInstance.ephemeral())
    # without it among the components, the same tables fuse
    result = dg.materialize([cluster_fusion, *others], partition_key="des", resources={"storage": copy},
                            run_config={"ops": {"cluster_fusion": {"config": {
                                "max_fpr": 0.5, "components": ["track_a", "track_b", "anomaly"]}}}},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success and "field_view" not in _metadata(result, "cluster_fusion")["weights"]
