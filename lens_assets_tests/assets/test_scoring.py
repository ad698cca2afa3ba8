"""candidate_scores end to end on a tiny SDSS survey: an inbox drop goes through the sensor and is scored.

One module fixture copies the session's trained survey (a one-member ensemble
trained, calibrated, reported on and promoted on 200 simulated cutouts, gates
set to pass), publishes an
unlabeled drop of 40 cutouts plus three broken files and a duplicate, runs one tick of
survey_inbox_sensor and materializes the partition it asks for. The tests check
the table against an independent recomputation (the shard pipeline's stages on
the same files, lineage hashed from the files here). The automation-condition test needs
no model: materializations are reported to an ephemeral instance.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from lens_assets.assets.scoring import candidate_scores
from lens_assets.inbox import COMPLETE_MARKER
from lens_assets.inbox import publish_drop, simulate_drop
from lens_assets.resources.storage import LocalStorage
from lens_assets.sensors.inbox import survey_inbox_sensor

SURVEY = "sdss"
MEMBER = "resnet10t"
DROP = "2026-11-21-night"
N_DROP = 40
BROKEN = {"truncated.fits": "truncated", "x.fits": "unreadable", "wrong_survey.fits": "survey_mismatch"}
DUPLICATE_OF = 5  # a copy of the 6th good file, named to sort right after it (mid-batch): duplicate_objid
SCORING_CONFIG = {"ops": {"candidate_scores": {"config": {"workers": 1, "batch_size": 16}}}}
# the scored drop also carries the optional colour columns; the other runs score with the default (without them)
COLOUR_SCORING_CONFIG = {"ops": {"candidate_scores": {"config": {**SCORING_CONFIG["ops"]["candidate_scores"]["config"],
                                                                 "colour_consistency": True}}}}
PASSING_GATES = {"min_auroc": 0.0, "min_tpr10": 0.0, "max_ece": 1.0, "min_heldout_auroc": None,
                 "min_lensing_only_auroc": None, "max_fnr_flux_ratio_lt_0_1": None, "n_boot": 10}


@pytest.fixture(scope="module")
def model_storage(trained_survey, tmp_path_factory):
    """A trained, calibrated and promoted one-member SDSS ensemble (the report's gates set to let it through): a
    copy of the session's trained survey, which this module's tests add drops to and recalibrate."""
    assert trained_survey.member == MEMBER and trained_survey.survey == SURVEY
    storage = trained_survey.copy_to(tmp_path_factory.mktemp("scoring") / "data").storage()
    # score_calibrator's data version is the calibrator_version that candidate rows carry (checked below)
    calibrator_mat = trained_survey.run.asset_materializations_for_node("score_calibrator")[0]
    calibrator_bytes = storage.path("calibrators", SURVEY, "calibrator.json").read_bytes()
    assert calibrator_mat.tags["dagster/data_version"] == hashlib.sha256(calibrator_bytes).hexdigest()[:16]
    return storage


def _broken_files(good: list[Path], out: Path) -> list[Path]:
    """The BROKEN files, and a copy of ``good[DUPLICATE_OF]`` under another name (same OBJID)."""
    dup = out / f"{good[DUPLICATE_OF].stem}_copy.fits"  # "_" sorts after ".fits": the original comes first
    dup.write_bytes(good[DUPLICATE_OF].read_bytes())
    good = good[0]
    data = good.read_bytes()
    (out / "truncated.fits").write_bytes(data[: len(data) // 2])  # headers say more data than there is
    (out / "x.fits").write_text("objid,ra,dec\n1,2,3\n")  # not FITS at all
    with fits.open(good) as hdul:
        hdul[0].header["SURVEY"] = "des"
        hdul[0].header["OBJID"] = "wrong-survey-1"
        hdul.writeto(out / "wrong_survey.fits")
    return [out / name for name in BROKEN] + [dup]


@pytest.fixture(scope="module")
def scored(model_storage, tmp_path_factory):
    """The drop published, one sensor tick, its partition registered and candidate_scores materialized."""
    storage = model_storage
    staging = LocalStorage(root=str(tmp_path_factory.mktemp("producer")))
    truth = simulate_drop(staging, SURVEY, "staged", n=N_DROP, seed=321, workers=1)
    good = sorted(staging.path("inbox", SURVEY, "staged").glob("*.fits"))
    broken = _broken_files(good, tmp_path_factory.mktemp("broken"))
    quarantined = {**BROKEN, broken[-1].name: "duplicate_objid"}
    unread = tmp_path_factory.mktemp("unread")  # files a drop may hold that are not cutouts by their names
    (unread / "README.txt").write_text("observing log")
    (unread / "obj-9.fits.bz2").write_bytes(b"BZh9")
    publish_drop(storage, SURVEY, DROP, [*good, *broken, *sorted(unread.iterdir())])  # _COMPLETE after the last

    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance, resources={"storage": storage}) as context:
        tick = survey_inbox_sensor(context)
    (req,) = tick.run_requests
    (add,) = tick.dynamic_partitions_requests
    instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    result = dg.materialize([candidate_scores], partition_key=str(req.partition_key), instance=instance,
                            resources={"storage": storage}, run_config=COLOUR_SCORING_CONFIG, tags=req.tags)
    assert result.success
    (mat,) = result.asset_materializations_for_node("candidate_scores")
    meta = {k: v.value for k, v in mat.metadata.items()}
    table = pd.read_parquet(meta["path"])
    return {"storage": storage, "instance": instance, "request": req, "materialization": mat, "meta": meta,
            "table": table, "truth": truth, "good": [p.name for p in good], "quarantined": quarantined}


def _publish_staged_drop(storage, drop: str, *, n: int, seed: int) -> None:
    """A drop of ``n`` simulated cutouts, staged by a producer elsewhere and published into ``storage``'s inbox."""
    staging = LocalStorage(root=str(storage.root_path.parent / f"producer-{drop}"))
    simulate_drop(staging, SURVEY, "staged", n=n, seed=seed, workers=1)
    publish_drop(storage, SURVEY, drop, sorted(staging.path("inbox", SURVEY, "staged").glob("*.fits")))


def _tick_and_score(storage, instance, drop: str, *, cursor=None):
    """One survey_inbox_sensor tick; the run it requests for ``drop`` materialized as the daemon would.
    Returns (request, the drop's candidate table)."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        tick = survey_inbox_sensor(context)
    (req,) = [r for r in tick.run_requests if r.tags["lens/drop"] == drop]
    for add in tick.dynamic_partitions_requests:
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    run = dg.materialize([candidate_scores], partition_key=str(req.partition_key), instance=instance,
                         resources={"storage": storage}, run_config=SCORING_CONFIG, tags=req.tags)
    assert run.success
    return req, pd.read_parquet(storage.path("candidates", SURVEY, drop, "candidate_scores.parquet"))


def test_the_sensor_requests_the_drop_and_the_run_materializes_that_partition(scored):
    req, mat, instance = scored["request"], scored["materialization"], scored["instance"]
    assert req.run_key == f"{SURVEY}|{DROP}" and str(req.partition_key) == f"{DROP}|{SURVEY}"
    assert mat.partition == f"{DROP}|{SURVEY}"
    assert instance.get_dynamic_partitions("drops") == [DROP]
    assert instance.get_materialized_partitions(candidate_scores.key) == {f"{DROP}|{SURVEY}"}
    storage = scored["storage"]
    assert Path(scored["meta"]["path"]) == storage.path("candidates", SURVEY, DROP, "candidate_scores.parquet")


def test_every_good_file_is_scored_once_and_the_broken_ones_are_quarantined_with_reasons(scored):
    storage, table, meta = scored["storage"], scored["table"], scored["meta"]
    drop_dir = storage.path("inbox", SURVEY, DROP)
    n_fits = len(list(drop_dir.glob("*.fits")))
    quarantined = scored["quarantined"]
    assert n_fits == N_DROP + len(quarantined)
    assert meta["n_files"] == n_fits
    assert meta["n_scored"] + meta["n_quarantined"] == n_fits
    assert (meta["n_scored"], meta["n_quarantined"]) == (N_DROP, len(quarantined))
    assert len(table) == meta["dagster/row_count"] == N_DROP
    assert sorted(table["objid"]) == sorted(scored["truth"]["objid"])
    assert sorted(Path(f).name for f in table["source_file"]) == scored["good"]
    assert table["objid"].is_unique and table["source_file"].is_unique
    quarantine = pd.read_parquet(meta["quarantine_path"])
    assert dict(zip(quarantine["source_file"].map(lambda f: Path(f).name), quarantine["reason"])) == quarantined
    assert (quarantine["message"].str.len() > 0).all()
    dup = quarantine[quarantine["reason"] == "duplicate_objid"]
    assert dup["message"].str.contains(scored["good"][DUPLICATE_OF], regex=False).all()
    for reason in quarantined.values():
        assert f"| {reason} | 1 |" in meta["quarantine_reasons"]
    # the two files whose names are not FITS names are not read, and the metadata names them (the marker aside)
    assert meta["n_unread_files"] == 2
    assert meta["unread_files"].splitlines() == [f"- `{storage.url('inbox', SURVEY, DROP, n)}`"
                                                 for n in ("README.txt", "obj-9.fits.bz2")]


def test_scores_are_probabilities_and_rank_follows_the_fused_logit(scored):
    table = scored["table"]
    assert table["score"].between(0.0, 1.0).all()
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert (np.diff(table["logit"].to_numpy()) <= 0).all()  # rank 1 has the highest logit
    # the calibrator is monotone: a higher logit never gets a lower probability
    assert (np.diff(table["score"].to_numpy()) <= 1e-12).all()
    assert scored["meta"]["n_score_above_0.5"] == int((table["score"] > 0.5).sum())


def test_each_row_carries_the_lineage_of_its_score(scored):
    storage, table, meta = scored["storage"], scored["table"], scored["meta"]
    for col in ("objid", "score", "rank", "source_file", "source_sha256", "model_version", "calibrator_version",
                "training_manifest_sha256"):
        assert col in table.columns, col
    for f, sha in zip(table["source_file"], table["source_sha256"]):
        assert sha == hashlib.sha256(storage.path(f).read_bytes()).hexdigest(), f
    ensemble = json.loads(storage.path("promoted", SURVEY, "ensemble.json").read_text())
    calibrator_bytes = storage.path("promoted", SURVEY, "calibrator.json").read_bytes()
    manifest = json.loads(storage.path("shards", SURVEY, "manifest.json").read_text())
    # the data version: the manifest without build time, its own hash and the hashes of file bytes
    content = {k: v for k, v in manifest.items() if k not in ("sha256", "seconds", "rows_table_sha256")}
    content["shards"] = [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["shards"]]
    manifest_sha = hashlib.sha256(json.dumps(content, indent=2, sort_keys=True).encode()).hexdigest()
    assert manifest["sha256"] == manifest_sha
    expected = {"model_version": ensemble["version"],
                "calibrator_version": hashlib.sha256(calibrator_bytes).hexdigest()[:16],
                "training_manifest_sha256": manifest_sha, "survey": SURVEY, "drop": DROP}
    for col, value in expected.items():
        assert set(table[col]) == {value}, col
    for col in ("model_version", "calibrator_version", "training_manifest_sha256"):
        assert meta[col] == expected[col], col


def test_scores_equal_the_shard_pipeline_stage_by_stage(scored):
    """The single-read scorer against the training path's stages run one by one on the same files:
    ingest_files (catalog), process_batch (reads the files again and matches them as the shards were),
    each member's forward, the fusion and the calibrator."""
    from lens_assets.ml.score import Fusion, load_members, logits_of_batch
    from lens_assets.science.calibration import Calibrator
    from lens_assets.science.ingest import ingest_files
    from lens_assets.science.shards import ShardSettings, process_batch
    from lens_assets.science.surveys import get_survey

    storage, table = scored["storage"], scored["table"]
    survey = get_survey(SURVEY)
    files = [storage.path("inbox", SURVEY, DROP, name) for name in scored["good"]]
    catalog = ingest_files(files, survey, root=storage.root_path, workers=1, progress=False).catalog
    ensemble = json.loads(storage.path("promoted", SURVEY, "ensemble.json").read_text())
    doc = json.loads(storage.path("promoted", SURVEY, "calibrator.json").read_text())
    members = load_members([storage.path(m["checkpoint"]) for m in ensemble["members"]], device="cpu")
    records = catalog.to_dict("records")
    settings = ShardSettings(**ensemble["shard_settings"])
    batches = [process_batch((records[i:i + 7], str(storage.root_path), settings)) for i in range(0, len(records), 7)]
    logits = np.concatenate([logits_of_batch(members, b["image"], b["variance"], device="cpu") for b in batches])
    fused = Fusion.from_dict(doc["fusion"])(logits)
    direct = pd.DataFrame({"objid": catalog["objid"], "logit": fused, "logit_0": logits[:, 0],
                           "score": Calibrator.from_dict(doc["calibrator"]).predict(fused)})
    merged = table.merge(direct, on="objid", suffixes=("", "_direct"), validate="one_to_one")
    assert len(merged) == N_DROP
    np.testing.assert_allclose(merged["logit"], merged["logit_direct"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(merged[f"logit_{MEMBER}"], merged["logit_0"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(merged["score"], merged["score_direct"], rtol=0, atol=1e-6)
    # ranks follow the direct logits wherever float noise cannot swap them
    got_rank = table.set_index("objid").loc[direct["objid"], "rank"].to_numpy()
    logit = direct["logit"].to_numpy()
    clearly_above = logit[:, None] > logit[None, :] + 1e-4
    assert clearly_above.sum() > N_DROP  # not a vacuous check
    assert (got_rank[:, None] < got_rank[None, :])[clearly_above].all()


def test_candidates_carry_the_mc_dropout_uncertainty_of_their_fused_logit(scored):
    """One member trained with head dropout: no ensemble spread, an MC-dropout spread for every row, and the
    row's uncertainty is how far that spread moves its calibrated probability."""
    import torch

    from lens_assets.ml.score import load_members, member_outputs
    from lens_assets.science.shards import ShardSettings, process_batch
    from lens_assets.science.ingest import ingest_files
    from lens_assets.science.surveys import get_survey

    storage, table = scored["storage"], scored["table"]
    assert table["logit_std_ensemble"].isna().all()
    assert (table["logit_std_mc"] > 0).all() and np.isfinite(table["logit_std_mc"]).all()
    from lens_assets.science.calibration import Calibrator

    cal = Calibrator.from_dict(
        json.loads(storage.path("promoted", SURVEY, "calibrator.json").read_text())["calibrator"])
    z, s = table["logit"].to_numpy(), table["logit_std_mc"].to_numpy()
    np.testing.assert_allclose(table["uncertainty"], (cal.predict(z + s) - cal.predict(z - s)) / 2, rtol=1e-9)
    # the column is each row's std over the member's head draws (fusion mean of one member: weight 1)
    ensemble = json.loads(storage.path("promoted", SURVEY, "ensemble.json").read_text())
    members = load_members([storage.path(m["checkpoint"]) for m in ensemble["members"]], device="cpu")
    files = [storage.path("inbox", SURVEY, DROP, name) for name in scored["good"][:9]]
    catalog = ingest_files(files, get_survey(SURVEY), root=storage.root_path, workers=1, progress=False).catalog
    batch = process_batch((catalog.to_dict("records"), str(storage.root_path),
                           ShardSettings(**ensemble["shard_settings"])))
    _, std = member_outputs(members, batch["image"], batch["variance"], device="cpu", mc_samples=400,
                            generator=torch.Generator().manual_seed(1))
    got = table.set_index("objid").loc[catalog["objid"], "logit_std_mc"].to_numpy()
    # 16 draws in the table against 400 here: a 16-draw std scatters by about 1/sqrt(30) = 18% about the truth
    ratio = got / std[:, 0]
    assert abs(ratio.mean() - 1.0) < 0.2 and ((ratio > 0.5) & (ratio < 2.0)).all()
    assert scored["meta"]["n_uncertainty_measured"] == len(table)


def test_candidates_carry_the_colour_consistency_of_their_matched_cutouts(scored):
    """With ``colour_consistency`` every row has the colour columns, equal to ``arc_colour_table`` on the arrays
    the training path's stages give for the same files."""
    from lens_assets.science.galaxy_colour import COLOUR_GATES, arc_colour_table, survey_colour_kwargs
    from lens_assets.science.ingest import ingest_files
    from lens_assets.science.shards import ShardSettings, process_batch
    from lens_assets.science.surveys import get_survey

    storage, table = scored["storage"], scored["table"]
    assert set(table["colour_gate"]) <= set(COLOUR_GATES)
    ok = table["colour_gate"] == "ok"
    assert table.loc[ok, "colour_consistency"].between(0, 1).all() and table.loc[~ok, "colour_consistency"].isna().all()
    ensemble = json.loads(storage.path("promoted", SURVEY, "ensemble.json").read_text())
    settings = ShardSettings(**ensemble["shard_settings"])
    files = [storage.path("inbox", SURVEY, DROP, name) for name in scored["good"]]
    survey = get_survey(SURVEY)
    catalog = ingest_files(files, survey, root=storage.root_path, workers=1, progress=False).catalog
    batch = process_batch((catalog.to_dict("records"), str(storage.root_path), settings))
    direct = arc_colour_table(batch["image"], batch["variance"], objids=list(catalog["objid"]),
                              **survey_colour_kwargs(survey, settings.target_fwhm_arcsec))
    got = table.set_index("objid").loc[direct["objid"]]
    assert len(got) == N_DROP and (direct["colour_gate"] == "ok").sum() >= 2  # not a comparison of NaNs alone
    assert (got["colour_gate"].to_numpy() == direct["colour_gate"].to_numpy()).all()
    np.testing.assert_array_equal(got["n_colour_segments"].to_numpy(), direct["n_colour_segments"].to_numpy())
    for column in ("colour_consistency", "colour_dispersion"):
        np.testing.assert_allclose(got[column], direct[column], rtol=0, atol=1e-12)


def test_metadata_has_the_score_histogram_and_the_top_candidates_gallery(scored):
    storage, meta, table = scored["storage"], scored["meta"], scored["table"]
    out = storage.path("candidates", SURVEY, DROP)
    for key, name, alt in (("score_histogram", "score_histogram.png", "score histogram"),
                           ("top_candidates_gallery", "top_candidates.png", "top candidates")):
        assert meta[key].startswith(f"![{alt}](data:image/png;base64,"), key
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"`{out / name}`" in meta[key]
    top = meta["top_candidates"]
    assert top.index(table["objid"].iloc[0]) < top.index(table["objid"].iloc[1])


def test_an_incomplete_drop_is_a_failure_naming_the_drop(storage):
    d = storage.path("inbox", SURVEY, "half-copied")
    d.mkdir(parents=True)
    (d / "a.fits").write_bytes(b"SIMPLE  =                    T")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("drops", ["half-copied"])
    with pytest.raises(dg.Failure, match=rf"{d} has no {COMPLETE_MARKER} marker: the drop is not complete"):
        dg.materialize([candidate_scores], partition_key=f"half-copied|{SURVEY}", instance=instance,
                       resources={"storage": storage}, run_config=SCORING_CONFIG)
    result = dg.materialize([candidate_scores], partition_key=f"half-copied|{SURVEY}", instance=instance,
                            resources={"storage": storage}, run_config=SCORING_CONFIG, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"inbox/{SURVEY}/half-copied has no _COMPLETE marker" in failure.event_specific_data.error.message
    assert not storage.path("candidates", SURVEY, "half-copied").exists()


def test_a_model_whose_report_fails_a_gate_is_never_promoted_nor_used_for_a_new_drop(scored):
    """Recalibrated (another calibrator method) and reported with a gate it cannot meet: the run fails at the
    report's blocking check, promoted_model does not run (nor does it on its own), and the next drop the sensor
    sends is scored with the pair promoted before."""
    from lens_assets.assets.promotion import promoted_model

    storage, instance = scored["storage"], scored["instance"]
    before = json.loads(storage.path("promoted", SURVEY, "promotion.json").read_text())
    old_cal = json.loads(storage.path("calibrators", SURVEY, "calibrator.json").read_text())
    method = "temperature" if old_cal["calibrator"]["method"] != "temperature" else "isotonic"
    from lens_assets.assets.evaluation import bologna_report, score_calibrator

    run_config = {"ops": {"score_calibrator": {"config": {"batch_size": 48, "heldout_families": [],
                                                          "method": method}},
                          "bologna_report": {"config": {**PASSING_GATES, "min_auroc": 1.0}}}}
    result = dg.materialize([score_calibrator, bologna_report, promoted_model], partition_key=SURVEY,
                            instance=instance, resources={"storage": storage}, run_config=run_config,
                            raise_on_error=False, selection=[score_calibrator, bologna_report, promoted_model])
    assert not result.success
    failures = {e.step_key: e.event_specific_data.error.message for e in result.all_events
                if e.event_type_value == "STEP_FAILURE"}
    assert list(failures) == ["bologna_report"] and "auroc_at_least_gate" in failures["bologna_report"]
    assert result.asset_materializations_for_node("promoted_model") == []
    assert result.asset_materializations_for_node("bologna_report")  # the report is written all the same
    new_cal = storage.path("calibrators", SURVEY, "calibrator.json").read_bytes()
    assert hashlib.sha256(new_cal).hexdigest()[:16] != before["calibrator_version"]  # a new pair exists

    alone = dg.materialize([promoted_model], partition_key=SURVEY, instance=instance,
                           resources={"storage": storage}, raise_on_error=False)
    (failure,) = [e for e in alone.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "is not promoted: auroc_at_least_gate failed" in failure.event_specific_data.error.message
    assert json.loads(storage.path("promoted", SURVEY, "promotion.json").read_text()) == before

    _publish_staged_drop(storage, "after-failed-gate", n=6, seed=99)
    req, table = _tick_and_score(storage, instance, "after-failed-gate")
    assert req.tags["lens/promoted_version"] == before["version"]
    assert len(table) == 6
    assert "colour_gate" not in table.columns  # the colour columns are an option, off by default
    assert set(table["calibrator_version"]) == {before["calibrator_version"]}
    assert set(table["model_version"]) == {before["model_version"]}


def test_promotion_refuses_a_failed_gate_and_records_a_missed_target(trained_survey, tmp_path):
    """promote() reads the gate results report.json recorded: a failed gate refuses (reports written before eval-12
    carry no ``blocking`` and gate every check); a missed target (``blocking`` false) and a figure that is not gated
    are recorded in the promotion and do not stop it."""
    from lens_assets.model_registry import promote

    storage = trained_survey.copy_to(tmp_path / "data").storage()
    report = json.loads(storage.path("reports", SURVEY, "bologna", "report.json").read_text())
    promotion_file = storage.path("promoted", SURVEY, "promotion.json")
    before = promotion_file.read_bytes()
    checks, name = report["checks"], "auroc_at_least_gate"
    assert checks[name]["passed"] is True
    for failed in ({**checks[name], "passed": False, "blocking": True},
                   {k: v for k, v in checks[name].items() if k != "blocking"} | {"passed": False}):
        with pytest.raises(Exception, match=f"is not promoted: {name} failed"):
            promote(storage, SURVEY, report={**report, "checks": {**checks, name: failed}}, run_id="refused")
        assert promotion_file.read_bytes() == before  # the previous promotion stays
    missed = {**checks, name: {**checks[name], "passed": False, "target": 0.999, "blocking": False},
              "tpr10_at_least_gate": {**checks["tpr10_at_least_gate"], "passed": True, "gate": "not gated",
                                      "target": None, "blocking": False}}
    promotion = promote(storage, SURVEY, report={**report, "checks": missed}, run_id="target")
    assert promotion["checks"] == missed and promotion["run_id"] == "target"
    assert json.loads(promotion_file.read_text())["checks"][name] == missed[name]


def test_candidate_scores_is_rescored_when_its_survey_promotes_a_model_and_never_on_an_unvetted_one():
    from lens_assets.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    selection = dg.AssetSelection.assets(candidate_scores)

    def materialized(key, partition):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))

    def evaluate(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                                   cursor=cursor)
        return result, {str(k) for k in result.get_requested_partitions(candidate_scores.key)}

    for survey in ("sdss", "des"):
        materialized("promoted_model", survey)
    instance.add_dynamic_partitions("drops", ["d1", "d2"])
    for key in ("d1|sdss", "d2|sdss", "d1|des"):
        materialized("candidate_scores", key)
    result, requested = evaluate(None)
    assert requested == set()

    instance.add_dynamic_partitions("drops", ["d3"])  # a new drop: the sensor's job, not the condition's
    result, requested = evaluate(result.cursor)
    assert requested == set()

    # retrained and recalibrated, and a report written (whose gates may have failed): nothing is re-scored
    for key in ("lens_classifier", "score_calibrator", "bologna_report"):
        materialized(key, "sdss")
    result, requested = evaluate(result.cursor)
    assert requested == set()

    materialized("promoted_model", "sdss")  # promoted: every scored sdss drop, and only those
    result, requested = evaluate(result.cursor)
    assert requested == {"d1|sdss", "d2|sdss"}
    result, requested = evaluate(result.cursor)
    assert requested == set()  # once per promotion

    materialized("promoted_model", "des")
    result, requested = evaluate(result.cursor)
    assert requested == {"d1|des"}

    materialized("candidate_scores", "d3|sdss")  # the sensor's run of the new drop changes nothing upstream
    result, requested = evaluate(result.cursor)
    assert requested == set()


_KILLED_SCORING_RUN = """
import os, signal, sys
import dagster as dg
import lens_assets.science.plots as plots
from lens_assets.assets.scoring import candidate_scores
from lens_assets.partitions import drop_partitions, scoring_key
from lens_assets.resources.storage import LocalStorage

def killed(*args, **kwargs):  # the step dies (SIGKILL: no cleanup runs) once both tables are written
    os.kill(os.getpid(), signal.SIGKILL)

plots.value_histogram = killed
root, survey, drop = sys.argv[1:4]
instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions(drop_partitions.name, [drop])
dg.materialize([candidate_scores], partition_key=str(scoring_key(survey, drop)), instance=instance,
               resources={"storage": LocalStorage(root=root)},
               run_config={"ops": {"candidate_scores": {"config": {"workers": 1, "batch_size": 16}}}})
"""


@pytest.mark.slow  # a scoring run killed in a process of its own
def test_a_scoring_run_killed_mid_way_leaves_the_last_complete_table_and_its_retry_writes_one(model_storage):
    """A re-scoring run SIGKILLed after writing its new tables: readers still see the previous complete folder
    (byte for byte); re-executing the partition (what run_retries does) writes one complete table of every file."""
    import shutil
    import signal
    import subprocess
    import sys

    from lens_assets.partitions import drop_partitions, scoring_key

    storage, drop = model_storage, "killed-night"
    staging = LocalStorage(root=str(storage.root_path.parent / "producer-killed"))
    simulate_drop(staging, SURVEY, "staged", n=12, seed=77, workers=1)
    files = sorted(staging.path("inbox", SURVEY, "staged").glob("*.fits"))
    publish_drop(storage, SURVEY, drop, files[:8])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(drop_partitions.name, [drop])

    def score():
        result = dg.materialize([candidate_scores], partition_key=str(scoring_key(SURVEY, drop)), instance=instance,
                                resources={"storage": storage}, run_config=SCORING_CONFIG)
        assert result.success
        return {p.name: p.read_bytes() for p in storage.path("candidates", SURVEY, drop).iterdir()}

    first = score()
    assert {"candidate_scores.parquet", "quarantine.parquet", "score_histogram.png"} <= set(first)
    for f in files[8:]:  # the re-scoring run has more to write than the folder readers see now
        shutil.copy(f, storage.path("inbox", SURVEY, drop, f.name))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _KILLED_SCORING_RUN, str(storage.root_path), SURVEY, drop],
                          cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    after_kill = {p.name: p.read_bytes() for p in storage.path("candidates", SURVEY, drop).iterdir()}
    assert after_kill == first
    # the killed run got as far as writing both tables (under tmp/, where no reader looks)
    leftovers = [p for p in storage.path("tmp").glob(f"candidates-{SURVEY}-{drop}-*") if p.is_dir()]
    assert leftovers and (leftovers[0] / "candidate_scores.parquet").exists()

    retried = score()
    table = pd.read_parquet(storage.path("candidates", SURVEY, drop, "candidate_scores.parquet"))
    quarantine = pd.read_parquet(storage.path("candidates", SURVEY, drop, "quarantine.parquet"))
    assert len(table) + len(quarantine) == len(files) and len(quarantine) == 0
    assert sorted(Path(f).name for f in table["source_file"]) == [p.name for p in files]
    assert list(table["rank"]) == list(range(1, len(files) + 1))
    assert {"candidate_scores.parquet", "quarantine.parquet", "score_histogram.png"} <= set(retried)


def test_a_drop_that_arrives_before_its_survey_has_a_model_is_scored_after_the_first_promotion(trained_survey_copy):
    """No promotion yet: the sensor holds the drop. promoted_model then promotes the survey's reported pair (its
    page says which version and why) and the next tick sends the held drop, which is scored by that pair."""
    import shutil

    from lens_assets.assets.promotion import promoted_model

    storage = trained_survey_copy.storage()
    promotion_file = storage.path("promoted", SURVEY, "promotion.json")
    shutil.rmtree(promotion_file.parent)
    _publish_staged_drop(storage, "before-any-model", n=5, seed=7)

    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance, resources={"storage": storage}) as context:
        held = survey_inbox_sensor(context)
    assert held.run_requests == []
    assert not storage.path("candidates", SURVEY, "before-any-model").exists()

    promoted = dg.materialize([promoted_model], partition_key=SURVEY, instance=instance, resources={"storage": storage})
    (mat,) = promoted.asset_materializations_for_node("promoted_model")
    promotion = json.loads(promotion_file.read_text())
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["model_version"] == promotion["model_version"] and meta["promoted_version"] == promotion["version"]
    assert meta["calibrator_version"] == promotion["calibrator_version"] and meta["previous_version"] == ""
    assert "every gate of bologna_report" in meta["why"]
    for gate in ("auroc_at_least_gate", "tpr10_at_least_gate", "ece_at_most_gate"):
        assert f"| {gate} |" in meta["why"] and promotion["checks"][gate]["passed"], gate
    assert "| fnr_flux_ratio_lt_0_1_at_most_gate | nan | not gated | none | not gated |" in meta["why"]  # None

    req, table = _tick_and_score(storage, instance, "before-any-model", cursor=held.cursor)
    assert req.tags["lens/promoted_version"] == promotion["version"]
    assert len(table) == 5
    assert set(table["model_version"]) == {promotion["model_version"]}
    assert set(table["calibrator_version"]) == {promotion["calibrator_version"]}
