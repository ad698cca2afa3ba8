"""Asset group `scoring`, cluster track: ranked cluster-lens candidates of each drop of cluster fields in the inbox.

In the `scoring` group beside `candidate_scores`, not in `clusters`: it is partitioned per (drop, survey) like
the galaxy candidates and run by `survey_inbox_sensor`, while every `clusters` asset is partitioned per survey and
run by `cluster_pipeline`; its files live beside the galaxy candidates in `candidates/<survey>/<drop>/`.
"""

import time

import dagster as dg
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import OWNERS, counts_markdown, gallery_from_files, png_markdown, scan_inbox_folder
from lens_assets.model_registry import no_retry
from lens_assets.partitions import scoring_partitions
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file
from lens_assets.science.surveys import get_survey

CLUSTER_SCORING_CODE_VERSION = "cluster-score-1"

# a survey's cluster model feeds every (drop, survey) partition of that survey (as promoted_model feeds
# candidate_scores: see scoring.py)
_per_survey = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="survey")


class ClusterScoringConfig(dg.Config):
    workers: int = Field(default=0, description="processes reading and segmenting fields; 0 = every core")
    gallery_size: int = Field(default=6, ge=0, description="top candidates shown in the gallery")


@dg.asset(
    partitions_def=scoring_partitions,
    owners=OWNERS,
    group_name="scoring",
    kinds={"python", "xgboost", "parquet"},
    code_version=CLUSTER_SCORING_CODE_VERSION,
    # by key: this module imports nothing of the cluster training side
    deps=[dg.AssetDep(dg.AssetKey("cluster_report"), partition_mapping=_per_survey)],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL),
)
def cluster_candidates(context: dg.AssetExecutionContext, config: ClusterScoringConfig,
                       storage: LocalStorage) -> dg.MaterializeResult:
    """Ranked cluster-lens candidates of one drop of cluster fields: calibrated lens probability per field (Parquet).

    A drop of cluster fields is ``inbox/<survey>/<drop>/`` with ``_CLUSTER_FIELDS``
    beside ``_COMPLETE``. Every file must carry ``OBJTYPE = 'cluster_field'``
    (else it is quarantined as ``objtype_mismatch``); the fields are read,
    PSF-matched and segmented with the ``arc_segments`` settings of the survey's
    cluster manifest, their features computed as ``cluster_features`` does, and
    scored by the manifest's track-A model and calibrator. Each row carries its
    file's sha256 and the model, calibrator, training-features and code versions.
    """
    from lens_assets.cluster_registry import load_cluster_model
    from lens_assets.science.clusters.catalog import process_fields
    from lens_assets.science.clusters.scoring import field_features, objtype_quarantine, rank_fields
    from lens_assets.science.ingest import quarantine_frame, relative_names
    from lens_assets.science.schemas import cluster_candidate_schema

    keys = context.partition_key.keys_by_dimension
    survey, drop = get_survey(keys["survey"]), keys["drop"]
    inbox = storage.url(*layout.inbox_drop(survey.name, drop))
    if not storage.exists(*layout.complete_marker(survey.name, drop)):
        raise no_retry(f"{inbox} has no {layout.COMPLETE_MARKER} marker: the drop is not complete")
    if not storage.exists(*layout.cluster_marker(survey.name, drop)):
        raise no_retry(f"{inbox} has no {layout.CLUSTER_MARKER} marker: it is not a drop of cluster fields "
                       "(galaxy drops are scored by candidate_scores)")
    try:
        manifest, model, calibrator = load_cluster_model(storage, survey.name)
    except (LookupError, ValueError, FileNotFoundError) as err:
        raise no_retry(str(err)) from None
    if list(manifest["bands"]) != list(survey.band_names):
        raise no_retry(f"{storage.url(*layout.cluster_manifest(survey.name))}: bands {manifest['bands']} are not "
                       f"the survey's {list(survey.band_names)}")

    drop_dir = storage.pull(*layout.inbox_drop(survey.name, drop))
    files, unread = scan_inbox_folder(context, storage, drop_dir, what="cluster fields")
    paths, names = relative_names(files, storage.root_path)
    t0 = time.perf_counter()
    # the kind of file first: a galaxy cutout in a drop of cluster fields says so, not "too_small" or "no_bcg"
    mismatched = [objtype_quarantine(p, n, survey=survey.name) for p, n in zip(paths, names)]
    fields_in = [(p, n) for (p, n), q in zip(zip(paths, names), mismatched) if q is None]
    fields, segments, quarantine = process_fields([p for p, _ in fields_in], [n for _, n in fields_in], survey,
                                                  size_px=int(manifest["field_size_px"]), light=manifest["light"],
                                                  nsigma=float(manifest["nsigma"]), workers=config.workers,
                                                  progress=False)
    quarantine = quarantine_frame(sorted([*(q for q in mismatched if q is not None), *quarantine.to_dict("records")],
                                         key=lambda q: q["source_file"]))
    features = field_features(fields, segments, bands=survey.band_names,
                              wavelengths_nm=[b.wavelength_nm for b in survey.bands])
    table = rank_fields(fields, features, model=model, calibrator=calibrator)
    seconds = time.perf_counter() - t0
    if len(table) + len(quarantine) != len(paths):  # every file is scored or quarantined
        raise dg.Failure(f"{inbox}: {len(paths)} files gave {len(table)} scored and {len(quarantine)} quarantined")
    table["survey"], table["drop"] = survey.name, drop
    table["model_version"] = manifest["model_sha256"][:16]
    table["calibrator_version"] = manifest["calibrator_sha256"][:16]
    table["training_manifest_sha256"] = manifest["features_sha256"]
    table["code_version"] = CLUSTER_SCORING_CODE_VERSION
    table = cluster_candidate_schema().validate(table)
    context.log.info(f"{survey.name}/{drop}: scored {len(table)} of {len(paths)} cluster fields ({len(quarantine)} "
                     f"quarantined) in {seconds:.1f}s; cluster model {manifest['version']}")

    # published as one folder, like candidate_scores: a killed run leaves the previous complete folder or none
    with storage.staged_dir(f"cluster-candidates-{survey.name}-{drop}") as staged:
        table.to_parquet(staged / layout.cluster_candidate_table(survey.name, drop)[-1], index=False)
        quarantine.to_parquet(staged / layout.candidate_quarantine(survey.name, drop)[-1], index=False)
        gallery = None
        if len(table) and config.gallery_size:
            from lens_assets.science.clusters.catalog import field_survey

            top = table.head(config.gallery_size)
            gallery = gallery_from_files([storage.path(f) for f in top["source_file"]],
                                         list(top["source_file"]),
                                         [f"#{r} p={p:.2f}" for r, p in zip(top["rank"], top["score"])],
                                         field_survey(survey, int(manifest["field_size_px"])),
                                         staged / layout.candidate_gallery(survey.name, drop)[-1]).name
        version = sha256_file(staged / layout.cluster_candidate_table(survey.name, drop)[-1])[:16]
        out_dir = storage.publish_dir(staged, *layout.candidates_dir(survey.name, drop))

    metadata = {
        "path": dg.MetadataValue.path(storage.url(*layout.cluster_candidate_table(survey.name, drop))),
        "quarantine_path": dg.MetadataValue.path(storage.url(*layout.candidate_quarantine(survey.name, drop))),
        "n_files": len(paths),
        "n_scored": len(table),
        "n_quarantined": len(quarantine),
        **unread,
        "quarantine_reasons": counts_markdown(quarantine["reason"].value_counts().to_dict(), key="reason"),
        "model_version": manifest["model_sha256"][:16],
        "calibrator_version": manifest["calibrator_sha256"][:16],
        "calibrator_method": calibrator.method,
        "training_manifest_sha256": manifest["features_sha256"],
        "cluster_model_version": manifest["version"],
        "cluster_model": manifest["model"],
        "field_size_px": int(manifest["field_size_px"]),
        "light": manifest["light"],
        "nsigma": float(manifest["nsigma"]),
        "inbox": dg.MetadataValue.path(inbox),
        "files_per_s": len(paths) / seconds if seconds > 0 else float("nan"),
        "dagster/row_count": len(table),
    }
    if len(table):
        metadata["n_score_above_0.5"] = int((table["score"] > 0.5).sum())
        metadata["top_candidates"] = dg.MetadataValue.md(table.head(10)[
            ["rank", "objid", "score", "logit", "n_segments", "colour_consistency", "tangential_alignment",
             "source_file"]].to_markdown(index=False, floatfmt=".4f"))
    if gallery:
        metadata["top_candidates_gallery"] = png_markdown(out_dir / gallery, alt="top cluster candidates")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


CLUSTER_SCORING_ASSETS = [cluster_candidates]
