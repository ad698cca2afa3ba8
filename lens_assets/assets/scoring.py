"""Asset group `scoring`: ranked lens candidates of each survey drop in the inbox."""

import dagster as dg
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import OWNERS, counts_markdown, gallery_from_files, png_markdown, scan_inbox_folder
from lens_assets.model_registry import load_promoted, no_retry
from lens_assets.partitions import scoring_partitions
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file
from lens_assets.science.schemas import candidate_schema
from lens_assets.science.surveys import get_survey

SCORING_CODE_VERSION = "score-5"  # 3: scored by the promoted pair only; 4: uncertainty columns; 5: in probability units

# a survey's promoted model feeds every (drop, survey) partition of that survey. Dagster (1.13) resolves this mapping by
# matching the upstream partitions def against the dimensions, so "survey" documents the intent and is the only
# dimension that can match (test_candidate_scores_is_rescored_... checks the behaviour)
_per_survey = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="survey")

# re-score every drop of a survey when a new model is promoted (never on a retrained or recalibrated one before it
# passes the report's gates); new drops, and drops whose run failed, are the sensor's
RESCORE_ON_NEW_MODEL = (dg.AutomationCondition.any_deps_updated() & ~dg.AutomationCondition.missing()
                        & ~dg.AutomationCondition.any_deps_in_progress()
                        & ~dg.AutomationCondition.in_progress()).with_label("rescore when the model changes")


class ScoringConfig(dg.Config):
    # 128 scored 1.05-1.13x faster end to end than 256 on 2 cores (bench_scoring, 1,024 and 4,096 files): a
    # shorter pipeline fill and matching arrays that stay in cache
    batch_size: int = Field(default=128, ge=1, description="files per read/match task and model batch (bounds "
                            "memory)")
    workers: int = Field(default=0, description="processes reading and PSF-matching files; 0 = every core")
    gallery_size: int = Field(default=12, ge=0, description="top candidates shown in the gallery")
    mc_samples: int = Field(default=16, ge=0, description="MC-dropout draws of each member's head per cutout "
                            "(members trained with head_dropout; the backbone runs once): the logit_std_mc and "
                            "uncertainty columns; 0 for none")
    colour_consistency: bool = Field(default=False, description="add the colour consistency of the residual "
                                     "structure about each cutout's centre (science/galaxy_colour.py: "
                                     "colour_consistency, colour_dispersion, n_colour_segments, colour_gate); "
                                     "tens of cutouts/s per core, so off by default")


@dg.asset(
    partitions_def=scoring_partitions,
    owners=OWNERS,
    group_name="scoring",
    kinds={"python", "pytorch", "parquet"},
    code_version=SCORING_CODE_VERSION,
    # by key: this module imports nothing of the training side (promotion, evaluation, training)
    deps=[dg.AssetDep(dg.AssetKey("promoted_model"), partition_mapping=_per_survey)],
    automation_condition=RESCORE_ON_NEW_MODEL,
    # a transient failure (a worker killed for memory, a store that timed out) is retried within the run; the
    # table is written under a temporary name and renamed, so a retry never finds half of one
    retry_policy=dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL),
)
def candidate_scores(context: dg.AssetExecutionContext, config: ScoringConfig,
                     storage: LocalStorage) -> dg.MaterializeResult:
    """Ranked lens candidates of one survey drop: calibrated lens probability per cutout (Parquet).

    Every file of `inbox/<survey>/<drop>/` is ingested with the catalog's rules
    (bad files are quarantined with a reason), PSF-matched and normalized as the
    survey's training shards were, scored by the survey's promoted ensemble and
    calibrator (promoted_model: a pair whose Bologna report passed its gates).
    Each row carries its file's sha256 and the model, calibrator, training-data
    and code versions that produced its score. A drop marked ``_CLUSTER_FIELDS``
    is refused (``cluster_candidates`` scores it, in the same folder), and a file
    with ``OBJTYPE = 'cluster_field'`` is quarantined as ``objtype_mismatch``.
    """
    keys = context.partition_key.keys_by_dimension
    survey, drop = get_survey(keys["survey"]), keys["drop"]
    if not storage.exists(*layout.complete_marker(survey.name, drop)):
        raise no_retry(f"{storage.url(*layout.inbox_drop(survey.name, drop))} has no {layout.COMPLETE_MARKER} marker: "
                       "the drop is not complete")
    if storage.exists(*layout.cluster_marker(survey.name, drop)):  # publishing here would delete its candidates
        raise no_retry(f"{storage.url(*layout.inbox_drop(survey.name, drop))} has the {layout.CLUSTER_MARKER} marker: "
                       "it is a drop of cluster fields, scored by cluster_candidates, not candidate_scores")
    drop_dir = storage.pull(*layout.inbox_drop(survey.name, drop))
    files, unread = scan_inbox_folder(context, storage, drop_dir, what="cutouts")
    ensemble, fusion, calibrator, doc = load_promoted(storage, survey.name)
    from lens_assets.ml.score import default_device, load_members, score_files
    from lens_assets.science.shards import ShardSettings

    device = default_device()
    members = load_members([m["path"] for m in ensemble["members"]], device=device)
    # each file is read once: validated (quarantined with a reason if bad), matched, scored, calibrated
    result = score_files(files, survey, root=storage.root_path, settings=ShardSettings(**ensemble["shard_settings"]),
                         members=members, fusion=fusion, calibrator=calibrator, batch_size=config.batch_size,
                         workers=config.workers, device=device, mc_samples=config.mc_samples,
                         colour_consistency=config.colour_consistency)
    catalog, quarantine, scored, seconds = result.catalog, result.quarantine, result.scores, result.seconds
    calibrator_version = doc["version"]  # also score_calibrator's data version
    table = scored.rename(columns={f"logit_{j}": f"logit_{m['name']}" for j, m in enumerate(ensemble["members"])})
    for col in ("source_file", "source_sha256", "ra", "dec", "band_flags", "psf_fwhm", "n_nan_pixels", "snr"):
        table[col] = catalog[col].to_numpy()
    table["survey"], table["drop"] = survey.name, drop
    table["model_version"] = ensemble["version"]
    table["calibrator_version"] = calibrator_version
    table["training_manifest_sha256"] = ensemble["shards_manifest_sha256"]
    table["code_version"] = SCORING_CODE_VERSION
    table = table.sort_values(["logit", "objid"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.insert(2, "rank", range(1, len(table) + 1))
    table = candidate_schema().validate(table)
    context.log.info(f"{survey.name}/{drop}: scored {len(table)} of {len(files)} files ({len(quarantine)} "
                     f"quarantined) at {len(files) / seconds:.0f} files/s on {device}; model {ensemble['version']}")
    # the drop's folder (table, quarantine, plots) is built aside and published in one step: a run killed at any
    # point leaves the previous complete folder or none, and its retry starts over
    with storage.staged_dir(f"candidates-{survey.name}-{drop}") as staged:
        table.to_parquet(staged / layout.candidate_table(survey.name, drop)[-1], index=False)
        quarantine.to_parquet(staged / layout.candidate_quarantine(survey.name, drop)[-1], index=False)
        plots = _candidate_plots(table, staged, survey=survey, drop=drop, storage=storage,
                                 gallery_size=config.gallery_size)
        version = sha256_file(staged / layout.candidate_table(survey.name, drop)[-1])[:16]
        report_dir = storage.publish_dir(staged, *layout.candidates_dir(survey.name, drop))

    metadata = {
        "path": dg.MetadataValue.path(storage.url(*layout.candidate_table(survey.name, drop))),
        "quarantine_path": dg.MetadataValue.path(storage.url(*layout.candidate_quarantine(survey.name, drop))),
        "n_files": len(files),
        "n_scored": len(table),
        "n_quarantined": len(quarantine),
        **unread,
        "quarantine_reasons": counts_markdown(quarantine["reason"].value_counts().to_dict(), key="reason"),
        "model_version": ensemble["version"],
        "calibrator_version": calibrator_version,
        "calibrator_method": calibrator.method,
        "training_manifest_sha256": ensemble["shards_manifest_sha256"],
        "simulation_families": dg.MetadataValue.json(ensemble.get("simulation_families", {})),
        "inbox": dg.MetadataValue.path(storage.url(*layout.inbox_drop(survey.name, drop))),
        "files_per_s": len(files) / seconds if seconds > 0 else float("nan"),
        "device": device,
        "dagster/row_count": len(table),
    }
    if len(table):
        metadata["n_score_above_0.5"] = int((table["score"] > 0.5).sum())
        metadata["top_candidates"] = dg.MetadataValue.md(
            table.head(10)[["rank", "objid", "score", "logit", "uncertainty", "source_file"]].to_markdown(
                index=False, floatfmt=".4f"))
        metadata["n_uncertainty_measured"] = int(table["uncertainty"].notna().sum())
    alts = {"score_histogram": "score histogram", "top_candidates_gallery": "top candidates"}
    metadata.update({key: png_markdown(report_dir / name, alt=alts[key]) for key, name in plots.items()})
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


def _candidate_plots(table, out, *, survey, drop: str, storage: LocalStorage, gallery_size: int) -> dict:
    """The drop's score histogram and top-candidate gallery in ``out``: {metadata key: file name}."""
    if not len(table):
        return {}
    from lens_assets.science.plots import value_histogram

    histogram = layout.candidate_histogram(survey.name, drop)[-1]
    value_histogram(table["score"], out / histogram, xlabel="calibrated lens probability",
                    title=f"{survey.name} / {drop}: {len(table)} cutouts")
    plots = {"score_histogram": histogram}
    if gallery_size:
        top = table.head(gallery_size)
        gallery_from_files([storage.path(f) for f in top["source_file"]], list(top["source_file"]),
                           [f"#{r} p={p:.2f}" for r, p in zip(top["rank"], top["score"])], survey,
                           out / layout.candidate_gallery(survey.name, drop)[-1])
        plots["top_candidates_gallery"] = layout.candidate_gallery(survey.name, drop)[-1]
    return plots
