"""The vetted cluster model: what ``cluster_report`` makes the survey's scoring model survives retrains and failed
gates, and records the settings and features the model was trained on.

``cluster_classifier`` trains in a few seconds on a synthetic features table (the
real feature names, labels from colour consistency and tangential alignment,
splits by row); ``settings.json`` is written by hand as ``arc_segments`` writes it,
and ``cluster_fusion`` fuses Track A's components alone (Track B's score files are
written empty) into the table the report reads. The drop is two simulated fields
(test_cluster_scoring.py's family).
"""

import json
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from lens_assets import layout
from lens_assets.assets.cluster_scoring import CLUSTER_SCORING_ASSETS
from lens_assets.assets.clusters import CLUSTER_ASSETS, cluster_classifier, cluster_fusion, cluster_report
from lens_assets.cluster_registry import load_cluster_manifest, load_cluster_model
from lens_assets.inbox import cluster_candidate_table, simulate_cluster_drop
from lens_assets.partitions import scoring_key
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.clusters.models import SCORE_COLUMNS
from lens_assets.science.fileio import sha256_file
from lens_assets_tests.assets.test_cluster_scoring import FIELD_PX, small_family

SURVEY = "des"
TRAINED_SETTINGS = {"field_size_px": FIELD_PX, "light": "median", "nsigma": 2.0, "code_version": "cluster-1"}
PASSING = {"min_auroc": 0.0, "min_heldout_auroc": 0.0, "min_tpr_at_fpr_0_1": 0.0}


def features_table(seed: int, n: int = 200) -> pd.DataFrame:
    """A cluster_features table: every feature, truth columns and splits (train, val stop/calibrate, test and a
    held-out family), each part with lenses and non-lenses."""
    from lens_assets.science.clusters.features import cluster_feature_names
    from lens_assets.science.surveys import get_survey

    rng = np.random.default_rng(seed)
    names = cluster_feature_names(get_survey(SURVEY).band_names)
    t = pd.DataFrame(rng.normal(size=(n, len(names))), columns=names)
    t["n_segments"] = rng.integers(0, 20, n)
    t["colour_consistency"] = rng.uniform(0, 1, n)
    t["tangential_alignment"] = rng.uniform(-1, 1, n)
    label = (t["colour_consistency"] + 0.5 * t["tangential_alignment"] + rng.normal(0, 0.3, n) > 0.5).astype(int)
    part = np.arange(n) % 10
    split = np.select([part < 6, part < 8, part == 8], ["train", "val", "test"], "heldout")
    t = t.assign(objid=[f"f{i}" for i in range(n)], survey=SURVEY, label=label, split=split,
                 val_role=np.select([part == 6, part == 7], ["stop", "calibrate"], ""),
                 sim_family=np.where(part == 9, "cluster_heldout", "cluster"), sim_kind="x", theta_e=1.0,
                 n_arcs=label, arc_sb=np.where(label == 1, 24.0, 99.0), group=False, source_file="x",
                 source_sha256="0")
    for name in ("train", "val", "test", "heldout"):
        assert t.loc[t["split"] == name, "label"].nunique() == 2
    return t


def train(storage, instance, seed: int) -> dict:
    """cluster_classifier on a fresh features table (seed) with cluster_features' copy of the settings as given."""
    storage.write_parquet(features_table(seed), *layout.cluster_features_table(SURVEY))
    others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not cluster_classifier]
    result = dg.materialize([cluster_classifier, *others], partition_key=SURVEY, resources={"storage": storage},
                            instance=instance, run_config={"ops": {"cluster_classifier": {"config": {
                                "n_estimators": 20, "pu_labeled": [], "seed": seed}}}})
    # the report's table from cluster_fusion over Track A's components, without Track B (its files empty)
    for parts in (layout.cluster_track_b_scores(SURVEY), layout.cluster_track_b_val_scores(SURVEY)):
        storage.write_parquet(pd.DataFrame(columns=list(SCORE_COLUMNS)), *parts)
    others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not cluster_fusion]
    dg.materialize([cluster_fusion, *others], partition_key=SURVEY, resources={"storage": storage},
                   instance=instance, run_config={"ops": {"cluster_fusion": {"config": {
                       "max_fpr": 0.5, "components": ["track_a", "colour_consistency", "anomaly"]}}}})
    return result


def report(storage, instance, **gates):
    others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not cluster_report]
    return dg.materialize([cluster_report, *others], partition_key=SURVEY, resources={"storage": storage},
                          instance=instance, raise_on_error=False,
                          run_config={"ops": {"cluster_report": {"config": {**PASSING, **gates}}}})


def score(storage, instance, drop: str):
    instance.add_dynamic_partitions("drops", [drop])
    return dg.materialize(CLUSTER_SCORING_ASSETS, partition_key=str(scoring_key(SURVEY, drop)),
                          resources={"storage": storage}, instance=instance,
                          run_config={"ops": {"cluster_candidates": {"config": {"workers": 1, "gallery_size": 0}}}})


def copy_of(storage: LocalStorage, dest) -> LocalStorage:
    """The storage copied (a test that changes it leaves the module's fixture as it was)."""
    shutil.copytree(storage.root_path, dest)
    return LocalStorage(root=str(dest))


def data_version(result, node: str) -> str:
    (mat,) = result.asset_materializations_for_node(node)
    return mat.tags["dagster/data_version"]


@pytest.fixture(scope="module")
def vetted(tmp_path_factory):
    """Trained (seed 0) and vetted; then arc_segments and cluster_features re-materialized with other settings."""
    tmp = tmp_path_factory.mktemp("vetting")
    storage = LocalStorage(root=str(tmp / "root"))
    instance = dg.DagsterInstance.ephemeral()
    storage.write_text(json.dumps(TRAINED_SETTINGS), *layout.cluster_features_settings(SURVEY))
    first = train(storage, instance, seed=0)
    trained_features = sha256_file(storage.path(*layout.cluster_features_table(SURVEY)))
    # after training: arc_segments with another light removal, threshold and grid, and new features
    for parts in (layout.cluster_segments_settings(SURVEY), layout.cluster_features_settings(SURVEY)):
        storage.write_text(json.dumps({"field_size_px": 200, "light": "model", "nsigma": 3.0,
                                       "code_version": "cluster-1"}), *parts)
    storage.write_parquet(features_table(7), *layout.cluster_features_table(SURVEY))
    passed = report(storage, instance)
    assert passed.success
    simulate_cluster_drop(storage, SURVEY, "night-1", n=2, seed=5, family=small_family(tmp), workers=1)
    return storage, instance, first, passed, trained_features, tmp


def test_the_manifest_records_the_settings_and_features_the_model_was_trained_with(vetted):
    storage, _, _, _, trained_features, _ = vetted
    manifest = load_cluster_manifest(storage, SURVEY)
    assert {k: manifest[k] for k in TRAINED_SETTINGS} == TRAINED_SETTINGS  # not arc_segments' later settings
    assert manifest["features_sha256"] == trained_features
    assert manifest["features_sha256"] != sha256_file(storage.path(*layout.cluster_features_table(SURVEY)))
    training = json.loads(storage.path(*layout.cluster_training_doc(SURVEY)).read_text())
    assert training["segments"] == TRAINED_SETTINGS and training["features_sha256"] == trained_features
    assert training["files"]["clusters/models/des/track_a.json"] == manifest["model_sha256"]


def test_the_manifest_points_at_vetted_copies(vetted):
    storage, _, _, passed, _, _ = vetted
    manifest = load_cluster_manifest(storage, SURVEY)
    folder = layout.relative(layout.cluster_vetted_dir(SURVEY, manifest["version"]))
    assert folder == f"clusters/models/des/vetted/{manifest['version']}"
    assert manifest["model_file"] == f"{folder}/track_a.json"
    assert manifest["model_meta_file"] == f"{folder}/track_a.meta.json"
    assert manifest["calibrator_file"] == f"{folder}/track_a.calibrator.json"
    assert manifest["trained_model_file"] == "clusters/models/des/track_a.json"
    for key, trained in (("model", layout.cluster_model_file(SURVEY, "track_a")),
                         ("calibrator", layout.cluster_calibrator_file(SURVEY, "track_a"))):
        copy = storage.path(*manifest[f"{key}_file"].split("/"))
        assert copy.read_bytes() == storage.path(*trained).read_bytes()
        assert sha256_file(copy) == manifest[f"{key}_sha256"]
    (mat,) = passed.asset_materializations_for_node("cluster_report")
    assert mat.metadata["cluster_model_version"].value == manifest["version"]


def test_a_retrain_that_fails_a_gate_leaves_drops_scored_by_the_previous_vetted_model(vetted, tmp_path):
    from lens_assets.science.clusters.catalog import process_fields
    from lens_assets.science.clusters.scoring import field_features
    from lens_assets.science.clusters.track_a import TrackAModel
    from lens_assets.science.ingest import find_fits, relative_names
    from lens_assets.science.surveys import get_survey

    shared, _, first, passed, _, _ = vetted
    storage, instance = copy_of(shared, tmp_path / "root"), dg.DagsterInstance.ephemeral()
    manifest = load_cluster_manifest(storage, SURVEY)
    _, old_model, _ = load_cluster_model(storage, SURVEY)
    # a retrain rewrites track_a.json, its sidecar and its calibrator in place ...
    second = train(storage, instance, seed=1)
    assert sha256_file(storage.path(*layout.cluster_model_file(SURVEY, "track_a"))) != manifest["model_sha256"]
    assert data_version(second, "cluster_classifier") != data_version(first, "cluster_classifier")
    # ... and fails a gate: the manifest, and the files it names, are the previous vetted model's
    failed = report(storage, instance, min_auroc=1.0)
    assert not failed.success
    assert load_cluster_manifest(storage, SURVEY) == manifest
    assert data_version(failed, "cluster_report") != data_version(passed, "cluster_report")
    doc, model, _ = load_cluster_model(storage, SURVEY)
    assert doc == manifest
    result = score(storage, instance, "night-1")
    table = cluster_candidate_table(storage, SURVEY, "night-1")
    assert len(table) == 2 and set(table["model_version"]) == {manifest["model_sha256"][:16]}
    (mat,) = result.asset_materializations_for_node("cluster_candidates")
    assert mat.metadata["cluster_model_version"].value == manifest["version"]
    assert mat.metadata["field_size_px"].value == FIELD_PX and mat.metadata["light"].value == "median"
    # the logits are the vetted model's, not the retrained one's
    survey = get_survey(SURVEY)
    paths, names = relative_names(find_fits(storage.path(*layout.inbox_drop(SURVEY, "night-1"))), storage.root_path)
    fields, segments, _ = process_fields(paths, names, survey, size_px=FIELD_PX, light="median", nsigma=2.0,
                                         workers=1, progress=False)
    feats = field_features(fields, segments, bands=survey.band_names,
                           wavelengths_nm=[b.wavelength_nm for b in survey.bands]).set_index("objid")
    feats = feats.loc[table["objid"]]
    np.testing.assert_allclose(table["logit"], old_model.logit(feats), rtol=0, atol=1e-9)
    retrained = TrackAModel.load(storage.path(*layout.cluster_model_file(SURVEY, "track_a")))
    assert not np.allclose(table["logit"], retrained.logit(feats))


def test_a_training_record_that_does_not_match_the_model_files_is_refused(vetted, tmp_path):
    storage, instance = copy_of(vetted[0], tmp_path / "root"), dg.DagsterInstance.ephemeral()
    before = load_cluster_manifest(storage, SURVEY)
    path = storage.path(*layout.cluster_training_doc(SURVEY))
    doc = json.loads(path.read_text())
    # as if a retrain were still writing its files: the model is the judged one, its calibrator not yet
    doc["files"]["clusters/models/des/track_a.calibrator.json"] = "0" * 64
    path.write_text(json.dumps(doc))
    result = report(storage, instance)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "clusters/models/des/track_a.calibrator.json: sha256" in failure.event_specific_data.error.message
    assert "differs from 0000000000000000 in clusters/models/des/training.json" in \
        failure.event_specific_data.error.message
    assert load_cluster_manifest(storage, SURVEY) == before
    path.unlink()
    result = report(storage, instance)
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "clusters/models/des/training.json does not exist" in failure.event_specific_data.error.message


def test_the_report_vets_only_the_model_whose_scores_it_judged(vetted, tmp_path):
    storage, instance, *_ = vetted
    storage = copy_of(storage, tmp_path / "copy")
    before = load_cluster_manifest(storage, SURVEY)
    judged = pd.read_parquet(storage.path(*layout.cluster_report_scores(SURVEY)))
    train(storage, instance, seed=3)  # a retrain, and then the report without the fusion: it holds the old scores
    storage.write_parquet(judged, *layout.cluster_report_scores(SURVEY))
    result = report(storage, instance)
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "the report judged track_a" in failure.event_specific_data.error.message
    assert load_cluster_manifest(storage, SURVEY) == before


def test_a_report_missing_a_model_the_fusion_combined_fails_and_vets_nothing(vetted, tmp_path):
    storage, instance, *_ = vetted
    storage = copy_of(storage, tmp_path / "copy")
    before = load_cluster_manifest(storage, SURVEY)
    scores = pd.read_parquet(storage.path(*layout.cluster_report_scores(SURVEY)))
    assert {"track_a", "anomaly", "fused"} <= set(scores["model"])
    # the anomaly model's rows lost: the figures of the models left are complete among themselves
    storage.write_parquet(scores[scores["model"] != "anomaly"], *layout.cluster_report_scores(SURVEY))
    result = report(storage, instance)
    (check,) = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                and e.event_specific_data.check_name == "every_model_on_every_set"]
    assert not check.passed
    missing = check.metadata["missing"].value.split(", ")
    assert "anomaly/test" in missing and all(m.startswith("anomaly/") for m in missing)
    assert load_cluster_manifest(storage, SURVEY) == before


def test_cluster_classifier_needs_arc_segments_settings(tmp_path):
    storage = LocalStorage(root=str(tmp_path / "root"))
    storage.write_parquet(features_table(0), *layout.cluster_features_table(SURVEY))
    others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not cluster_classifier]
    with pytest.raises(dg.Failure, match=r"clusters/features/des/segment_settings.json does not exist: "
                                         r"materialize cluster_features"):
        dg.materialize([cluster_classifier, *others], partition_key=SURVEY, resources={"storage": storage},
                       instance=dg.DagsterInstance.ephemeral())
