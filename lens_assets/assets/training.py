"""Asset group `training`: the per-survey ensemble, one Pipes training job per member."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import path_metadata, sha256_of_strings, survey_asset
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.ml.fresh import RENDERERS as FRESH_RENDERERS
from lens_assets.ml.precision import PRECISIONS
from lens_assets.model_registry import no_retry
from lens_assets.resources.launchers import TrainingLauncher
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file
from lens_assets.science.surveys import get_survey

TRAINING_CODE_VERSION = "train-3"  # 2: bf16 on bf16 CPUs, channels_last, noise scale over measured pixels;
# 3: theta_e_balance


class TrainConfig(dg.Config):
    members: list[str] = Field(default=["regnetx_002"], description="backbones (lens_assets.ml.backbones.BACKBONES), "
                               "one job each")
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = Field(default=0, ge=0)
    patience: int = Field(default=5, ge=1, description="epochs without a better validation AUROC before stopping")
    precision: Literal[PRECISIONS] = Field(
        default="auto", description="'auto' (bf16-mixed on a GPU or a CPU with native bf16, else 32-true), "
        "'bf16-mixed' or '32-true'")
    film: bool = Field(default=False, description="condition each member's pooled features on the observing "
                       "conditions (PSF FWHM before matching, noise, band presence) with FiLM")
    colour_residual: bool = Field(default=False, description="add the RingFinder band difference (bluest band minus "
                                  "the reference band scaled to cancel the deflector's centre) as an input channel")
    radial_residual: bool = Field(default=False, description="add each band less its radial median profile about "
                                  "the centre (the round deflector removed, faint arcs kept) as input channels")
    elliptical_residual: bool = Field(default=False, description="add each band less its median on ellipses of "
                                      "the deflector's shape (adaptive moments about the centre) as input "
                                      "channels: radial_residual for elliptical deflectors; not with it")
    ema_epochs: float = Field(default=0.0, ge=0.0, description="validate, select and score with an exponential "
                              "moving average of each member's weights over about this many epochs (updated every "
                              "step, batch-norm statistics alike); 0: the weights as trained")
    head_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on each member's pooled "
                                "features before its classifier; > 0 also gives candidates an MC-dropout "
                                "uncertainty (scoring draws the head several times)")
    upsample: int = Field(default=1, ge=1, le=4, description="upsample each member's input this many times "
                          "(bilinear) before the backbone: more of its feature map for arcs a few pixels wide, at "
                          "upsample² the compute")
    zoom_max: float = Field(default=1.0, ge=1.0, le=3.0, description="magnify each training cutout about its "
                            "centre by a factor drawn log-uniformly from [1, zoom_max] (Einstein radius, deflector "
                            "and PSF alike; surface brightness kept, the noise restored to the variance); 1: off")
    float32_stem: bool = Field(default=False, description="run each member's first convolution in float32 under "
                               "bf16 autocast: the scaled input is not rounded to bf16, whose step near a bright "
                               "deflector is as large as the pixel noise; no effect in float32")
    arc_attention: bool = Field(default=False, description="add a tangential self-attention branch about the "
                                "stamp's centre (polar resampling, attention over angle at each radius) whose logit "
                                "is added to the backbone's")
    fresh_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="share of every training batch "
                                  "replaced by objects simulated on the fly (simulated, written, read and "
                                  "PSF-matched as the shards were), deterministic from the seed")
    fresh_family: str = Field(default="physical", description="simulation family of the fresh objects")
    fresh_renderer: Literal[FRESH_RENDERERS] = Field(default="torch", description="'torch' (batched, "
                                                     "ml/torch_render) or 'lenstronomy'")
    theta_e_balance: float = Field(default=0.0, ge=0.0, le=1.0, description="draw training rows with weight "
                                   "share^-alpha of their scene's Einstein radius bin (SCENE_TE; in the physical "
                                   "population a lens and the non-lenses of its scene alike, elsewhere non-lenses "
                                   "have none and weigh the mean): 0 the population's own distribution, 1 every "
                                   "radius bin equally often (weights capped at 10x); not with fresh_fraction")
    physics_weight: float = Field(default=0.0, ge=0.0, description="weight of the physics-consistency loss: a "
                                  "head regresses an SIE + shear lens and a source, the lensed light they imply is "
                                  "compared with the deflector-subtracted cutout in noise units, gated by the "
                                  "predicted lens probability; 0 for none")
    physics_warmup_epochs: int = Field(default=2, ge=1, description="epochs over which the physics weight rises "
                                       "from 0 (curriculum)")
    max_minutes: float = Field(default=0.0, ge=0.0, description="wall-clock budget of each member's training "
                               "(counted over resumed starts too); 0 for none: the epochs decide")
    weights_path: str = Field(default="", description="initial backbone weights, a file the training job can read "
                              "(state dict, safetensors or another member's checkpoint); '' for random weights")
    cache_gb: float = Field(default=-1.0, description="memory (GB) for the training and validation rows kept "
                            "decompressed after their first read, so later epochs do not decompress them again (the "
                            "same arrays either way); negative: 0.4 of the memory available when training starts "
                            "(per training process: jobs started together on one host each take it), 0: off")


def write_ensemble(storage: LocalStorage, survey: str, ensemble: dict):
    """``models/<survey>/ensemble.json``: the members scoring uses, checkpoints relative to the data root."""
    return storage.write_text(json.dumps(ensemble, indent=2), *layout.ensemble_manifest(survey))


def training_lineage(storage: LocalStorage, survey: str) -> dict:
    """What the ensemble was trained on: the shard manifest, the splits file and the simulation families."""
    import pandas as pd

    from lens_assets.science.families import available_families, load_family

    manifest = json.loads(storage.path(*layout.shards_manifest(survey)).read_text())
    splits = storage.path(*layout.splits_table(survey))
    catalog = storage.pull(*layout.catalog_table(survey))
    families = (sorted(set(pd.read_parquet(catalog, columns=["sim_family"])["sim_family"]) - {""})
                if catalog.exists() else [])  # shards and splits can be given without their catalog
    known = available_families()
    return {"shards_manifest_sha256": manifest["sha256"],
            "target_fwhm_arcsec": manifest["settings"]["target_fwhm_arcsec"], "shard_settings": manifest["settings"],
            "splits_sha256": sha256_file(splits),
            "simulation_families": {f: load_family(f).sha256 if f in known else "unknown" for f in families}}


def remote_store(storage: LocalStorage, launcher: TrainingLauncher) -> dict | None:
    """For a launcher whose jobs do not see this cache: the S3 store they sync with (a clear failure when
    the storage is local, which such a job cannot reach)."""
    if launcher.shares_filesystem:
        return None
    from lens_assets.resources.s3_storage import S3Storage

    if not isinstance(storage, S3Storage):
        raise no_retry(f"{type(launcher).__name__} runs training where {storage.url()} cannot be read: set "
                         "LENS_DATA_ROOT=s3://bucket/prefix so the job can pull the shards and push its checkpoints")
    return {"url_root": storage.url_root, "endpoint_url": storage.endpoint_url, "region_name": storage.region_name}


@survey_asset(
    group_name="training",
    kinds={"python", "pytorch"},
    code_version=TRAINING_CODE_VERSION,
    deps=[psf_matched_shards, dataset_splits],
    pool="gpu",
    # a job that died (spot GPU reclaimed, out of memory) is started again and resumes from its last checkpoint
    retry_policy=dg.RetryPolicy(max_retries=1, delay=60),
)
def lens_classifier(context: dg.AssetExecutionContext, config: TrainConfig, storage: LocalStorage,
                    launcher: TrainingLauncher) -> dg.MaterializeResult:
    """Ensemble of timm lens classifiers for the survey, one checkpoint per member (models/<survey>/<member>/).

    Each member is trained by its own job (`python -m lens_assets.ml.train` under
    Dagster Pipes); a retried run resumes each member from its last checkpoint.
    """
    from lens_assets.ml.backbones import BACKBONES

    survey = get_survey(context.partition_key)
    unknown = [m for m in config.members if m not in BACKBONES]
    if unknown:  # the precision is a Literal: Dagster's config check refuses a bad one at launch
        raise no_retry(f"lens_classifier config: members {unknown} not known; backbones are {sorted(BACKBONES)}")
    if config.weights_path and not launcher.shares_filesystem:
        raise no_retry(f"lens_classifier config weights_path: {type(launcher).__name__} runs the job where "
                         f"{config.weights_path} cannot be read; train with weights_path on a launcher that "
                         "shares this filesystem")
    if config.weights_path and not Path(config.weights_path).is_file():
        raise no_retry(f"lens_classifier config weights_path: {config.weights_path} is not a file")
    shard_dir = storage.path(*layout.shards_dir(survey.name))
    splits = storage.pull(*layout.splits_table(survey.name))
    if not splits.exists():
        raise no_retry(f"{splits} does not exist: materialize dataset_splits for {survey.name} first")
    store = remote_store(storage, launcher)
    if store:  # the job pulls the shards itself; the lineage here needs only their manifest
        storage.pull(*layout.shards_manifest(survey.name))
    else:
        storage.pull(*layout.shards_dir(survey.name))
    metadata: dict = {}
    hashes = []
    best_checkpoints: dict[str, Path] = {}
    for member in config.members:
        out = storage.path(*layout.member_dir(survey.name, member))
        extras = {"shard_dir": str(shard_dir), "splits_path": str(splits), "out_dir": str(out),
                  # every field of the config is a TrainSettings field of the same name (members: one backbone each)
                  "settings": {**config.model_dump(exclude={"members"}), "backbone": member}}
        if store:  # a job elsewhere: where the store is and the keys of what it reads and writes
            extras["storage"] = store
            extras["keys"] = {"shards": list(layout.shards_dir(survey.name)),
                              "splits": list(layout.splits_table(survey.name)),
                              "out": list(layout.member_dir(survey.name, member))}
        messages = launcher.launch(context, extras=extras)
        if not messages:
            raise dg.Failure(f"training job for {member} reported no summary")
        s = messages[-1]
        if store:
            storage.pull(*layout.member_dir(survey.name, member))  # what the job pushed
        else:
            storage.push(*layout.member_dir(survey.name, member))
        best = str(out / Path(s["best_checkpoint"] or s["last_checkpoint"]).name)  # the job's paths may be its own
        sha = sha256_file(Path(best))
        hashes.append(f"{member}:{sha}")
        best_checkpoints[member] = Path(best)
        metadata.update({
            f"{member}/best_val_auroc": s["best_val_auroc"],
            f"{member}/checkpoint": path_metadata(storage, Path(best)),
            f"{member}/checkpoint_sha256": sha,
            f"{member}/epochs_run": s["epochs_run"],
            f"{member}/resumed_after_epochs": s["resumed_after_epochs"] if s["resumed_after_epochs"] else 0,
            f"{member}/train_img_per_s": s["train_img_per_s"],
            f"{member}/epochs_fitted": s["epochs_fitted"],
            f"{member}/device": s["device"],
            f"{member}/precision": s.get("precision", ""),
            f"{member}/film": bool(s.get("film", False)),
            f"{member}/residual_bands": ",".join(s.get("residual_bands", [])),
            f"{member}/radial_residual": bool(s.get("radial_residual", False)),
            f"{member}/elliptical_residual": bool(s.get("elliptical_residual", False)),
            f"{member}/ema_epochs": float(s.get("ema_epochs", 0.0)),
            f"{member}/head_dropout": float(s.get("head_dropout", 0.0)),
            f"{member}/upsample": int(s.get("upsample", 1)),
            f"{member}/zoom_max": float(s.get("zoom_max", 1.0)),
            f"{member}/float32_stem": bool(s.get("float32_stem", False)),
            f"{member}/arc_attention": bool(s.get("arc_attention", False)),
            f"{member}/fresh_fraction": float(s.get("fresh_fraction", 0.0)),
            f"{member}/n_fresh": int(s.get("n_fresh", 0)),
            f"{member}/theta_e_balance": float(s.get("theta_e_balance", 0.0)),
            f"{member}/physics_weight": float(s.get("physics_weight", 0.0)),
            f"{member}/physics_failures": int(s.get("physics_failures", 0)),
            f"{member}/weights_path": s.get("weights_path", ""),
            f"{member}/batch_size": s["batch_size"],
            f"{member}/peak_memory_mb": s["peak_memory_mb"],
            f"{member}/cached_rows": int(s.get("cached_rows", 0)),
            f"{member}/val_auroc_by_epoch": dg.MetadataValue.json(s["val_auroc_by_epoch"]),
        })
    metadata["members"] = ",".join(config.members)
    ensemble = {"survey": survey.name, "version": sha256_of_strings(hashes)[:16], "members": [
        {"name": m, "checkpoint": storage.relative(best_checkpoints[m]),
         "sha256": metadata[f"{m}/checkpoint_sha256"]} for m in config.members],
        **training_lineage(storage, survey.name)}
    write_ensemble(storage, survey.name, ensemble)
    metadata["ensemble"] = dg.MetadataValue.path(storage.url(*layout.ensemble_manifest(survey.name)))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(sha256_of_strings(hashes)[:16]))
