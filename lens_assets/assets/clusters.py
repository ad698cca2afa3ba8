"""Asset group `clusters`: the cluster-scale track — simulated fields, arc segments, features, models, report."""

import hashlib
import io
import json
import time
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from lens_assets import layout
from lens_assets.assets.cluster_track_b import cluster_track_b
from lens_assets.assets._common import (counts_markdown, gallery_from_files, path_metadata, png_markdown,
                                        sha256_of_strings, scan_inbox_folder, survey_asset)
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.clusters.segments import LIGHT_METHODS
from lens_assets.science.fileio import sha256_file
from lens_assets.science.surveys import get_survey

CLUSTER_CODE_VERSION = "cluster-1"
SCORABLE_MODELS = ("track_a", "track_a_no_colour")  # what cluster_candidates can run: XGBoost on the features
# the simulation's own: cluster-2 takes the Einstein radius's enclosed mean within each distinct pixel radius, in
# a stable sort's order (before, pixels at one radius entered one by one in the order numpy's default sort left
# them, which differs between CPUs)
CLUSTER_FIELDS_CODE_VERSION = "cluster-2"
_SHOWN = 6  # fields in each gallery


class ClusterFieldsConfig(dg.Config):
    n_fields: int = Field(default=200, ge=1, description="fields of the training family")
    n_heldout: int | None = Field(default=None, ge=0, description="fields of the held-out family; default "
                                  "n_fields // 4, 0 for none")
    seed: int = Field(default=0, ge=0, description="population seed; a (survey, family, seed) is reproducible")
    family: str = Field(default="cluster", description="cluster family (population = 'cluster')")
    heldout_family: str = Field(default="cluster_heldout", description="held-out cluster family, never trained on")
    workers: int = Field(default=0, description="processes; 0 = every core")


@survey_asset(group_name="clusters", kinds={"python", "fits"}, code_version=CLUSTER_FIELDS_CODE_VERSION)
def cluster_fields(context: dg.AssetExecutionContext, config: ClusterFieldsConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """Simulated cluster fields as inbox-contract FITS (``OBJTYPE = 'cluster_field'``), images in e-/s with MAGZP.

    An elliptical NFW cluster with its BCG and red-sequence members lenses
    background galaxies (and, in cluster–cluster systems, a background group)
    into arcs; non-lenses are the same selected scenes with the deflection off
    (twins) or with arc-like unlensed structure. Written to
    ``clusters/raw/<survey>/sim-<family>-<seed>/`` for the training family and
    its held-out family (``families/cluster*.toml``).
    """
    from lens_assets.science.clusters.catalog import field_survey
    from lens_assets.science.clusters.fields import field_size_px, simulate_cluster_fields
    from lens_assets.science.families import load_family

    survey = get_survey(context.partition_key)
    family, heldout = load_family(config.family), load_family(config.heldout_family)
    for fam in (family, heldout):
        if fam.population != "cluster":
            raise dg.Failure(f"family {fam.name!r} has population {fam.population!r}; cluster fields need "
                             f"population = 'cluster' (e.g. 'cluster', 'cluster_heldout')")
    if heldout.name == family.name:
        raise dg.Failure(f"held-out family {heldout.name!r} is the training family: choose a different one")
    n_heldout = config.n_fields // 4 if config.n_heldout is None else config.n_heldout
    made = {}
    for fam, n, role in ((family, config.n_fields, "train"), (heldout, n_heldout, "heldout")):
        if not n:
            continue
        drop = layout.simulation_drop(fam.name, config.seed)
        t0 = time.perf_counter()
        with storage.staged_dir(f"{survey.name}-clusters-{drop}") as staged:
            truth = simulate_cluster_fields(survey, fam, n_fields=n, seed=config.seed, out_dir=staged,
                                            workers=config.workers, progress=True, role=role)
            dest = storage.publish_dir(staged, *layout.cluster_raw_drop(survey.name, drop))
        seconds = time.perf_counter() - t0
        context.log.info(f"simulated {n} {survey.name} cluster fields ({fam.name}) in {seconds:.1f}s into {dest}")
        made[fam.name] = (drop, dest, truth, seconds)
    drop, dest, truth, seconds = made[family.name]
    size = field_size_px(family, survey)
    shown = truth.groupby("label", group_keys=False).head(_SHOWN // 2).sort_values("label", ascending=False)
    gallery = gallery_from_files([dest / f for f in shown["file"]], [storage.relative(dest / f) for f in shown["file"]],
                                 [f"{k} θE={t:.1f}\"" if lab else k
                                  for k, t, lab in zip(shown["kind"], shown["theta_e"], shown["label"])],
                                 field_survey(survey, size),
                                 storage.path(*layout.cluster_simulated_gallery(survey.name, drop)))
    storage.push(*layout.cluster_simulated_gallery(survey.name, drop))
    lenses = truth[truth["label"] == 1]
    metadata = {
        "path": path_metadata(storage, dest), "family": family.name, "family_sha256": family.sha256,
        "heldout_family": heldout.name, "seed": config.seed, "n_fields": len(truth),
        "n_lenses": len(lenses), "n_nonlenses": int((truth["label"] == 0).sum()), "n_heldout": n_heldout,
        "field_size_px": size, "by_kind": counts_markdown(truth["kind"].value_counts().to_dict(), key="kind"),
        "theta_e_median_arcsec": float(lenses["theta_e"].median()) if len(lenses) else float("nan"),
        "fields_per_s": float(len(truth) / seconds),
        "seconds_by_family": dg.MetadataValue.json({k: round(v[3], 1) for k, v in made.items()}),
        "gallery": png_markdown(gallery, alt="simulated cluster fields"),
    }
    version = sha256_of_strings([survey.name, str(config.seed), CLUSTER_CODE_VERSION,
                                 f"{family.sha256}:{config.n_fields}",
                                 f"{heldout.sha256}:{n_heldout}"])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))


class ArcSegmentsConfig(dg.Config):
    field_size_arcsec: float = Field(default=40.0, gt=0, description="side of the grid fields are read on (the "
                                     "cluster family's field); smaller files are refused as too_small, "
                                     "larger ones are segmented whole")
    light: Literal[LIGHT_METHODS] = Field(
        default="median", description="how the cluster's light is removed before segmentation: 'median' (box "
        "median filter) or 'model' (elliptical radial-median models of the galaxies)")
    nsigma: float = Field(default=2.0, gt=0, description="detection threshold of the residual, in noise units")
    workers: int = Field(default=0, description="processes; 0 = every core")


@survey_asset(group_name="clusters", kinds={"python", "photutils"}, code_version=CLUSTER_CODE_VERSION,
              deps=[cluster_fields])
def arc_segments(context: dg.AssetExecutionContext, config: ArcSegmentsConfig,
                 storage: LocalStorage) -> dg.MaterializeResult:
    """Arc segments of every cluster field under ``clusters/raw/<survey>/``: the cluster's light removed, the
    residual segmented and deblended (photutils), per segment its PSF-matched photometry in every band (nanomaggies,
    with variance), shape, length, curvature and alignment to the BCG. Every file is a field row or a quarantine
    row with its reason."""
    from lens_assets.science.clusters.catalog import process_fields
    from lens_assets.science.ingest import relative_names

    survey = get_survey(context.partition_key)
    if config.light not in ("median", "model"):
        raise dg.Failure(f"light {config.light!r} is not one of ['median', 'model']")
    size = int(round(config.field_size_arcsec / survey.pixel_scale_arcsec))
    size += size % 2
    storage.pull(*layout.cluster_raw_survey(survey.name))
    root = storage.path(*layout.cluster_raw_survey(survey.name))
    files, unread = scan_inbox_folder(context, storage, root, what="cluster fields")
    paths, names = relative_names(files, storage.root_path)
    if not paths:
        raise dg.Failure(f"no cluster fields under {storage.url(*layout.cluster_raw_survey(survey.name))}: "
                         f"materialize cluster_fields or copy FITS there")
    t0 = time.perf_counter()
    fields, segments, quarantine = process_fields(paths, names, survey, size_px=size, light=config.light,
                                                  nsigma=config.nsigma, workers=config.workers)
    seconds = time.perf_counter() - t0
    if len(fields) + len(quarantine) != len(paths):  # every file is one or the other
        raise dg.Failure(f"{len(paths)} files gave {len(fields)} fields and {len(quarantine)} quarantined")
    storage.write_parquet(fields, *layout.cluster_fields_table(survey.name))
    storage.write_parquet(segments, *layout.cluster_segments_table(survey.name))
    storage.write_parquet(quarantine, *layout.cluster_quarantine_table(survey.name))
    # what cluster_classifier records as its training fields' settings (the manifest's, so drops are read the same)
    settings = {"field_size_px": size, "light": config.light, "nsigma": float(config.nsigma),
                "code_version": CLUSTER_CODE_VERSION}
    storage.write_text(json.dumps(settings, indent=2), *layout.cluster_segments_settings(survey.name))
    metadata = {
        "path": dg.MetadataValue.path(storage.url(*layout.cluster_segments_table(survey.name))),
        "n_files": len(paths), "n_fields": len(fields), "n_quarantined": len(quarantine), **unread,
        "n_segments": len(segments), "fields_per_s": float(len(paths) / seconds) if seconds else 0.0,
        "light": config.light, "field_size_px": size, "nsigma": float(config.nsigma),
    }
    if len(quarantine):
        metadata["quarantine_reasons"] = counts_markdown(quarantine["reason"].value_counts().to_dict(), key="reason")
    if len(fields):
        per = fields.groupby("label")["n_segments"].median()
        metadata["median_segments_by_label"] = dg.MetadataValue.json({str(k): float(v) for k, v in per.items()})
        gallery = _segments_gallery(fields, segments, survey, size, config, storage)
        metadata["gallery"] = png_markdown(gallery, alt="arc segments")
    version = sha256_of_strings([CLUSTER_CODE_VERSION, config.light, str(config.nsigma), str(size),
                                 *sorted(fields["source_sha256"])])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))


def _segments_gallery(fields, segments, survey, size, config, storage):
    """Segment outlines over a few lenses and non-lenses (the field re-read and segmented again to draw them)."""
    from lens_assets.science.clusters.catalog import segmented_field
    from lens_assets.science.clusters.segments import segments_grid

    shown = fields.groupby("label", group_keys=False).head(_SHOWN // 2).sort_values("label", ascending=False)
    panels = [segmented_field(storage.path(*f.split("/")), f, survey, size_px=size, light=config.light,
                              nsigma=config.nsigma) for f in shown["source_file"]]
    out = storage.path(*layout.cluster_segments_gallery(survey.name))
    titles = [f"{k} ({n} seg)" for k, n in zip(shown["sim_kind"], shown["n_segments"])]
    segments_grid(panels, titles, path=out)
    storage.push(*layout.cluster_segments_gallery(survey.name))
    return out


class ClusterFeaturesConfig(dg.Config):
    train_families: list[str] = Field(default=["cluster"], description="simulation families the splits are made "
                                      "of (with fields of observed labels); every other labeled family is held out: "
                                      "scored, never trained on")
    fractions: list[float] = Field(default=[0.6, 0.2, 0.2], description="train, val, test shares (val halves: "
                                   "stop for early stopping, calibrate for the calibrator)")
    seed: int = Field(default=0, ge=0)


@survey_asset(group_name="clusters", kinds={"python", "pandas"}, code_version=CLUSTER_CODE_VERSION,
              deps=[arc_segments])
def cluster_features(context: dg.AssetExecutionContext, config: ClusterFeaturesConfig,
                     storage: LocalStorage) -> dg.MaterializeResult:
    """Physics features per cluster field (pandera-typed): colour consistency of the segments after the
    differential-extinction solve (CCM89), colours and their dispersion, tangential alignment, curvature,
    segment counts and lengths, BCG-distance statistics and the observing context; with each field's split."""
    from lens_assets.science.clusters.features import cluster_features_schema
    from lens_assets.science.clusters.scoring import field_features
    from lens_assets.science.clusters.catalog import split_fields
    from lens_assets.science.splits import has_role

    survey = get_survey(context.partition_key)
    for parts in (layout.cluster_fields_table(survey.name), layout.cluster_segments_table(survey.name)):
        storage.pull(*parts)
    fields = pd.read_parquet(storage.path(*layout.cluster_fields_table(survey.name)))
    segments = pd.read_parquet(storage.path(*layout.cluster_segments_table(survey.name)))
    bands = survey.band_names
    # the same per-field loop cluster_candidates runs on a drop
    table = field_features(fields, segments, bands=bands, wavelengths_nm=[b.wavelength_nm for b in survey.bands])
    table.insert(1, "survey", survey.name)
    table.insert(2, "label", fields["label"].astype(int).to_numpy())
    schema = cluster_features_schema(bands)
    table = schema.validate(table[list(schema.columns)])
    heldout_families = sorted(set(fields["sim_family"]) - set(config.train_families) - {""})
    splits = split_fields(fields, survey, fractions=tuple(config.fractions), seed=config.seed,
                          heldout_families=tuple(heldout_families))
    keep = ["objid", "sim_family", "sim_kind", "theta_e", "n_arcs", "arc_sb", "group", "source_file", "source_sha256"]
    table = table.merge(fields[keep], on="objid", validate="one_to_one").merge(splits, on="objid", how="left",
                                                                               validate="one_to_one")
    # held-out families (by name or by the files' SIMROLE) are scored, never trained on; other rows outside the
    # splits (unlabeled) are left out
    by_role = table["objid"].isin(fields.loc[has_role(fields, "heldout"), "objid"])
    held = (table["sim_family"].isin(heldout_families) | by_role) & table["label"].isin([0, 1])
    table["split"] = table["split"].fillna(pd.Series(np.where(held, "heldout", "excluded"), index=table.index))
    table["val_role"] = table["val_role"].fillna("")
    settings_file = storage.pull(*layout.cluster_segments_settings(survey.name))
    if not settings_file.exists():
        raise dg.Failure(f"{storage.url(*layout.cluster_segments_settings(survey.name))} does not exist: materialize "
                         f"arc_segments for {survey.name} again (its settings follow the features to the model)")
    settings = {**json.loads(settings_file.read_text()),
                "segments_sha256": sha256_file(storage.path(*layout.cluster_segments_table(survey.name)))}
    storage.write_parquet(table, *layout.cluster_features_table(survey.name))
    storage.write_text(json.dumps(settings, indent=2), *layout.cluster_features_settings(survey.name))
    counts = table.groupby(["split", "label"]).size().rename("n").reset_index()
    metadata = {
        "path": dg.MetadataValue.path(storage.url(*layout.cluster_features_table(survey.name))),
        "n_fields": len(table),
        "heldout_families": ",".join(heldout_families),
        "splits": dg.MetadataValue.md(counts.to_markdown(index=False)),
        "median_colour_consistency_by_label": dg.MetadataValue.json(
            {str(k): float(v) for k, v in table.groupby("label")["colour_consistency"].median().items()}),
        "median_tangential_alignment_by_label": dg.MetadataValue.json(
            {str(k): float(v) for k, v in table.groupby("label")["tangential_alignment"].median().items()}),
    }
    version = sha256_of_strings([CLUSTER_CODE_VERSION, json.dumps(config.model_dump(), sort_keys=True),
                                 *sorted(table["source_sha256"])])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))


class ClusterClassifierConfig(dg.Config):
    n_estimators: int = Field(default=400, ge=1)
    learning_rate: float = Field(default=0.05, gt=0)
    max_depth: int = Field(default=4, ge=1)
    early_stopping_rounds: int = Field(default=30, ge=1)
    pu_labeled: list[int] = Field(default=[10, 50, 200], description="labeled lenses of each PU model")
    seed: int = Field(default=0, ge=0)


@survey_asset(group_name="clusters", kinds={"python", "xgboost"}, code_version=CLUSTER_CODE_VERSION,
              deps=[cluster_features])
def cluster_classifier(context: dg.AssetExecutionContext, config: ClusterClassifierConfig,
                       storage: LocalStorage) -> dg.MaterializeResult:
    """Track A of the cluster track: XGBoost on the physics features (monotone in colour consistency and
    tangential alignment, against seeing), early-stopped and isotonically calibrated on separate halves of
    the val split; the same without colours; and PU-learned models from few labeled lenses. Scores of the
    test split and the held-out family for every model (``scores.parquet``)."""
    from lens_assets.science.clusters.models import component_table, fit_cluster_models
    from lens_assets.science.clusters.track_a import TrackAConfig, plot_partial_dependence

    survey = get_survey(context.partition_key)
    # the settings of the segments the features were made from (cluster_features' copy, not arc_segments' latest)
    settings_file = storage.pull(*layout.cluster_features_settings(survey.name))
    if not settings_file.exists():
        raise dg.Failure(f"{storage.url(*layout.cluster_features_settings(survey.name))} does not exist: materialize "
                         f"cluster_features for {survey.name} again; the arc_segments settings it records go into the "
                         "model's training record")
    segment_settings = json.loads(settings_file.read_text())
    features_bytes = storage.pull(*layout.cluster_features_table(survey.name)).read_bytes()  # hashed as read
    table = pd.read_parquet(io.BytesIO(features_bytes))
    cfg = TrackAConfig(n_estimators=config.n_estimators, learning_rate=config.learning_rate,
                       max_depth=config.max_depth, early_stopping_rounds=config.early_stopping_rounds,
                       seed=config.seed)
    try:
        models = fit_cluster_models(table, bands=survey.band_names, config=cfg, pu_labeled=tuple(config.pu_labeled),
                                    seed=config.seed)
    except ValueError as err:
        raise dg.Failure(str(err)) from None
    out_dir = storage.path(*layout.cluster_models_dir(survey.name))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in models.track_a.items():
        model.save(storage.path(*layout.cluster_model_file(survey.name, name)))
        storage.write_text(json.dumps(models.calibrators[name].to_dict()),
                           *layout.cluster_calibrator_file(survey.name, name))
    # which files each XGBoost model's scores came from: cluster_report vets the file it judged, never a later one
    shas = {name: sha256_file(storage.path(*layout.cluster_model_file(survey.name, name))) for name in models.track_a}
    models.scores["model_sha256"] = models.scores["model"].map(shas).fillna("")
    storage.write_parquet(models.scores, *layout.cluster_scores_table(survey.name))
    models.anomaly.save(storage.path(*layout.cluster_anomaly_file(survey.name)))
    storage.write_text(json.dumps(models.calibrators["anomaly"].to_dict()),
                       *layout.cluster_calibrator_file(survey.name, "anomaly"))
    storage.write_parquet(component_table(table, models), *layout.cluster_components_table(survey.name))
    main = models.track_a["track_a"]
    train = table[table["split"] == "train"]
    top = main.importance().sort_values("gain", ascending=False)["feature"].head(4).tolist()
    pd_plot = plot_partial_dependence({f: main.partial_dependence(train, f) for f in top},
                                      storage.path(*layout.cluster_partial_dependence(survey.name)), title="track_a")
    written = [p for name in models.track_a for p in (layout.cluster_model_file(survey.name, name),
                                                      _sidecar_of(layout.cluster_model_file(survey.name, name)),
                                                      layout.cluster_calibrator_file(survey.name, name))]
    written += [layout.cluster_anomaly_file(survey.name), layout.cluster_calibrator_file(survey.name, "anomaly")]
    training = {"survey": survey.name, "segments": segment_settings,
                "features_file": layout.relative(layout.cluster_features_table(survey.name)),
                "features_sha256": hashlib.sha256(features_bytes).hexdigest(),
                "files": {layout.relative(p): sha256_file(storage.path(*p)) for p in written},
                "config": config.model_dump(), "code_version": CLUSTER_CODE_VERSION}
    # last: a training record names only complete files (write_cluster_manifest checks the copies it vets against it)
    storage.write_text(json.dumps(training, indent=2), *layout.cluster_training_doc(survey.name))
    storage.push(*layout.cluster_models_dir(survey.name))
    imp = main.importance().sort_values("gain", ascending=False).head(12)
    metadata = {
        "path": path_metadata(storage, out_dir),
        "models": ",".join(models.scores["model"].unique()),
        "best_iteration": main.best_iteration,
        "scale_pos_weight": float(main.scale_pos_weight),
        "importance": dg.MetadataValue.md(imp.to_markdown(index=False, floatfmt=".3f")),
        "partial_dependence": png_markdown(pd_plot, alt="partial dependence"),
        "pu_label_frequency": dg.MetadataValue.json({k: round(float(v.c), 4) for k, v in models.pu.items()}),
    }
    if models.notes:
        metadata["notes"] = dg.MetadataValue.md("\n".join(f"- {n}" for n in models.notes))
    metadata["features_sha256"] = training["features_sha256"]
    version = sha256_of_strings([CLUSTER_CODE_VERSION, json.dumps(config.model_dump(), sort_keys=True),
                                 *(f"{k}:{v}" for k, v in sorted(training["files"].items())),
                                 sha256_file(storage.path(*layout.cluster_training_doc(survey.name)))])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))


def _sidecar_of(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The ``<member>.meta.json`` ``TrackAModel.save`` writes beside a model file."""
    return (*parts[:-1], parts[-1][: -len(".json")] + ".meta.json")


class ClusterFusionConfig(dg.Config):
    components: list[str] = Field(default=["track_a", "track_b", "field_view", "colour_consistency", "anomaly"],
                                  description="per-field scores fused: Track A's and Track B's logits, the field-view "
                                  "model's logit (cluster_track_b), the colour consistency feature and the Deep SVDD "
                                  "anomaly score")
    max_fpr: float = Field(default=0.1, gt=0, le=1, description="the weights maximize the partial AUC up to this "
                           "false-positive rate on the val split's calibrate half (the stop half, on which the "
                           "tracks were early-stopped and selected, is not used)")
    seed: int = Field(default=0, ge=0)


@survey_asset(group_name="clusters", kinds={"python", "scipy"}, code_version=CLUSTER_CODE_VERSION,
              deps=[cluster_classifier, cluster_track_b])
def cluster_fusion(context: dg.AssetExecutionContext, config: ClusterFusionConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """The tracks fused: Track A's, Track B's and the field-view model's logits, the colour-consistency score and
    the anomaly score,
    standardized and weighted to maximize a smooth partial AUC at FPR ≤ ``max_fpr`` on the val split's calibrate
    half, which no track selected on (scipy ``minimize``), then calibrated (isotonic) on out-of-fold fused scores of
    the same rows; every field must have a Track B score. Writes the fusion and the table of
    every model's scores the report reads (Track A's models, Track B's models, ``pu_b_<n>`` included, and
    ``fused``)."""
    from lens_assets.science.clusters.models import fuse_scores

    survey = get_survey(context.partition_key)
    parts = {"components": layout.cluster_components_table(survey.name),
             "scores": layout.cluster_scores_table(survey.name),
             "track_b": layout.cluster_track_b_scores(survey.name),
             "track_b_val": layout.cluster_track_b_val_scores(survey.name)}
    frames = {}
    for name, p in parts.items():
        path = storage.pull(*p)
        if not path.exists():
            raise dg.Failure(f"{storage.url(*p)} does not exist: materialize cluster_classifier and cluster_track_b "
                             f"for {survey.name} first")
        frames[name] = pd.read_parquet(path)
    # Track B's file also holds its PU models' rows (pu_b_<n>): the track_b component is the track_b model's logit
    # and the field-view model's (field_view)
    track_b = pd.concat([frames["track_b"], frames["track_b_val"]], ignore_index=True)
    components = frames["components"]
    for model in ("track_b", "field_view"):
        rows = track_b.loc[track_b["model"] == model, ["objid", "logit"]].rename(columns={"logit": model})
        if model in config.components and rows.empty:
            raise dg.Failure(f"cluster_fusion: component {model!r} has no scores in "
                             f"{storage.url(*parts['track_b'])}: materialize cluster_track_b"
                             f"{' with field_view: true' if model == 'field_view' else ''}, or leave it out of "
                             "components")
        components = components.merge(rows, on="objid", how="left", validate="one_to_one")
    try:
        fused, fusion = fuse_scores(components, components=list(config.components), max_fpr=config.max_fpr,
                                    seed=config.seed,
                                    required=[c for c in ("track_b", "field_view") if c in config.components])
    except ValueError as err:
        raise dg.Failure(f"cluster_fusion: {err}") from None
    storage.write_text(json.dumps(fusion.to_dict()), *layout.cluster_fusion_file(survey.name))
    tables = (frames["scores"], frames["track_b"].reindex(columns=frames["scores"].columns), fused)
    scores = pd.concat([p for p in tables if len(p)], ignore_index=True)  # Track B's is empty where it never ran
    storage.write_parquet(scores, *layout.cluster_report_scores(survey.name))
    weights = pd.DataFrame({"component": list(fusion.weights), "weight": list(fusion.weights.values())})
    metadata = {
        "path": dg.MetadataValue.path(storage.url(*layout.cluster_fusion_file(survey.name))),
        "weights": dg.MetadataValue.md(weights.to_markdown(index=False, floatfmt="+.3f")),
        "n_fit_lenses": int(fusion.n_fit_lenses), "n_fit_nonlenses": int(fusion.n_fit_nonlenses),
        "allowed_false_positives": int(fusion.k),
        "n_imputed_scored": dg.MetadataValue.json(fusion.n_imputed_scored),
        "models": ",".join(scores["model"].unique()),
    }
    if fusion.notes:
        metadata["notes"] = dg.MetadataValue.md("\n".join(f"- {n}" for n in fusion.notes))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(sha256_of_strings([
        CLUSTER_CODE_VERSION, json.dumps(config.model_dump(), sort_keys=True),
        *(sha256_file(storage.path(*p)) for p in (layout.cluster_fusion_file(survey.name),
                                                  layout.cluster_report_scores(survey.name)))])[:16]))


class ClusterReportConfig(dg.Config):
    min_auroc: float = Field(default=0.80, ge=0, le=1, description="gate: AUROC of the scoring model on the test "
                             "split")
    min_heldout_auroc: float = Field(default=0.75, ge=0, le=1, description="gate: AUROC of the scoring model on "
                                     "every held-out family")
    min_tpr_at_fpr_0_1: float = Field(default=0.5, ge=0, le=1, description="gate: test TPR at FPR ≤ 0.1 of the "
                                      "scoring model")
    scoring_model: Literal[SCORABLE_MODELS] = Field(
        default="track_a", description="the model whose gates decide whether cluster drops are scored with it: an "
        "XGBoost model of cluster_classifier ('track_a' or 'track_a_no_colour'); when every gate passes it becomes "
        "the survey's scoring model (clusters/models/<survey>/manifest.json)")


# blocking: a failed gate fails the run after the report is written, and the model is not made the one that scores
# cluster drops
CLUSTER_REPORT_CHECKS = [dg.AssetCheckSpec(name, asset="cluster_report", blocking=True, description=text)
                         for name, text in (
    ("cluster_auroc_at_least_gate", "test AUROC of the scoring model ≥ min_auroc"),
    ("cluster_heldout_auroc_at_least_gate", "AUROC of the scoring model on every held-out family ≥ "
                                            "min_heldout_auroc (fails when no held-out family has both classes)"),
    ("cluster_tpr_at_fpr_0_1_at_least_gate", "test TPR at FPR ≤ 0.1 of the scoring model ≥ min_tpr_at_fpr_0_1"),
    ("every_model_on_every_set", "every model (those scored, the scoring model, the fused score and every model "
                                 "the fusion combined) has figures on the test split and on every held-out family "
                                 "the fusion scored"),
)]


def cluster_report_checks(figures: dict, config: ClusterReportConfig, *, expected_models: tuple = (),
                          expected_sets: tuple = ()) -> list:
    """The cluster report's gate checks on ``figures`` (:func:`..science.clusters.report.cluster_figures`).

    ``expected_models`` and ``expected_sets`` come from outside the scores checked (the fusion's components and
    the sets it scored): a model or set they name that has no figures at all fails ``every_model_on_every_set``,
    as does a (model, set) of the figures without both classes."""
    nan = float("nan")
    main = figures.get(config.scoring_model, {})
    test = main.get("test", {})
    held = {name: f.get("auroc", nan) for name, f in main.items() if name != "test"}
    sets = sorted({name for sets in figures.values() for name in sets} | set(expected_sets))
    models = [*figures, *sorted(set(expected_models) - set(figures))]
    missing = [f"{m}/{name}" for m in models for name in sets if "auroc" not in figures.get(m, {}).get(name, {})]
    auroc, tpr = float(test.get("auroc", nan)), float(test.get("tpr_at_fpr_0.1", nan))
    return [
        dg.AssetCheckResult(check_name="cluster_auroc_at_least_gate", passed=bool(auroc >= config.min_auroc),
                            metadata={"auroc": auroc, "gate": config.min_auroc, "model": config.scoring_model}),
        dg.AssetCheckResult(
            check_name="cluster_heldout_auroc_at_least_gate",
            passed=bool(held) and all(v >= config.min_heldout_auroc for v in held.values()),
            metadata={"auroc": dg.MetadataValue.json({k: float(v) for k, v in held.items()}),
                      "gate": config.min_heldout_auroc, "model": config.scoring_model}),
        dg.AssetCheckResult(check_name="cluster_tpr_at_fpr_0_1_at_least_gate",
                            passed=bool(tpr >= config.min_tpr_at_fpr_0_1),
                            metadata={"tpr_at_fpr_0.1": tpr, "gate": config.min_tpr_at_fpr_0_1,
                                      "model": config.scoring_model}),
        dg.AssetCheckResult(check_name="every_model_on_every_set", passed=not missing and bool(sets),
                            metadata={"missing": ", ".join(missing) or "none", "sets": ", ".join(sets),
                                      "models": ", ".join(models)}),
    ]


@survey_asset(group_name="clusters", kinds={"python", "markdown"}, code_version=CLUSTER_CODE_VERSION,
              deps=[cluster_fusion], check_specs=CLUSTER_REPORT_CHECKS)
def cluster_report(context: dg.AssetExecutionContext, config: ClusterReportConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """The cluster track's Bologna figures per model on the test split and the held-out family (AUROC with a
    bootstrap interval, AUPRC, TPR0, TPR10 with counts, TPR at FPR 0.1), the colour-consistency ablation, PU
    learning from 10/50/200 labeled lenses against full labels, and recall by number of arcs and arc surface
    brightness."""
    from lens_assets.science.clusters.models import FEATURE_COMPONENTS
    from lens_assets.science.clusters.report import cluster_figures, report_markdown

    survey = get_survey(context.partition_key)
    scores = pd.read_parquet(storage.pull(*layout.cluster_report_scores(survey.name)))
    figures = cluster_figures(scores)
    if config.scoring_model not in SCORABLE_MODELS or config.scoring_model not in figures:
        raise dg.Failure(f"cluster_report config scoring_model {config.scoring_model!r}: cluster drops are scored by "
                         f"one of {list(SCORABLE_MODELS)}; this report has {sorted(figures)}")
    md = report_markdown(figures, survey=survey.name, notes=[
        "track_a: XGBoost on every feature; track_a_no_colour: without the colour features; pu_<n>: Elkan–Noto "
        "PU learning from n labeled lenses among the training fields; anomaly: Deep SVDD distance, fit on training "
        "non-lenses alone; track_b: attention-pooled CNN over the arc-segment stamps; pu_b_<n>: Track B "
        "PU-learned from n labeled lenses; field_view: CNN over the whole field at 1\"/px; fused: the fusion's "
        "components (default track_a, track_b, field_view, colour consistency and anomaly) weighted for recall at "
        "FPR ≤ 0.1 on the val split's calibrate half",
        "recall by lensed sources and arc surface brightness at each (model, set)'s FPR ≤ 0.1 threshold"])
    storage.write_text(json.dumps(figures, indent=1), *layout.cluster_report_json(survey.name))
    storage.write_text(md, *layout.cluster_report_md(survey.name))
    metadata = {"report_path": dg.MetadataValue.path(storage.url(*layout.cluster_report_md(survey.name))),
                "summary": dg.MetadataValue.md(md)}
    for model, sets in figures.items():
        for name, f in sets.items():
            if "auroc" in f:
                prefix = f"{model}_" + ("" if name == "test" else f"{name}_")
                metadata[f"{prefix}auroc"] = float(f["auroc"])
                metadata[f"{prefix}tpr10"] = float(f["tpr10"])
    # what the scores must cover, from outside them: every set the fusion scored (the test split and each held-out
    # family), the fused score and every model it combined (the scoring model is required above)
    fusion = json.loads(storage.pull(*layout.cluster_fusion_file(survey.name)).read_text())
    checks = cluster_report_checks(
        figures, config, expected_sets=tuple(sorted(fusion.get("n_imputed_scored", {}))),
        expected_models=("fused", *(c for c in fusion["components"] if c not in FEATURE_COMPONENTS)))
    if all(c.passed for c in checks):  # vetted: it scores the survey's cluster drops from now on
        judged = scores.loc[scores["model"] == config.scoring_model, "model_sha256"].dropna().unique().tolist()
        manifest = _write_manifest(storage, survey.name, config.scoring_model, judged_sha256=judged)
        metadata["cluster_model_version"] = manifest["version"]
        context.log.info(f"{config.scoring_model} passed every gate: it scores {survey.name}'s cluster drops "
                         f"(model version {manifest['version']})")
    else:
        failed = [c.check_name for c in checks if not c.passed]
        metadata["cluster_model_version"] = "not vetted: " + ", ".join(failed)
        context.log.warning(f"{config.scoring_model} failed {failed}: the survey's scoring model is left as it was")
    version = sha256_of_strings([CLUSTER_CODE_VERSION, json.dumps(config.model_dump(), sort_keys=True),
                                 metadata["cluster_model_version"],
                                 sha256_file(storage.path(*layout.cluster_report_json(survey.name)))])
    return dg.MaterializeResult(metadata=metadata, check_results=checks, data_version=dg.DataVersion(version[:16]))


def _write_manifest(storage: LocalStorage, survey: str, model: str, *, judged_sha256: list) -> dict:
    """The survey's cluster manifest for ``model`` (its files copied to ``vetted/<version>/``), with the
    ``arc_segments`` settings and the features table's sha256 that ``cluster_classifier`` recorded in
    ``training.json`` when it trained the model."""
    from lens_assets.cluster_registry import write_cluster_manifest

    path = storage.pull(*layout.cluster_training_doc(survey))
    if not path.exists():
        raise dg.Failure(f"{storage.url(*layout.cluster_training_doc(survey))} does not exist: materialize "
                         f"cluster_classifier for {survey} again (it records the arc_segments settings and the "
                         "features the model was trained on, which go into the manifest)")
    training = json.loads(path.read_text())
    trained = training["files"].get(layout.relative(layout.cluster_model_file(survey, model)))
    if judged_sha256 != [trained]:  # a retrain since cluster_fusion: the gates judged another model
        raise dg.Failure(f"the report judged {model} {[s[:16] for s in judged_sha256]}, but the trained model is now "
                         f"{str(trained)[:16]}: materialize cluster_fusion and cluster_report again to judge it")
    seg = training["segments"]
    try:
        return write_cluster_manifest(storage, survey, field_size_px=int(seg["field_size_px"]), light=str(seg["light"]),
                                      nsigma=float(seg["nsigma"]), code_version=str(seg["code_version"]), model=model,
                                      features_sha256=training["features_sha256"], trained_sha256=training["files"])
    except (ValueError, FileNotFoundError) as err:
        raise dg.Failure(str(err)) from None


CLUSTER_ASSETS = [cluster_fields, arc_segments, cluster_features, cluster_classifier, cluster_track_b, cluster_fusion,
                  cluster_report]
