import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from lens_assets.definitions import defs
from lens_assets.science.surveys import SURVEY_NAMES

REPO = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {"simulated_cutouts", "cutout_catalog", "psf_matched_shards", "dataset_splits", "lens_classifier",
                 "score_calibrator", "bologna_report", "candidate_scores"}


def test_definitions_load_with_the_contract_asset_keys_groups_and_owners():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert CONTRACT_KEYS <= keys
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    assert specs["simulated_cutouts"].group_name == "simulation"
    assert specs["cutout_catalog"].group_name == "ingestion"
    assert specs["psf_matched_shards"].group_name == specs["dataset_splits"].group_name == "datasets"
    assert specs["lens_classifier"].group_name == "training"
    assert specs["score_calibrator"].group_name == specs["bologna_report"].group_name == "evaluation"
    assert specs["candidate_scores"].group_name == "scoring"
    for key in CONTRACT_KEYS - {"candidate_scores"}:
        spec = specs[key]
        assert spec.owners == ["team:lens-finding"]
        assert spec.kinds and "python" in spec.kinds
        assert spec.description and len(spec.description.splitlines()[0]) > 20
        assert spec.partitions_def.get_partition_keys() == list(SURVEY_NAMES)
        assert spec.code_version
    assert dg.AssetKey("simulated_cutouts") in {d.asset_key for d in specs["cutout_catalog"].deps}
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"catalog_matches_schema", "every_file_accounted_for", "label_balance_and_provenance",
                      "matched_fwhm_within_3pct", "label_fractions_agree", "no_objid_in_two_splits",
                      "no_sky_group_across_splits", "val_halves_hold_both_labels", "auroc_at_least_gate",
                      "tpr10_at_least_gate", "ece_at_most_gate", "heldout_auroc_at_least_gate",
                      "lensing_only_auroc_at_least_gate",
                      "fnr_flux_ratio_lt_0_1_at_most_gate", "shortcut_auroc_at_most_gate",
                      "cluster_auroc_at_least_gate", "cluster_heldout_auroc_at_least_gate",
                      "cluster_tpr_at_fpr_0_1_at_least_gate", "every_model_on_every_set"}
    # a cluster drop is scored by the model the cluster report vetted, never by one that failed its gates
    assert specs["cluster_candidates"].group_name == "scoring"
    assert {d.asset_key for d in specs["cluster_candidates"].deps} == {dg.AssetKey("cluster_report")}
    assert specs["shortcut_audit"].group_name == "evaluation"
    assert {d.asset_key for d in specs["shortcut_audit"].deps} == {dg.AssetKey("psf_matched_shards"),
                                                                   dg.AssetKey("dataset_splits")}  # not the model
    assert dg.AssetKey("shortcut_audit") in {d.asset_key for d in specs["bologna_report"].deps}
    assert dg.AssetKey("psf_matched_shards") in {d.asset_key for d in specs["dataset_splits"].deps}
    assert defs.resolve_job_def("survey_pipeline").partitions_def.get_partition_keys() == list(SURVEY_NAMES)
    scoring = specs["candidate_scores"]
    assert scoring.owners == ["team:lens-finding"] and scoring.code_version and "python" in scoring.kinds
    assert isinstance(scoring.partitions_def, dg.MultiPartitionsDefinition)
    assert {d.name for d in scoring.partitions_def.partitions_defs} == {"drop", "survey"}
    assert {d.asset_key for d in scoring.deps} == {dg.AssetKey("promoted_model")}  # only a vetted model scores
    assert specs["promoted_model"].group_name == "release"
    assert {d.asset_key for d in specs["promoted_model"].deps} == {dg.AssetKey("bologna_report")}
    assert scoring.automation_condition is not None
    assert defs.resolve_sensor_def("survey_inbox_sensor") and defs.resolve_schedule_def("rescore_nightly")


def test_dagster_definitions_validate_passes(tmp_path):
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path))
    exe = Path(sys.executable).parent / "dagster"
    out = subprocess.run([str(exe), "definitions", "validate", "-w", "workspace.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lens_assets" in out.stdout + out.stderr


def test_the_embedded_instance_retries_crashed_runs_monitors_workers_and_bounds_every_runtime(tmp_path):
    """dagster.yaml (the file `make` copies into DAGSTER_HOME) as Dagster reads it."""
    import shutil

    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        # a failed release gate or a bad input must not re-run the whole graph: steps retry by their own policy
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds == 12 * 3600
    finally:
        instance.dispose()


def test_training_and_scoring_steps_retry_and_training_runs_carry_a_max_runtime():
    from lens_assets.definitions import MAX_PIPELINE_RUNTIME_S, MAX_TRAINING_RUNTIME_S

    graph = defs.resolve_asset_graph()
    for key, retries in (("lens_classifier", 1), ("candidate_scores", 2)):
        policy = graph.get(dg.AssetKey(key)).assets_def.op.retry_policy
        assert policy is not None and policy.max_retries == retries, key
    assert defs.resolve_job_def("survey_pipeline").tags["dagster/max_runtime"] == str(MAX_PIPELINE_RUNTIME_S)
    train = defs.resolve_job_def("train_ensemble")
    assert train.tags["dagster/max_runtime"] == str(MAX_TRAINING_RUNTIME_S)
    assert {k.to_user_string() for k in train.asset_layer.executable_asset_keys} == {"lens_classifier"}
