"""Asset `cluster_track_b` (group `clusters`): Track B of the cluster track, a MIL model over arc-segment stamps."""

import json
import time
from typing import Any, Literal

import dagster as dg
import pandas as pd
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import path_metadata, png_markdown, sha256_of_strings, survey_asset
from lens_assets.ml.precision import PRECISIONS
from lens_assets.model_registry import no_retry
from lens_assets.resources.launchers import LocalSubprocessLauncher, TrainingLauncher
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file
from lens_assets.science.surveys import get_survey

TRACK_B_CODE_VERSION = "track-b-2"  # track-b-2: the field-view model
TRAIN_MIL_MODULE = "lens_assets.ml.train_mil"


class ClusterTrackBConfig(dg.Config):
    backbone: str = Field(default="regnetx_002", description="timm backbone embedding each stamp "
                          "(lens_assets.ml.backbones.BACKBONES); the default trains fastest on 32 px stamps on a CPU "
                          "in either precision (benchmarks/bench_track_b.py)")
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=16, ge=1, description="fields per batch")
    lr: float = Field(default=1e-3, gt=0)
    patience: int = Field(default=4, ge=1, description="epochs without a better val AUROC before stopping")
    stamp_px: int = Field(default=32, ge=8, description="side of each segment's stamp, px")
    max_instances: int = Field(default=16, ge=1, description="stamps per field: its segments of highest S/N")
    seed: int = Field(default=0, ge=0)
    precision: Literal[PRECISIONS] = Field(
        default="auto", description="'auto' (bf16-mixed on a GPU or a CPU with native bf16, else 32-true), "
        "'bf16-mixed' or '32-true'")
    max_minutes: float = Field(default=0.0, ge=0.0, description="wall-clock budget of the training; 0 for none")
    workers: int = Field(default=0, description="processes cutting the bags; 0 = every core")
    n_shown: int = Field(default=4, ge=1, description="top-scored test fields drawn with their attention")
    field_view: bool = Field(default=True, description="also train the field-view model (score rows "
                             "'field_view', a fusion component): the same network and training loop on one instance "
                             "per field, the whole field averaged to field_view_arcsec_per_px, with a backbone that "
                             "keeps full resolution in its first stage; it sees arcs that no segment holds")
    field_view_arcsec_per_px: float = Field(default=1.0, gt=0, description="pixel scale of the field overview "
                                            "(a 40\" field is 40 px at 1\"/px on every survey)")
    field_view_backbone: str = Field(default="compact_cnn", description="backbone of the field-view model")
    field_view_epochs: int = Field(default=30, ge=1, description="epochs of the field-view model (the best by "
                                   "val/stop AUROC is kept)")
    pu_labeled: list[int] = Field(default=[], description="labeled lenses of each Elkan–Noto PU model of the MIL "
                                  "network (score rows 'pu_b_<n>' beside Track A's 'pu_<n>'), e.g. [10, 50, 200]; "
                                  "each trains one more network; [] for none; a size above the train split's lenses "
                                  "is skipped with a note")


@survey_asset(group_name="clusters", kinds={"python", "pytorch"}, code_version=TRACK_B_CODE_VERSION,
              # by key: clusters.py imports this module to put Track B in the cluster graph
              deps=[dg.AssetKey("cluster_features"), dg.AssetKey("arc_segments")], pool="gpu")
def cluster_track_b(context: dg.AssetExecutionContext, config: ClusterTrackBConfig, storage: LocalStorage,
                    launcher: TrainingLauncher) -> dg.MaterializeResult:
    """Track B of the cluster track: a multiple-instance model over 32×32 px stamps of each field's arc segments
    (PSF-matched, asinh of the flux over the field's noise); a timm backbone embeds each stamp, gated attention
    pools them to one logit per field. Beside it (``field_view``), the field-view model: the same network on one
    instance per field, the whole field averaged to 1"/px, scored as model ``field_view``. Both are trained on the
    train split by a Pipes job (``lens_assets.ml.train_mil``), the best epoch by val/stop AUROC; scores of the
    test split and the held-out families in Track A's format,
    the val rows' scores for fusion, and each instance's attention weight. With ``pu_labeled``, Elkan–Noto PU
    models of the same network from n labeled lenses (``pu_b_<n>`` rows in the scores, test and held-out only)."""
    from lens_assets.ml.backbones import BACKBONES
    from lens_assets.ml.mil import MIL_CODE_VERSION, build_bag_cache, read_bag_cache

    survey = get_survey(context.partition_key)
    if config.backbone not in BACKBONES or config.field_view_backbone not in BACKBONES:
        raise no_retry(f"cluster_track_b config: backbone {config.backbone!r} / field_view_backbone "
                       f"{config.field_view_backbone!r}; backbones are {sorted(BACKBONES)}")
    if any(n < 2 for n in config.pu_labeled) or len(set(config.pu_labeled)) < len(config.pu_labeled):
        raise no_retry(f"cluster_track_b config: pu_labeled {config.pu_labeled} must hold distinct sizes >= 2 "
                       "(1 labeled lens to fit g, 1 held out for the label frequency)")
    if not launcher.shares_filesystem:  # e.g. EcsLauncher in the deployment: Track B is small enough for the CPU
        context.log.info(f"cluster_track_b trains in this run worker (LocalSubprocessLauncher): "
                         f"{type(launcher).__name__} runs jobs where the bag cache "
                         f"{storage.url(*layout.cluster_track_b_bags(survey.name))} cannot be read")
        launcher = LocalSubprocessLauncher()
    tables = {}
    for name, parts in (("fields", layout.cluster_fields_table(survey.name)),
                        ("segments", layout.cluster_segments_table(survey.name)),
                        ("features", layout.cluster_features_table(survey.name))):
        path = storage.pull(*parts)
        if not path.exists():
            raise no_retry(f"{storage.url(*parts)} does not exist: materialize arc_segments and cluster_features "
                           f"for {survey.name} first")
        tables[name] = path
    features = pd.read_parquet(tables["features"])
    fields = pd.read_parquet(tables["fields"])
    used = features.loc[features["split"].isin(["train", "val", "test", "heldout"]), "objid"]
    fields = fields[fields["objid"].isin(set(used))].sort_values("objid").reset_index(drop=True)
    if len(fields) < len(used):
        raise no_retry(f"{len(used) - len(fields)} fields of the features table are not in the fields table "
                       f"{storage.url(*layout.cluster_fields_table(survey.name))}: materialize them together")

    if config.field_view:  # compact_cnn pools three times: an overview under 8 px has nothing left to pool
        sides = (fields["size_px"] * survey.pixel_scale_arcsec / config.field_view_arcsec_per_px).round()
        if len(sides) and sides.min() < 8:
            raise no_retry(f"cluster_track_b config: field_view_arcsec_per_px {config.field_view_arcsec_per_px} "
                           f"makes a {int(fields['size_px'].min())} px field of {survey.name} an overview of "
                           f"{int(sides.min())} px; it needs at least 8 (at most "
                           f"{fields['size_px'].min() * survey.pixel_scale_arcsec / 8:.2f}\"/px)")
    # the bag cache: cut again only when the fields, their segments or the stamp settings changed
    overview_scale = config.field_view_arcsec_per_px if config.field_view else 0.0
    key = sha256_of_strings([TRACK_B_CODE_VERSION, MIL_CODE_VERSION, str(config.stamp_px), str(config.max_instances),
                             str(overview_scale), sha256_file(tables["segments"]), *fields["source_sha256"]])
    bags_path = storage.pull(*layout.cluster_track_b_bags(survey.name))
    reused = bags_path.exists() and read_bag_cache(bags_path).meta.get("key") == key
    t0 = time.perf_counter()
    if not reused:
        storage.pull(*layout.cluster_raw_survey(survey.name))  # the FITS the bags are cut from (S3: downloaded)
        build_bag_cache(fields, pd.read_parquet(tables["segments"]), root=storage.root_path, survey=survey.name,
                        out=bags_path, stamp_px=config.stamp_px, max_instances=config.max_instances,
                        workers=config.workers, progress=True, key=key, overview_arcsec_per_px=overview_scale)
    bag_seconds = time.perf_counter() - t0
    bags = read_bag_cache(bags_path)
    context.log.info(f"{len(bags)} bags ({int(bags.counts.sum())} instances) "
                     f"{'reused' if reused else f'cut in {bag_seconds:.1f}s'} -> {bags_path}")

    outputs = {"checkpoint": layout.cluster_track_b_checkpoint(survey.name),
               "scores": layout.cluster_track_b_scores(survey.name),
               "val_scores": layout.cluster_track_b_val_scores(survey.name),
               "attention": layout.cluster_track_b_attention(survey.name),
               "calibrator": layout.cluster_track_b_calibrator(survey.name)}
    settings = {"backbone": config.backbone, "epochs": config.epochs, "batch_size": config.batch_size,
                "lr": config.lr, "patience": config.patience, "seed": config.seed, "precision": config.precision,
                "max_minutes": config.max_minutes, "pu_labeled": list(config.pu_labeled),
                "field_view": config.field_view, "field_view_backbone": config.field_view_backbone,
                "field_view_epochs": config.field_view_epochs}
    extras = {"bags_path": str(bags_path), "table_path": str(tables["features"]),
              "outputs": {k: str(storage.path(*v)) for k, v in outputs.items()}, "settings": settings}
    messages = launcher.launch(context, extras=extras, module=TRAIN_MIL_MODULE)
    if not messages:
        raise dg.Failure("the track_b training job reported no summary")
    s = messages[-1]
    storage.push(*layout.cluster_track_b_dir(survey.name))

    scores = pd.read_parquet(storage.path(*outputs["scores"]))
    attention = pd.read_parquet(storage.path(*outputs["attention"]))
    gallery = _attention_gallery(scores, attention, fields, survey, config.n_shown, storage)
    checkpoint = storage.path(*outputs["checkpoint"])
    sha = sha256_file(checkpoint)
    metadata = {
        "path": dg.MetadataValue.path(storage.url(*layout.cluster_track_b_dir(survey.name))),
        "scores": dg.MetadataValue.path(storage.url(*outputs["scores"])),
        "best_val_auroc": _float(s["best_val_auroc"]), "test_auroc": _float(s["test_auroc"]),
        "n_test": int(s["n_test"]),
        "train_img_per_s": float(s["train_instances_per_s"]),  # instances (stamps) per second
        "train_fields_per_s": float(s["train_fields_per_s"]),
        "precision": s["precision"], "device": s["device"], "backbone": config.backbone,
        "epochs_run": int(s["epochs_run"]), "calibration": s["calibration"],
        "val_auroc_by_epoch": dg.MetadataValue.json(s["val_auroc_by_epoch"]),
        "n_bags": len(bags), "mean_instances_per_bag": float(bags.counts.mean()),
        "bags_reused": bool(reused), "bag_seconds": float(bag_seconds),
        "checkpoint": path_metadata(storage, checkpoint), "checkpoint_sha256": sha,
    }
    for family, auroc in s["heldout_auroc"].items():
        metadata[f"heldout_{family}_auroc"] = _float(auroc)
    if config.pu_labeled:
        metadata["pu_label_frequency"] = dg.MetadataValue.json({
            name: {"c": round(float(pu["c"]), 4), "n_labeled": int(pu["n_labeled"]),
                   "n_labeled_holdout": int(pu["n_labeled_holdout"])} for name, pu in s["pu"].items()})
    view = s.get("field_view")
    if view:
        metadata.update({"field_view_test_auroc": _float(view["test_auroc"]),
                         "field_view_best_val_auroc": _float(view["best_val_auroc"]),
                         "field_view_overview_px": int(view["overview_px"]),
                         "field_view_seconds": float(view["seconds"]),
                         "field_view_sha256": sha256_file(storage.path(
                             *layout.cluster_field_view_checkpoint(survey.name)))})
    if s.get("notes"):
        metadata["notes"] = dg.MetadataValue.md("\n".join(f"- {n}" for n in s["notes"]))
    if gallery is not None:
        metadata["attention_gallery"] = png_markdown(gallery, alt="track_b attention on the top test fields")
    version = sha256_of_strings([key, sha, json.dumps(settings, sort_keys=True),
                                 str(metadata.get("field_view_sha256", ""))])
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version[:16]))


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _attention_gallery(scores, attention, fields, survey, n_shown: int, storage: LocalStorage):
    """The top-scored test fields with a circle per instance sized and coloured by its attention weight."""
    from lens_assets.ml.mil import attention_gallery, field_image

    top = scores[(scores["model"] == "track_b") & (scores["set"] == "test")]
    top = top.sort_values("logit", ascending=False).head(n_shown)
    if top.empty:
        return None
    by_id = fields.set_index("objid")
    images, instances, titles = [], [], []
    for r in top.itertuples(index=False):
        f = by_id.loc[r.objid]
        image, _ = field_image(storage.pull(*f["source_file"].split("/")), f["source_file"], survey.name,
                               int(f["size_px"]))
        images.append(image)
        instances.append(attention[attention["objid"] == r.objid])
        titles.append(f"{r.objid[-10:]} p={r.prob:.2f} {'lens' if r.label == 1 else 'non-lens'} ({r.sim_kind})")
    out = storage.path(*layout.cluster_track_b_gallery(survey.name))
    attention_gallery(images, instances, titles, bands=survey.band_names, path=out)
    storage.push(*layout.cluster_track_b_gallery(survey.name))
    return out


CLUSTER_TRACK_B_ASSETS = [cluster_track_b]
