"""materialize() of cluster_track_b on tiny DES cluster fields: the Pipes job (LocalSubprocessLauncher) trains one
epoch, writes the checkpoint, the scores in Track A's format (with a PU model's rows), the val scores and the
attention weights, and the checkpoint scores the same logits when reloaded; cluster_fusion fuses Track B's own rows
when its scores file holds PU rows too."""


import dagster as dg
import numpy as np
import pandas as pd
import pytest

from lens_assets import layout
from lens_assets.assets.cluster_track_b import CLUSTER_TRACK_B_ASSETS, cluster_track_b
from lens_assets.assets.clusters import arc_segments, cluster_features, cluster_fields, cluster_fusion
from lens_assets.resources.launchers import LocalSubprocessLauncher
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file
from lens_assets_tests.helpers import CLUSTER_FIELD_ARCSEC, small_cluster_family

FIELD_ARCSEC = CLUSTER_FIELD_ARCSEC  # the family helper's field
SLOW = pytest.mark.slow  # one Pipes training job of its own, on fields simulated for it
SCORE_COLUMNS = ["model", "set", "objid", "label", "sim_family", "sim_kind", "theta_e", "n_arcs", "arc_sb", "logit",
                 "prob"]


_small_family = small_cluster_family  # lens_assets_tests.helpers


@pytest.fixture(scope="module")
def track_b_run(tmp_path_factory):
    """16 + 4 held-out fields (seed 2: train, val/stop, test and held-out rows hold both labels; the one
    val/calibrate field is a lens, so the probabilities are sigmoid(logit)) and one epoch of Track B, with a PU
    model from 2 labeled lenses (and one from 1000, skipped)."""
    tmp = tmp_path_factory.mktemp("track_b")
    storage = LocalStorage(root=str(tmp / "root"))
    run_config = {"ops": {
        "cluster_fields": {"config": {"n_fields": 16, "n_heldout": 4, "seed": 2, "workers": 1,
                                      "family": _small_family(tmp, "cluster"),
                                      "heldout_family": _small_family(tmp, "cluster_heldout")}},
        "arc_segments": {"config": {"field_size_arcsec": FIELD_ARCSEC, "workers": 1}},
        "cluster_track_b": {"config": {"epochs": 1, "batch_size": 8, "stamp_px": 24, "max_instances": 6,
                                       "workers": 1, "n_shown": 2, "pu_labeled": [2, 1000],
                                       "field_view_epochs": 2}},
    }}
    # a launcher that does not share the disk, as the deployment's EcsLauncher: Track B trains in a subprocess of
    # the run (were it handed to this launcher, its remote entry point would refuse the MIL module)
    result = dg.materialize([cluster_fields, arc_segments, cluster_features, *CLUSTER_TRACK_B_ASSETS],
                            partition_key="des", run_config=run_config, instance=dg.DagsterInstance.ephemeral(),
                            resources={"storage": storage,
                                       "launcher": LocalSubprocessLauncher(shares_filesystem=False)},
                            raise_on_error=True)
    (mat,) = result.asset_materializations_for_node("cluster_track_b")
    return storage, {k: v.value for k, v in mat.metadata.items()}


@SLOW
def test_the_job_writes_checkpoint_scores_and_attention_and_reports_its_figures(track_b_run):
    storage, meta = track_b_run
    for parts in (layout.cluster_track_b_bags("des"), layout.cluster_track_b_checkpoint("des"),
                  layout.cluster_track_b_scores("des"), layout.cluster_track_b_val_scores("des"),
                  layout.cluster_track_b_attention("des"), layout.cluster_track_b_gallery("des")):
        assert storage.path(*parts).is_file(), parts
    assert meta["epochs_run"] == 1 and meta["precision"] in ("bf16-mixed", "32-true") and meta["device"] == "cpu"
    assert 0.0 <= meta["best_val_auroc"] <= 1.0 and 0.0 <= meta["test_auroc"] <= 1.0
    assert meta["train_img_per_s"] > 0 and "heldout_cluster_heldout_auroc" in meta
    assert meta["attention_gallery"].startswith("![") and meta["bags_reused"] is False
    # the val/calibrate rows hold lenses only: no calibrator, the probability is the logit's sigmoid
    assert meta["calibration"].startswith("sigmoid(logit)")
    assert not storage.path(*layout.cluster_track_b_calibrator("des")).exists()
    # the PU model: its label frequency and labeled count; the size above the training lenses skipped, noted
    (name,) = meta["pu_label_frequency"]
    assert name == "pu_b_2" and 0.0 < meta["pu_label_frequency"][name]["c"] <= 1.0
    assert meta["pu_label_frequency"][name]["n_labeled"] == 2
    assert "pu_b_1000: skipped, the training split has" in meta["notes"]
    assert storage.path(*layout.cluster_track_b_dir("des"), "pu_b_2.ckpt").is_file()
    # the field-view model: 40" fields at 1"/px, its checkpoint beside Track B's, the one its sha names
    assert meta["field_view_overview_px"] == round(FIELD_ARCSEC) and 0.0 <= meta["field_view_test_auroc"] <= 1.0
    view = storage.path(*layout.cluster_field_view_checkpoint("des"))
    assert meta["field_view_sha256"] == sha256_file(view)


@SLOW
def test_scores_have_track_a_format_and_cover_the_test_and_held_out_fields(track_b_run):
    storage, _ = track_b_run
    features = pd.read_parquet(storage.path(*layout.cluster_features_table("des")))
    scores = pd.read_parquet(storage.path(*layout.cluster_track_b_scores("des")))
    val = pd.read_parquet(storage.path(*layout.cluster_track_b_val_scores("des")))
    assert list(scores.columns) == SCORE_COLUMNS and list(val.columns) == SCORE_COLUMNS
    assert set(scores["model"]) == {"track_b", "pu_b_2", "field_view"}
    assert set(val["model"]) == {"track_b", "field_view"}  # the fusion is fit on both models' val rows
    pu = scores[scores["model"] == "pu_b_2"].reset_index(drop=True)
    view = scores[scores["model"] == "field_view"].reset_index(drop=True)
    view_val = val[val["model"] == "field_view"].reset_index(drop=True)
    val = val[val["model"] == "track_b"].reset_index(drop=True)
    scores = scores[scores["model"] == "track_b"].reset_index(drop=True)
    assert pu["objid"].tolist() == scores["objid"].tolist() and pu["prob"].between(0, 1).all()
    assert view["objid"].tolist() == scores["objid"].tolist() and view["set"].tolist() == scores["set"].tolist()
    assert view_val["objid"].tolist() == val["objid"].tolist() and view["prob"].between(0, 1).all()
    assert not np.allclose(view["logit"], scores["logit"])  # another network, not a copy of Track B's
    assert set(scores["set"]) == {"test", "cluster_heldout"}
    assert set(val["set"]) == {"val_stop", "val_calibrate"}
    assert sorted(scores["objid"]) == sorted(features.loc[features["split"].isin(["test", "heldout"]), "objid"])
    assert sorted(val["objid"]) == sorted(features.loc[features["split"] == "val", "objid"])
    roles = features.set_index("objid")["val_role"]
    assert (val["set"] == "val_" + roles.loc[val["objid"]].to_numpy()).all()
    np.testing.assert_allclose(scores["prob"], 1 / (1 + np.exp(-scores["logit"])), rtol=1e-12)


def test_a_field_view_coarser_than_8_px_is_refused_before_any_bag_is_cut(track_b_run, tmp_path):
    import shutil

    storage, _ = track_b_run
    copy = LocalStorage(root=str(tmp_path / "root"))
    shutil.copytree(storage.path("clusters"), copy.path("clusters"))
    copy.path(*layout.cluster_track_b_bags("des")).unlink()
    others = [a.to_source_asset() for a in (cluster_fields, arc_segments, cluster_features)]
    with pytest.raises(dg.Failure, match=r"field_view_arcsec_per_px 5.0 makes a .* overview of 6 px; it needs at "
                                         r"least 8"):
        dg.materialize([cluster_track_b, *others], partition_key="des", instance=dg.DagsterInstance.ephemeral(),
                       resources={"storage": copy, "launcher": LocalSubprocessLauncher()},
                       run_config={"ops": {"cluster_track_b": {"config": {"field_view_arcsec_per_px": 5.0}}}})
    assert not copy.path(*layout.cluster_track_b_bags("des")).exists()


@SLOW
def test_attention_weights_are_per_instance_and_sum_to_one_per_field(track_b_run):
    from lens_assets.ml.mil import read_bag_cache

    storage, _ = track_b_run
    attention = pd.read_parquet(storage.path(*layout.cluster_track_b_attention("des")))
    bags = read_bag_cache(storage.path(*layout.cluster_track_b_bags("des")))
    assert bags.meta["stamp_px"] == 24 and bags.counts.max() <= 6
    per = attention.groupby("objid")
    np.testing.assert_allclose(per["attention"].sum().to_numpy(), 1.0, atol=1e-5)
    counts = per.size()
    np.testing.assert_array_equal(counts.to_numpy(), bags.counts[bags.index_of(list(counts.index))])


@SLOW
def test_the_checkpoint_reloads_to_the_same_logits(track_b_run):
    from lens_assets.ml.mil import read_bag_cache, score_mil

    storage, _ = track_b_run
    scores = pd.read_parquet(storage.path(*layout.cluster_track_b_scores("des"))).query("model == 'track_b'")
    bags = read_bag_cache(storage.path(*layout.cluster_track_b_bags("des")))
    logits, attention = score_mil(storage.path(*layout.cluster_track_b_checkpoint("des")), bags,
                                  rows=bags.index_of(list(scores["objid"])))
    np.testing.assert_allclose(logits, scores["logit"].to_numpy(), rtol=0, atol=1e-5)
    assert attention.shape == (len(scores), 6)


def test_with_a_launcher_that_does_not_share_the_disk_track_b_trains_in_the_run_worker(tmp_path):
    """The deployment's EcsLauncher runs jobs where the bag cache cannot be read: Track B then trains in a
    subprocess of the run worker, says so, and goes on (here to the missing tables of an empty store)."""
    storage = LocalStorage(root=str(tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    not_sharing = LocalSubprocessLauncher(shares_filesystem=False)
    result = dg.materialize([cluster_track_b], partition_key="des", instance=instance, raise_on_error=False,
                            resources={"storage": storage, "launcher": not_sharing})
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "does not exist: materialize arc_segments and cluster_features" in failure.step_failure_data.error.message
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any(m.startswith("cluster_track_b trains in this run worker (LocalSubprocessLauncher): "
                            "LocalSubprocessLauncher runs jobs where the bag cache") for m in logs)


def test_an_unknown_backbone_is_refused_with_the_registry(tmp_path):
    storage = LocalStorage(root=str(tmp_path))
    with pytest.raises(dg.Failure, match="backbones are .*regnetx_002"):
        dg.materialize([cluster_track_b], partition_key="des", instance=dg.DagsterInstance.ephemeral(),
                       resources={"storage": storage, "launcher": LocalSubprocessLauncher()},
                       run_config={"ops": {"cluster_track_b": {"config": {"backbone": "nope"}}}})


def test_fusion_takes_track_b_rows_alone_when_the_file_holds_pu_rows(tmp_path):
    """cluster_fusion on hand-made tables: Track B's scores file with pu_b_10 rows for the same fields merges
    its track_b logits one to one and hands every model's rows to the report."""
    from lens_assets.science.clusters.models import SCORE_COLUMNS, TRUTH_COLUMNS

    rng = np.random.default_rng(0)
    parts = [("val", "stop", "val", 20), ("val", "calibrate", "val", 20), ("test", "", "test", 20),
             ("heldout", "", "cluster_heldout", 10)]
    ct = pd.concat([pd.DataFrame({"split": split, "val_role": role, "set": name, "objid": [f"{name}{role}{i}"
                                  for i in range(n)], "label": np.arange(n) % 2}) for split, role, name, n in parts],
                   ignore_index=True)
    ct = ct.assign(sim_family="cluster", sim_kind="nfw", theta_e=5.0, n_arcs=1, arc_sb=23.0)
    ct["track_a"] = 2.0 * ct["label"] + rng.normal(size=len(ct))
    ct["anomaly"] = ct["label"] + rng.normal(size=len(ct))
    ct["colour_consistency"] = rng.normal(size=len(ct))
    ct = ct[["split", "val_role", "set", *TRUTH_COLUMNS, "track_a", "anomaly", "colour_consistency"]]

    def rows(part, model, logit):
        out = part[["set", *TRUTH_COLUMNS]].assign(model=model, logit=logit, prob=1 / (1 + np.exp(-logit)))
        return out[list(SCORE_COLUMNS)]

    scored, val = ct[ct["split"] != "val"], ct[ct["split"] == "val"]
    b_logit = lambda part: 1.5 * part["label"].to_numpy() + rng.normal(size=len(part))  # noqa: E731
    storage = LocalStorage(root=str(tmp_path))
    storage.write_parquet(ct, *layout.cluster_components_table("des"))
    storage.write_parquet(rows(scored, "track_a", scored["track_a"].to_numpy()), *layout.cluster_scores_table("des"))
    track_b_file = pd.concat([rows(scored, "track_b", b_logit(scored)), rows(scored, "pu_b_10", -b_logit(scored))])
    storage.write_parquet(track_b_file, *layout.cluster_track_b_scores("des"))
    storage.write_parquet(rows(val, "track_b", b_logit(val)), *layout.cluster_track_b_val_scores("des"))
    result = dg.materialize([cluster_fusion], partition_key="des", instance=dg.DagsterInstance.ephemeral(),
                            resources={"storage": storage}, raise_on_error=True, run_config={"ops": {
                                "cluster_fusion": {"config": {"max_fpr": 0.5,
                                                              "components": ["track_a", "track_b", "anomaly"]}}}})
    (mat,) = result.asset_materializations_for_node("cluster_fusion")
    assert mat.metadata["models"].value == "track_a,track_b,pu_b_10,fused"
    report = pd.read_parquet(storage.path(*layout.cluster_report_scores("des")))
    assert report.groupby("model").size().to_dict() == {"track_a": 30, "track_b": 30, "pu_b_10": 30, "fused": 30}
    assert "track_b" in mat.metadata["weights"].value
