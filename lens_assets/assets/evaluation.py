"""Asset group `evaluation`: the shortcut audit, the ensemble's calibrator and the Bologna report.

``shortcut_audit`` runs before training: an XGBoost classifier on lensing-agnostic
summary statistics of the shards (``science/shortcut.py``) says whether the
labels can be read off without any lensing. ``score_calibrator`` scores the
validation and test splits, every held-out simulation family and the
lensing-only lens/twin pairs once with every ensemble member
(``scores/<survey>/ensemble_logits.parquet``), fuses the members' logits and fits
the fusion weights and the calibrator on the validation split's ``calibrate`` half
(the members early-stopped on its ``stop`` half). ``bologna_report`` reads those scores and
the audit: nothing is scored twice.
"""

import json
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from lens_assets import layout
from lens_assets.assets._common import path_metadata, png_markdown, sha256_of_strings, survey_asset
from lens_assets.assets.shards import dataset_splits, psf_matched_shards
from lens_assets.assets.training import lens_classifier
from lens_assets.ml.score import FUSION_METHODS
from lens_assets.model_registry import calibrator_version, read_ensemble
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import atomic_path, write_text_atomic
from lens_assets.science.calibration import METHODS, cross_fit, fit_calibrator
from lens_assets.science.metrics import (THETA_E_BINS, THETA_E_HALVES, auroc_by_kind, bologna_metrics,
                                         bootstrap_interval, error_rate_by_uncertainty, expected_calibration_error,
                                         paired_by_bins, paired_win_rate)
from lens_assets.science.families import TWIN
from lens_assets.science.simulation import LENSING_ONLY  # SIMFAM of the lens/twin pairs
from lens_assets.science.splits import has_role, require_both_labels, val_roles
from lens_assets.science.surveys import get_survey

EVALUATION_CODE_VERSION = "eval-12"  # 4: fit on the val split's calibrate half; 5: uncertainty;
# 6: in probability units;
# 7: the report's AUROC of the lenses with arc S/N >= 100; 8: each non-lens type's share in by_kind; 9: AUROC per
# Einstein-radius bin. score_calibrator keeps it; the report has its own from 10 on
# 10: the shortcut audit's AUROC per non-lens type and its figure without the twins; 11: lensing-only AUROC per θE bin
# 12 (score_calibrator): rows held out or paired by their file's SIMROLE are scored too; 12 (the report): `blocking`
# per check in report.json (then false for the checks of a config's `advisory` list, since replaced by targets)
# 13 (the report): a target beside each gate, `target` per check in report.json, the gates and targets in the data
# version
REPORT_CODE_VERSION = "eval-13"
SHORTCUT_CODE_VERSION = "shortcut-3"  # 2: AUROC per non-lens type, each row's score; 3: held-out rows also by SIMROLE
SCORED_SPLITS = ("val", "test", "heldout", LENSING_ONLY)
DEFAULT_HELDOUT_FAMILIES = ["heldout", "galsim"]


class CalibratorConfig(dg.Config):
    method: Literal[("auto", *METHODS)] = Field(
        default="auto", description="temperature, platt, isotonic, or auto (lowest cross-validated NLL)")
    fusion: Literal[FUSION_METHODS] = Field(
        default="mean", description="mean (of member logits) or val_weights (logistic regression on the validation "
        "split's calibrate half)")
    n_folds: int = Field(default=5, ge=2, description="folds (by sky group) of the cross-validated choice and of "
                         "the cross-fitted ECE within the calibrate half")
    target_prevalence: float | None = Field(
        default=None, gt=0, lt=1, description="expected lens prevalence of the survey: shifts calibrated "
        "probabilities from the training prevalence by Bayes' rule (Saerens et al. 2002); None keeps it")
    heldout_families: list[str] = Field(default=DEFAULT_HELDOUT_FAMILIES, description="simulation families "
                                        "scored for robustness (kept out of the splits); absent ones are "
                                        "reported as having no objects")
    batch_size: int = Field(default=256, ge=1)
    mc_samples: int = Field(default=16, ge=0, description="MC-dropout draws of each member's head per scored row "
                            "(members trained with head_dropout): the uncertainty the report checks against the "
                            "errors; 0 for none")


class ShortcutConfig(dg.Config):
    max_shortcut_auroc: float = Field(default=0.65, ge=0, le=1, description="gate of the shortcut check: test "
                                      "AUROC of a classifier on lensing-agnostic statistics")
    heldout_families: list[str] = Field(default=DEFAULT_HELDOUT_FAMILIES, description="held-out simulation "
                                        "families scored beside the test split (and the lensing_only pairs)")
    max_train_rows: int | None = Field(default=None, ge=10, description="cap on training rows (a stratified "
                                       "sample); None uses the whole train split")
    batch_size: int = Field(default=512, ge=1, description="cutouts read and summarized at a time (bounds memory)")
    seed: int = Field(default=0, ge=0)


SHORTCUT_CHECKS = [dg.AssetCheckSpec(
    "shortcut_auroc_at_most_gate", asset="shortcut_audit", blocking=False,
    description="test AUROC of XGBoost on lensing-agnostic statistics ≤ max_shortcut_auroc (not blocking: the "
                "report shows the figure beside the classifier's)")]


def shard_features(shard_path, objids, *, pixel_scale_arcsec: float, bands, batch_size: int) -> pd.DataFrame:
    """:func:`~lens_assets.science.shortcut.summary_statistics` of the shard rows ``objids`` (in that order),
    read ``batch_size`` at a time in shard order."""
    from lens_assets.ml.data import ShardDataset
    from lens_assets.science.shortcut import feature_names, summary_statistics

    objids = list(objids)
    if not objids:
        return pd.DataFrame(columns=feature_names(bands), dtype=float)
    ds = ShardDataset(shard_path, objids=objids)
    order = np.lexsort((ds.index, ds.shard))  # contiguous reads
    parts = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = ds.__getitems__(rows.tolist())
        parts.append(summary_statistics(batch["image"], batch["variance"], pixel_scale_arcsec=pixel_scale_arcsec,
                                        bands=bands).set_index(pd.Index(rows)))
    return pd.concat(parts).sort_index().reset_index(drop=True)


@survey_asset(
    group_name="evaluation",
    kinds={"python", "xgboost"},
    code_version=SHORTCUT_CODE_VERSION,
    deps=[psf_matched_shards, dataset_splits],
    check_specs=SHORTCUT_CHECKS,
)
def shortcut_audit(context: dg.AssetExecutionContext, config: ShortcutConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """AUROC of a classifier that knows nothing of lensing: XGBoost on summary statistics of the PSF-matched
    cutouts (fluxes and colours, central colour, concentration, size, ellipticity, asymmetry, peaks).

    Trained on the train split, scored on the test split, every held-out family and
    the lensing-only pairs. Near 0.5: the labels cannot be read off such cues; near
    1: the simulator gives its lenses a shortcut a network can learn instead of
    lensing. Runs before training. Writes `reports/<survey>/shortcut/shortcut.json`,
    `features.parquet` and `importance.png`.
    """
    import time

    from lens_assets.science.shards import read_manifest
    from lens_assets.science.shortcut import MIN_PER_CLASS, importance_plot, shortcut_auroc

    survey = get_survey(context.partition_key)
    for parts in (layout.splits_dir(survey.name), layout.catalog_dir(survey.name), layout.shards_dir(survey.name)):
        storage.pull(*parts)
    split_path = storage.path(*layout.splits_table(survey.name))
    if not split_path.exists():
        raise dg.Failure(f"{split_path} does not exist: materialize dataset_splits for {survey.name} first")
    shards = storage.path(*layout.shards_dir(survey.name))
    manifest = read_manifest(shards)
    splits = pd.read_parquet(split_path, columns=["objid", "split"])
    catalog = _read_catalog(storage.path(*layout.catalog_table(survey.name)),
                            ["objid", "label", "sim_family", "sim_kind", "sim_role"], optional={"sim_role"})
    rows = splits[splits["split"].isin(["train", "test"])].merge(catalog, on="objid", how="left")
    # the same held-out rows bologna_report scores: by family name or by their file's SIMROLE
    is_held, is_pair = held_out_masks(catalog, config.heldout_families, storage=storage, survey=survey.name)
    extra = pd.concat([catalog[is_held].rename(columns={"sim_family": "split"}),
                       catalog[is_pair].assign(split=LENSING_ONLY)], ignore_index=True)
    named = [f for f in config.heldout_families if f != LENSING_ONLY]
    families = [*named, *sorted(set(extra["split"]) - {*named, LENSING_ONLY}), LENSING_ONLY]
    cols = ["objid", "split", "label", "sim_kind"]
    rows = pd.concat([rows[cols], extra[cols]], ignore_index=True)
    train = rows[rows["split"] == "train"]
    if config.max_train_rows is not None and len(train) > config.max_train_rows:
        frac = config.max_train_rows / len(train)
        train = train.groupby("label", group_keys=False).sample(frac=frac, random_state=config.seed)
        rows = pd.concat([train, rows[rows["split"] != "train"]], ignore_index=True)
    t0 = time.perf_counter()
    features = shard_features(shards, rows["objid"], pixel_scale_arcsec=manifest["pixel_scale_arcsec"],
                              bands=manifest["bands"], batch_size=config.batch_size)
    t_features = time.perf_counter() - t0
    split = rows["split"].to_numpy()
    label = rows["label"].to_numpy().astype(int)
    kind = rows["sim_kind"].to_numpy()
    eval_names = ["test", *families]
    try:
        result = shortcut_auroc(features[split == "train"], label[split == "train"],
                                {name: (features[split == name], label[split == name], kind[split == name])
                                 for name in eval_names},
                                seed=config.seed)
    except ValueError as err:
        raise dg.Failure(f"{split_path}: train split: {err}") from None
    # the twins differ from their lenses by the deflection alone, which moves the source's light to the Einstein
    # radius; the statistics see that, so the same classifier is also trained and scored without them: what the
    # other non-lens types give away
    keep = kind != TWIN
    twinless = {name: (features[(split == name) & keep], label[(split == name) & keep]) for name in eval_names
                if name != LENSING_ONLY}
    train_kept = label[(split == "train") & keep]
    n_kept = np.bincount(train_kept, minlength=2)
    if n_kept.min() >= MIN_PER_CLASS:
        without_twins = shortcut_auroc(features[(split == "train") & keep], train_kept, twinless,
                                       seed=config.seed)["auroc"]
        without_note = ""
    else:
        without_twins = {name: float("nan") for name in twinless}
        without_note = (f"not trained: {n_kept[1]} lenses and {n_kept[0]} non-lenses other than twins in the train "
                        f"split (needs {MIN_PER_CLASS} of each)")
        context.log.warning(f"{survey.name}: shortcut classifier without the twins {without_note}")
    seconds = time.perf_counter() - t0
    storage.path(*layout.shortcut_dir(survey.name)).mkdir(parents=True, exist_ok=True)
    table = pd.concat([rows.reset_index(drop=True), features], axis=1)
    table["shortcut_score"] = np.nan  # the classifier's probability; NaN for the training rows
    for name, s in result.pop("scores").items():
        table.loc[split == name, "shortcut_score"] = s
    with atomic_path(storage.path(*layout.shortcut_features(survey.name))) as tmp:
        table.to_parquet(tmp, index=False)
    doc = {"survey": survey.name, **result, "auroc_without_twins": without_twins,
           **({"without_twins_note": without_note} if without_note else {}), "families": families,
           "seconds_features": t_features, "seconds": seconds, "n_rows": len(rows),
           "gate": {"max_shortcut_auroc": config.max_shortcut_auroc}}
    doc_path = write_text_atomic(storage.path(*layout.shortcut_doc(survey.name)),
                                 json.dumps(doc, indent=2, default=float))
    plot = importance_plot(result["feature_importance"], storage.path(*layout.shortcut_importance(survey.name)),
                           title=f"{survey.name}: shortcut classifier, test AUROC {result['auroc']['test']:.3f}")
    storage.push(*layout.shortcut_dir(survey.name))
    auroc = result["auroc"]
    context.log.info(f"{survey.name}: shortcut AUROC {auroc['test']:.3f} on the test split from "
                     f"{len(features.columns)} lensing-agnostic statistics of {len(rows)} cutouts in {seconds:.1f} s")

    def cell(name):
        n1, n0 = result["n_lenses"][name], result["n_nonlenses"][name]
        if n1 + n0 == 0:
            return "no objects", 0, 0
        return ("one class only" if np.isnan(auroc[name]) else f"{auroc[name]:.3f}"), n1, n0

    def without(name):
        return "—" if name not in without_twins else without_twins_cell(without_twins[name], without_note)

    md = ["| set | shortcut AUROC | without the twins | lenses | non-lenses |", "|---|---|---|---|---|"]
    md += ["| {} | {} | {} | {} | {} |".format(name, (c := cell(name))[0], without(name), *c[1:])
           for name in eval_names]
    top = sorted(result["feature_importance"].items(), key=lambda kv: -kv[1])[:5]
    kinds_md = by_kind_table({k: v for k, v in result["auroc_by_kind"].items() if k != LENSING_ONLY})
    metadata = {
        "summary": dg.MetadataValue.md("\n".join(md) + "\n\nmost used statistics: "
                                       + ", ".join(f"{k} ({v:.2f})" for k, v in top)
                                       + "\n\nShortcut AUROC of every lens against each non-lens type (count, "
                                       "share of the set's non-lenses):\n\n" + kinds_md),
        "shortcut_auroc": float(auroc["test"]),
        # the first held-out family with a figure, as bologna_report's "heldout" is its first family with objects
        "heldout_shortcut_auroc": next((float(auroc[f]) for f in families if f != LENSING_ONLY
                                        and np.isfinite(auroc[f])), float("nan")),
        **{f"heldout_{f}_shortcut_auroc": float(auroc[f]) for f in families if f != LENSING_ONLY},
        "lensing_only_shortcut_auroc": float(auroc[LENSING_ONLY]),
        "shortcut_auroc_without_twins": float(without_twins["test"]),
        "n_train": result["n_train"],
        "n_features": len(features.columns),
        "seconds": seconds,
        "rows_per_s": len(rows) / t_features if t_features > 0 else float("nan"),
        "path": path_metadata(storage, doc_path),
        "feature_importance": dg.MetadataValue.json(result["feature_importance"]),
        "shortcut_auroc_by_kind": dg.MetadataValue.json(result["auroc_by_kind"]),
        "importance": png_markdown(plot, alt="shortcut classifier feature importance (gain)"),
    }
    check = dg.AssetCheckResult(
        check_name="shortcut_auroc_at_most_gate", passed=bool(auroc["test"] <= config.max_shortcut_auroc),
        metadata={"shortcut_auroc": float(auroc["test"]), "gate": config.max_shortcut_auroc,
                  "top_statistics": ", ".join(k for k, _ in top)})
    version = sha256_of_strings([json.dumps({k: doc[k] for k in ("auroc", "feature_importance", "auroc_by_kind",
                                                                 "auroc_without_twins")}, default=float)])
    return dg.MaterializeResult(metadata=metadata, check_results=[check], data_version=dg.DataVersion(version[:16]))


def _read_catalog(path, columns: list[str], *, optional: set[str]) -> pd.DataFrame:
    """``columns`` of the catalog at ``path``, in that order; those in ``optional`` only where the catalog has them
    (one ingested before they existed)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in columns if c not in optional or c in names])


def held_out_masks(catalog: pd.DataFrame, heldout_families, *, storage: LocalStorage,
                   survey: str) -> tuple[pd.Series, pd.Series]:
    """Catalog rows of the held-out families and of the lensing-only pairs that can be scored, as two disjoint
    masks.

    Held out: a family named in ``heldout_families`` or a file whose ``SIMROLE`` is ``heldout`` (a family of another
    name, scored under its own ``sim_family``). Pairs: ``sim_family`` ``lensing_only`` or ``SIMROLE`` ``pairs``. Both
    only with a label (0 or 1) and a row in the survey's shards. What ``bologna_report`` scores and what
    ``shortcut_audit`` scores are chosen by this one rule."""
    in_shards = set(pd.read_parquet(storage.path(*layout.shards_rows(survey)), columns=["objid"])["objid"])
    usable = catalog["objid"].isin(in_shards) & catalog["label"].isin([0, 1])
    is_pair = ((catalog["sim_family"] == LENSING_ONLY) | has_role(catalog, "pairs")) & usable
    named = catalog["sim_family"].isin([f for f in heldout_families if f != LENSING_ONLY])
    return (named | has_role(catalog, "heldout")) & usable & ~is_pair, is_pair


def _rows_to_score(storage: LocalStorage, survey: str, heldout_families) -> pd.DataFrame:
    """val/test rows of the splits (with their ``val_role`` and ``sky_group``), labeled rows of each held-out
    family and of every file whose ``SIMROLE`` is ``heldout`` (split ``heldout``, with their ``sim_family``) and of
    the lensing-only pairs, by family or ``SIMROLE`` ``pairs`` (split ``lensing_only``, with their ``pair_id``);
    rows outside the splits have ``val_role`` "" and ``sky_group`` -1."""
    for parts in (layout.splits_dir(survey), layout.catalog_dir(survey), layout.shards_dir(survey)):
        storage.pull(*parts)
    splits_file = storage.path(*layout.splits_table(survey))
    splits = pd.read_parquet(splits_file)
    splits = pd.DataFrame({"objid": splits["objid"], "split": splits["split"], "sky_group": splits["sky_group"],
                           "val_role": val_roles(splits, source=str(splits_file))})
    truth = ("flux_ratio", "theta_e", "arc_snr", "pair_id")
    catalog = _read_catalog(storage.path(*layout.catalog_table(survey)),
                            ["objid", "label", *truth, "sim_family", "sim_kind", "source_file", "source_sha256",
                             "sim_role"], optional={*truth, "sim_role"})
    if "pair_id" not in catalog:  # a catalog ingested before PAIRID was read
        catalog["pair_id"] = ""
    is_held, is_pair = held_out_masks(catalog, heldout_families, storage=storage, survey=survey)
    held, pairs = catalog[is_held], catalog[is_pair]
    rows = pd.concat([splits[splits["split"].isin(["val", "test"])],
                      pd.DataFrame({"objid": held["objid"], "split": "heldout"}),
                      pd.DataFrame({"objid": pairs["objid"], "split": LENSING_ONLY})], ignore_index=True)
    rows["val_role"] = rows["val_role"].fillna("")
    rows["sky_group"] = rows["sky_group"].fillna(-1).astype(int)
    if rows["objid"].duplicated().any():
        raise dg.Failure(f"objects both in the splits and held out (by family or by their file's SIMROLE): "
                         f"{rows.loc[rows['objid'].duplicated(), 'objid'].head(5).tolist()}; materialize "
                         "dataset_splits again")
    return rows.merge(catalog.drop(columns=["sim_role"], errors="ignore"), on="objid", how="left",
                      validate="one_to_one")


@survey_asset(
    group_name="evaluation",
    kinds={"python", "scikit-learn"},
    code_version=EVALUATION_CODE_VERSION,
    deps=[lens_classifier, dataset_splits, psf_matched_shards],
)
def score_calibrator(context: dg.AssetExecutionContext, config: CalibratorConfig,
                     storage: LocalStorage) -> dg.MaterializeResult:
    """Fused ensemble logits mapped to calibrated lens probabilities, fit on the validation split's calibrate half.

    The members early-stopped and chose checkpoints on the val split's `stop`
    half; fusion weights and calibrator are fit on its `calibrate` half only.
    Temperature, Platt and isotonic scaling are fit; the lowest cross-validated
    NLL wins (`method=auto`, folds by sky group). Writes `calibrators/<survey>/calibrator.json`
    (fusion weights, calibrator, member checkpoints) and the scores of the
    val/test rows, of every held-out family and of the lensing-only lens/twin
    pairs, which `bologna_report` evaluates.

    ECE figures: `ece_cal_crossfit_before/after` are out of sample (fusion and
    calibrator, of the method chosen on the whole half, refit on the other
    sky-group folds of the calibrate half: each row is predicted by a fit that did
    not see it). `ece_before/after` (`ece_val_before/after`
    in calibrator.json) are in-sample, on the rows the calibrator was fit to, and
    so optimistic; the test-split ECE of `bologna_report` is out of sample too.
    """
    from scipy.special import expit

    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import default_device, fit_fusion, load_members, member_scores, uncertainty_columns
    from lens_assets.science.plots import reliability_plot

    survey = get_survey(context.partition_key)
    ensemble = read_ensemble(storage, survey.name)
    rows = _rows_to_score(storage, survey.name, config.heldout_families)
    fit_rows = (rows["val_role"] == "calibrate").to_numpy()
    y_fit, groups = rows.loc[fit_rows, "label"].to_numpy(), rows.loc[fit_rows, "sky_group"].to_numpy()
    try:
        require_both_labels(y_fit, what=f"splits/{survey.name}/dataset_splits.parquet: the val split's calibrate "
                                        "half")
    except ValueError as err:
        raise dg.Failure(str(err)) from None
    device = default_device()
    members = load_members([m["path"] for m in ensemble["members"]], device=device)
    names = [m["name"] for m in ensemble["members"]]
    import time

    t0 = time.perf_counter()
    logits, mc_std = member_scores(members, ShardDataset(storage.path(*layout.shards_dir(survey.name)),
                                                         objids=rows["objid"]),
                                   batch_size=config.batch_size, device=device, mc_samples=config.mc_samples)
    seconds = time.perf_counter() - t0
    fusion = fit_fusion(logits[fit_rows], y_fit, method=config.fusion)
    fused = fusion(logits)
    cal = fit_calibrator(fused[fit_rows], y_fit, method=config.method, n_folds=config.n_folds, groups=groups,
                         target_prevalence=config.target_prevalence)
    for j, name in enumerate(names):
        rows[f"logit_{name}"] = logits[:, j]
        rows[f"logit_std_mc_{name}"] = mc_std[:, j]
    rows["logit"] = fused
    rows["probability"] = cal.predict(fused)
    for col, values in uncertainty_columns(logits, mc_std, fusion, cal.predict).items():
        rows[col] = values
    out = storage.write_parquet(rows, *layout.ensemble_scores(survey.name))

    before, after = expit(fused[fit_rows]), rows.loc[fit_rows, "probability"].to_numpy()
    ece_before, ece_after = expected_calibration_error(y_fit, before), expected_calibration_error(y_fit, after)
    # out of sample: fusion and calibrator (the method chosen above) refit on the other folds, by sky group
    crossfit = {}
    for stage in ("before", "after"):
        def fit(x, y, stage=stage):
            f = fit_fusion(x, y, method=config.fusion)
            if stage == "before":
                return lambda x_new: expit(f(x_new))
            c = fit_calibrator(f(x), y, method=cal.method, target_prevalence=config.target_prevalence)
            return lambda x_new: c.predict(f(x_new))

        try:
            oof = cross_fit(fit, logits[fit_rows], y_fit, groups, n_folds=config.n_folds)
        except ValueError as err:
            raise dg.Failure(f"splits/{survey.name}/dataset_splits.parquet: the val split's calibrate half: "
                             f"{err}") from None
        crossfit[stage] = expected_calibration_error(y_fit, oof)
    n_stop = int(((rows["split"] == "val") & (rows["val_role"] == "stop")).sum())
    doc = {"survey": survey.name, "members": ensemble["members"], "fusion": fusion.to_dict(),
           "calibrator": cal.to_dict(), "fit_on": "val:calibrate", "n_val": int((rows["split"] == "val").sum()),
           "n_calibrate": int(fit_rows.sum()), "n_val_stop": n_stop,
           "ece_val_before": ece_before, "ece_val_after": ece_after,  # in-sample: on the rows fit to
           "ece_cal_crossfit_before": crossfit["before"], "ece_cal_crossfit_after": crossfit["after"],
           "heldout_families": [f for f in config.heldout_families if f != LENSING_ONLY]}
    for m in doc["members"]:
        m.pop("path", None)
    text = json.dumps(doc, indent=2)
    path = storage.write_text(text, *layout.calibrator_doc(survey.name))
    plot = reliability_plot({"sigmoid(fused logit)": (y_fit, before), f"calibrated ({cal.method})": (y_fit, after)},
                            storage.path(*layout.calibration_reliability(survey.name)))
    storage.push(*layout.calibration_reliability(survey.name))
    context.log.info(f"calibrator {cal.method} (fusion {fusion.method}) on {fit_rows.sum()} rows of the val split's "
                     f"calibrate half: cross-fitted ECE {crossfit['before']:.4f} -> {crossfit['after']:.4f} "
                     f"(in-sample {ece_before:.4f} -> {ece_after:.4f}); scored {len(rows)} rows at "
                     f"{len(rows) / seconds:.0f}/s on {device}")
    ece_table = pd.DataFrame({"ECE (calibrate half)": ["cross-fitted (out of sample)", "in-sample (rows fit to)"],
                              "sigmoid(fused logit)": [crossfit["before"], ece_before],
                              f"calibrated ({cal.method})": [crossfit["after"], ece_after]})
    metadata = {
        "path": path_metadata(storage, path),
        "scores_path": path_metadata(storage, out),
        "method": cal.method,
        "temperature": cal.temperature if cal.method == "temperature" else float("nan"),
        **{k: getattr(cal, k) if cal.method == "platt" else float("nan") for k in ("platt_a", "platt_b")},
        "cv_nll": dg.MetadataValue.json(cal.cv_nll or {}),
        "fusion": fusion.method,
        "fusion_weights": dg.MetadataValue.json(dict(zip(names, fusion.weights))),
        "target_prevalence": config.target_prevalence if config.target_prevalence is not None else float("nan"),
        "train_prevalence": cal.train_prevalence,
        "ece_cal_crossfit_before": crossfit["before"],
        "ece_cal_crossfit_after": crossfit["after"],
        "ece_before": ece_before,  # in-sample, see the docstring
        "ece_after": ece_after,
        "ece": dg.MetadataValue.md(ece_table.to_markdown(index=False, floatfmt=".4f")),
        "n_val": int((rows["split"] == "val").sum()),
        "n_calibrate": int(fit_rows.sum()),
        "n_val_stop": n_stop,
        "n_scored": len(rows),
        **{f"n_{split}": int((rows["split"] == split).sum()) for split in ("test", "heldout", LENSING_ONLY)},
        "scoring_img_per_s": len(rows) / seconds if seconds > 0 else float("nan"),
        "device": device,
        "reliability": png_markdown(plot, alt="reliability diagram on the val split's calibrate half (in-sample)"),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(calibrator_version(text)))


# the config fields of each gate check: its gate and its target
GATE_FIELDS = {"auroc_at_least_gate": ("min_auroc", "target_auroc"),
               "tpr10_at_least_gate": ("min_tpr10", "target_tpr10"),
               "ece_at_most_gate": ("max_ece", "target_ece"),
               "heldout_auroc_at_least_gate": ("min_heldout_auroc", "target_heldout_auroc"),
               "lensing_only_auroc_at_least_gate": ("min_lensing_only_auroc", "target_lensing_only_auroc"),
               "fnr_flux_ratio_lt_0_1_at_most_gate": ("max_fnr_flux_ratio_lt_0_1", "target_fnr_flux_ratio_lt_0_1")}


class ReportConfig(dg.Config):
    """Each figure has a gate and a target. A gate blocks: a figure that misses it fails its check with ERROR
    severity, which fails the run after the report is written, and ``promoted_model`` does not promote the pair. A
    target only tells: a figure that meets the gate (or has none) but misses its target fails the check with WARN
    severity, shown and recorded, blocking nothing. None: no gate, no target."""

    # None says on purpose that a figure is not a gate: its check never blocks, and passes with gate "not gated" unless
    # a target is set and missed (WARN)
    min_auroc: float | None = Field(default=0.99, ge=0, le=1, description="gate of the auroc check; None: not gated")
    min_tpr10: float | None = Field(default=0.6, ge=0, le=1, description="gate of the tpr10 check; None: not gated")
    max_ece: float | None = Field(default=0.02, ge=0, le=1, description="gate of the ece check; None: not gated")
    # these three fail when there is nothing to measure
    min_heldout_auroc: float | None = Field(default=0.95, ge=0, le=1, description="gate of every held-out family's "
                                            "AUROC; None: not gated")
    min_lensing_only_auroc: float | None = Field(default=0.95, ge=0, le=1, description="gate of the lens/twin AUROC; "
                                                 "None: not gated")
    max_fnr_flux_ratio_lt_0_1: float | None = Field(default=0.3, ge=0, le=1, description="gate of the test FNR of "
                                                    "lenses with lensed-flux ratio < 0.1 (at the TPR10 threshold); "
                                                    "None: not gated")
    # targets: missed, a WARN that blocks nothing (the demo shows its issue's targets with these)
    target_auroc: float | None = Field(default=None, ge=0, le=1, description="advisory target of the auroc check")
    target_tpr10: float | None = Field(default=None, ge=0, le=1, description="advisory target of the tpr10 check")
    target_ece: float | None = Field(default=None, ge=0, le=1, description="advisory target of the ece check")
    target_heldout_auroc: float | None = Field(default=None, ge=0, le=1, description="advisory target of every "
                                               "held-out family's AUROC")
    target_lensing_only_auroc: float | None = Field(default=None, ge=0, le=1, description="advisory target of the "
                                                    "lens/twin AUROC")
    target_fnr_flux_ratio_lt_0_1: float | None = Field(default=None, ge=0, le=1, description="advisory target of the "
                                                       "test FNR of lenses with flux ratio < 0.1")
    n_boot: int = Field(default=1000, ge=1, description="bootstrap resamples of the 95% intervals")

    @model_validator(mode="after")
    def _targets_beyond_gates(self):
        for gate_field, target_field in GATE_FIELDS.values():
            gate, target = getattr(self, gate_field), getattr(self, target_field)
            if gate is not None and target is not None and (
                    target < gate if gate_field.startswith("min_") else target > gate):
                raise ValueError(f"{target_field} {target} is easier than {gate_field} {gate}: a target is "
                                 "at least as hard as its gate")
        return self


# blocking: a failed gate fails the run after the report is written, and promoted_model (downstream) does not run,
# so the ensemble is never promoted to score new data; a missed target fails with WARN severity, which Dagster does
# not block on; a figure with neither gate nor target passes, its gate "not gated"
REPORT_CHECKS = [dg.AssetCheckSpec(name, asset="bologna_report", blocking=True, description=text) for name, text in (
    ("auroc_at_least_gate", "test AUROC ≥ min_auroc (gate) / target_auroc (target)"),
    ("tpr10_at_least_gate", "test TPR10 ≥ min_tpr10 (gate) / target_tpr10 (target)"),
    ("ece_at_most_gate", "test ECE (calibrated) ≤ max_ece (gate) / target_ece (target)"),
    ("heldout_auroc_at_least_gate", "AUROC of every held-out family with objects ≥ min_heldout_auroc (gate) / "
                                    "target_heldout_auroc (target); misses both when none has objects"),
    ("lensing_only_auroc_at_least_gate", "AUROC of lens vs twin members of the lensing-only pairs ≥ "
                                         "min_lensing_only_auroc (gate) / target_lensing_only_auroc (target); misses "
                                         "both without pairs"),
    ("fnr_flux_ratio_lt_0_1_at_most_gate", "test FNR of lenses with flux ratio < 0.1 ≤ max_fnr_flux_ratio_lt_0_1 "
                                           "(gate) / target_fnr_flux_ratio_lt_0_1 (target); misses both without "
                                           "such lenses"),
)]
HEADLINE = ("auroc", "auprc", "tpr0", "tpr10", "tpr_at_fpr_0.1", "ece", "fnr_flux_ratio_lt_0.1")
CI_METRICS = ("auroc", "tpr0", "tpr10")
NO_OBJECTS = "no objects"


def _figures(part: pd.DataFrame) -> dict:
    truth = {k: part[k].where(part[k] >= 0, np.nan).to_numpy()  # -1: not known
             for k in ("flux_ratio", "theta_e", "arc_snr") if k in part}
    return bologna_metrics(part["label"].to_numpy(), part["logit"].to_numpy(), **truth,
                           probs=part["probability"].to_numpy())


def report_figures(scores: pd.DataFrame, *, heldout_families=("heldout",), n_boot: int = 0, seed: int = 0) -> dict:
    """Metrics of the test split (``in_distribution``), of each held-out family (``families``: family ->
    figures, empty when it has no lenses and non-lenses), of the first family with objects (``heldout``) and of
    the lensing-only pairs (``lensing_only``: :func:`paired_win_rate`).

    Ranking figures use the fused logit (calibration is monotone, and isotonic
    plateaus would only add ties); ECE uses the calibrated probability. With
    ``n_boot``: stratified bootstrap 95% intervals ``<metric>_ci_low/high`` of AUROC, TPR0 and TPR10.
    """
    def with_ci(part):
        fig = _figures(part)
        for m in CI_METRICS if n_boot else ():
            fig[f"{m}_ci_low"], fig[f"{m}_ci_high"] = bootstrap_interval(
                part["label"].to_numpy(), part["logit"].to_numpy(), m, n_boot=n_boot, seed=seed)
        return fig

    def evaluable(part):
        return not part.empty and part["label"].nunique() == 2

    out = {"families": {}}
    test = scores[scores["split"] == "test"]
    if evaluable(test):
        out["in_distribution"] = with_ci(test)
    held = scores[scores["split"] == "heldout"]
    family = held["sim_family"] if "sim_family" in held else pd.Series("heldout", index=held.index)
    sets = {"test": test}  # the evaluable sets, for the figures by non-lens type
    for f in [*heldout_families, *sorted(set(family) - set(heldout_families))]:
        part = held[family == f]
        out["families"][f] = with_ci(part) if evaluable(part) else {}
        sets[f] = part
    out["heldout"] = next((v for v in out["families"].values() if v), {})
    # which non-lens types the finder takes for lenses: every lens of a set against each type of its non-lenses
    out["by_kind"] = {name: auroc_by_kind(part["label"].to_numpy(), part["logit"].to_numpy(),
                                          part["sim_kind"] if "sim_kind" in part else [None] * len(part))
                      for name, part in sets.items() if evaluable(part)}
    pairs = scores[scores["split"] == LENSING_ONLY]
    lo = {"n_pairs": 0.0, "win_rate": float("nan"), "auroc": float("nan"), "n_rows_not_in_complete_pairs": 0.0}
    if not pairs.empty:
        pid = pairs["pair_id"].fillna("") if "pair_id" in pairs else pd.Series("", index=pairs.index)
        lo = paired_win_rate(pid.to_numpy(), pairs["label"].to_numpy(), pairs["logit"].to_numpy())
        by_pair = pairs["label"].groupby(pid)
        complete = pairs[(pid != "") & (by_pair.transform("size") == 2) & (by_pair.transform("sum") == 1)]
        if n_boot and lo["n_pairs"] > 0 and complete["label"].nunique() == 2:
            lo["auroc_ci_low"], lo["auroc_ci_high"] = bootstrap_interval(
                complete["label"].to_numpy(), complete["logit"].to_numpy(), "auroc", n_boot=n_boot, seed=seed)
        if "theta_e" in pairs:  # where the finder's lensing skill ends: the pairs by their lens's Einstein radius
            theta_e = pairs["theta_e"].where(pairs["theta_e"] >= 0, np.nan).to_numpy()
            for name, r in paired_by_bins(pid.to_numpy(), pairs["label"].to_numpy(), pairs["logit"].to_numpy(),
                                          theta_e, THETA_E_BINS + THETA_E_HALVES).items():
                lo[f"auroc_theta_e_{name}"], lo[f"n_pairs_theta_e_{name}"] = r["auroc"], r["n_pairs"]
    out["lensing_only"] = lo
    out["uncertainty"] = (error_rate_by_uncertainty(test["label"].to_numpy(), test["probability"].to_numpy(),
                                                    test["uncertainty"].to_numpy())
                          if "uncertainty" in test and not test.empty else {})
    return out


def _fmt(v, lo=None, hi=None) -> str:
    if v is None or not np.isfinite(v):
        return NO_OBJECTS
    text = f"{v:.3f}"
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def _bin_label(name: str) -> str:
    """A metric bin's name as a table label: ``lt_0.8`` -> "< 0.8", ``1.2_2`` -> "1.2–2", ``ge_2`` -> "≥ 2"."""
    return name.replace("_", "–").replace("lt–", "< ").replace("ge–", "≥ ")


def without_twins_cell(value: float, note: str) -> str:
    """A cell of the shortcut AUROC without the twins: the figure, why the classifier was not trained, or
    "undefined" (a set without both classes once its twins are out)."""
    if note:
        return note.split(":")[0]
    return f"{value:.3f}" if np.isfinite(value) else "undefined"


def summary_table(figures: dict, shortcut: dict | None) -> str:
    """The report's leading table: rows are figures, columns the test split and each held-out family; three
    decimals, ``[lo, hi]`` bootstrap 95% intervals where computed, "no objects" for an empty set or bin."""
    cols = [("test", figures.get("in_distribution", {}))] + list(figures["families"].items())
    sc = (shortcut or {}).get("auroc", {})
    lo = figures["lensing_only"]
    rows = [("AUROC", "auroc"), ("AUPRC", "auprc"), ("TPR0", "tpr0"), ("TPR10", "tpr10"), ("ECE", "ece"),
            ("FNR (flux ratio < 0.1)", "fnr_flux_ratio_lt_0.1"),
            ("AUROC, lenses of flux ratio < 0.1 vs all non-lenses", "auroc_flux_ratio_lt_0.1"),
            ("AUROC, lenses of arc S/N ≥ 100 vs all non-lenses", "auroc_arc_snr_ge_100"),
            ("AUROC, lenses of θE < 1.2″ vs all non-lenses", "auroc_theta_e_lt_1.2"),
            ("AUROC, lenses of θE ≥ 1.2″ vs all non-lenses", "auroc_theta_e_ge_1.2")]
    head = "| figure | " + " | ".join(f"{'test split' if n == 'test' else f'held-out: {n}'}" for n, _ in cols)
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for title, key in rows:
        cells = [_fmt(f.get(key), f.get(f"{key}_ci_low"), f.get(f"{key}_ci_high")) if f else NO_OBJECTS
                 for _, f in cols]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    pairs = (f"{_fmt(lo['auroc'], lo.get('auroc_ci_low'), lo.get('auroc_ci_high'))} (win rate "
             f"{lo['win_rate']:.3f}, {lo['n_pairs']:.0f} pairs)" if lo["n_pairs"] else NO_OBJECTS)
    lines.append("| lensing-only AUROC (lens vs twin pairs) | " + " | ".join([pairs] + ["—"] * (len(cols) - 1)) + " |")
    for name, label in (("lt_1.2", "θE < 1.2″"), ("ge_1.2", "θE ≥ 1.2″")):
        if f"n_pairs_theta_e_{name}" not in lo:  # pairs without θE truth (or none at all): nothing to split by
            continue
        n_bin = lo[f"n_pairs_theta_e_{name}"]
        cell = f"{_fmt(lo[f'auroc_theta_e_{name}'])} ({n_bin:.0f} pairs)" if n_bin else NO_OBJECTS
        lines.append(f"| lensing-only AUROC, pairs of {label} | " + " | ".join([cell] + ["—"] * (len(cols) - 1))
                     + " |")
    if shortcut is None:
        cells = ["not run (materialize shortcut_audit)"] * len(cols)
    else:
        cells = [_fmt(sc.get(n, float("nan"))) for n, _ in cols]
    lines.append("| shortcut AUROC (lensing-agnostic statistics) | " + " | ".join(cells) + " |")
    if shortcut is not None and "auroc_without_twins" in shortcut:  # an audit before shortcut-2 has no such row
        wt = shortcut["auroc_without_twins"]
        note = shortcut.get("without_twins_note", "")
        lines.append("| shortcut AUROC without the twins (trained and scored without them) | "
                     + " | ".join(without_twins_cell(wt[n], note) if n in wt else NO_OBJECTS for n, _ in cols)
                     + " |")
    n = " · ".join(f"{name}: {f.get('n_test_lenses', 0):.0f} lenses / {f.get('n_test_nonlenses', 0):.0f} "
                   "non-lenses" for name, f in cols)
    return "\n".join(lines) + f"\n\n{n}. Intervals: stratified bootstrap 95%. Lensing-only: one set of pairs.\n"


def by_kind_table(by_kind: dict) -> str:
    """Markdown: AUROC of the lenses against each non-lens type (rows), per set (columns: the test split, each
    held-out family), with the count and share of that type; "no objects" where a set has none of it."""
    if not by_kind:
        return ""
    names = list(by_kind)
    kinds = sorted({k for v in by_kind.values() for k in v},
                   key=lambda k: min(v[k]["auroc"] for v in by_kind.values() if k in v))
    lines = ["| non-lens type | " + " | ".join("test split" if n == "test" else f"held-out: {n}" for n in names)
             + " |", "|---" * (len(names) + 1) + "|"]
    for k in kinds:
        cells = [f"{by_kind[n][k]['auroc']:.3f} ({by_kind[n][k]['n']:.0f}, {by_kind[n][k]['share']:.0%})"
                 if k in by_kind[n] else NO_OBJECTS for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def uncertainty_table(unc: dict) -> str:
    """Markdown: the test split's error rate per uncertainty decile, or why there is none."""
    if not unc or not unc.get("bins"):
        return ("No uncertainty was measured: one member and no head dropout (train with `head_dropout` > 0 for "
                "MC dropout, or with two members or more for their spread).")
    def fmt(v):
        return f"{v:.3f}" if np.isfinite(v) else "undefined (no errors, or no spread)"

    lines = [f"Errors at probability {unc['threshold']:.1f}: {unc['error_rate']:.3f} of {unc['n']} test rows; "
             f"AUROC of the uncertainty for finding them {fmt(unc['error_auroc'])} (of the probability's closeness "
             f"to {unc['threshold']:.1f} alone {fmt(unc.get('margin_error_auroc', float('nan')))}), rank correlation "
             f"of decile and error rate {fmt(unc['spearman'])}.", "",
             "| decile (least uncertain first) | rows | uncertainty (±p) | error rate |", "|---|---|---|---|"]
    for b in unc["bins"]:
        lines.append(f"| {b['bin']} | {b['n']} | {b['uncertainty_low']:.3f}–{b['uncertainty_high']:.3f} | "
                     f"{b['error_rate']:.3f} |")
    return "\n".join(lines)


def report_markdown(survey: str, figures: dict, calibrator: dict, shortcut: dict | None = None) -> str:
    ind, held = figures["in_distribution"], figures.get("heldout", {})
    lines = [f"# Bologna report: {survey}", "", summary_table(figures, shortcut), "",
             "Ranking figures on the fused ensemble logit; ECE on calibrated probabilities (15 equal-mass bins).",
             "TPR0/TPR10: fraction of lenses scored strictly above the highest / 10th-highest non-lens.", "",
             "| figure | test (in-distribution) | held-out family | gap |", "|---|---|---|---|"]
    for k in ("auroc", "auprc", "tpr0", "tpr10", "tpr_at_fpr_0.1", "tpr_at_fpr_0.001", "ece",
              "n_test_lenses", "n_test_nonlenses"):
        a, b = ind.get(k, float("nan")), held.get(k, float("nan"))
        gap = "" if k.startswith("n_") else f"{a - b:+.4f}"
        fmt = (lambda v: f"{v:.0f}") if k.startswith("n_") else (lambda v: f"{v:.4f}")
        lines.append(f"| {k} | {fmt(a)} | {fmt(b)} | {gap} |")
    nan = float("nan")
    lines += ["", "## False-negative rate by lensed-flux ratio (at the TPR10 threshold)", "",
              "The noise floor is the FNR of an observer who knew each lens's arcs exactly (matched filter, "
              "from the simulated arc S/N) at the same number of false positives: no finder can go below it.", "",
              "| flux ratio | test FNR | noise floor | test lenses | held-out FNR | noise floor | held-out lenses |",
              "|---|---|---|---|---|---|---|"]
    for b, label in (("lt_0.1", "< 0.1"), ("0.1_0.3", "0.1–0.3"), ("ge_0.3", "≥ 0.3")):
        lines.append(f"| {label} | {ind[f'fnr_flux_ratio_{b}']:.3f} | "
                     f"{ind.get(f'noise_limited_fnr_flux_ratio_{b}', nan):.3f} | "
                     f"{ind[f'n_lenses_flux_ratio_{b}']:.0f} | {held.get(f'fnr_flux_ratio_{b}', nan):.3f} | "
                     f"{held.get(f'noise_limited_fnr_flux_ratio_{b}', nan):.3f} | "
                     f"{held.get(f'n_lenses_flux_ratio_{b}', 0):.0f} |")
    for title, key, unit in (("Einstein radius", "theta_e", "θE (arcsec)"),
                             ("arc S/N (matched filter, from the simulation)", "arc_snr", "arc S/N")):
        bins = [k.removeprefix(f"recall_{key}_") for k in ind if k.startswith(f"recall_{key}_")]
        if not bins:
            continue
        lines += ["", f"## Recall by {title} (at the TPR10 threshold)", "",
                  f"| {unit} | test recall | test lenses | held-out recall | held-out lenses |",
                  "|---|---|---|---|---|"]
        for b in bins:
            lines.append(f"| {_bin_label(b)} | "
                         f"{ind[f'recall_{key}_{b}']:.3f} | {ind[f'n_lenses_{key}_{b}']:.0f} | "
                         f"{held.get(f'recall_{key}_{b}', nan):.3f} | {held.get(f'n_lenses_{key}_{b}', 0):.0f} |")
    lo = figures.get("lensing_only", {})
    if any(f"n_pairs_theta_e_{name}" in lo for name, *_ in THETA_E_BINS):
        lines += ["", "## Lensing-only AUROC by Einstein radius", "",
                  "The lens/twin pairs grouped by their lens's θE: where the finder stops telling a lens from the "
                  "same scene without deflection.", "", "| θE (arcsec) | lensing-only AUROC | pairs |", "|---|---|---|"]
        for name, *_ in THETA_E_BINS:
            n_bin = lo.get(f"n_pairs_theta_e_{name}", 0.0)
            label = _bin_label(name)
            lines.append(f"| {label} | {_fmt(lo.get(f'auroc_theta_e_{name}')) if n_bin else NO_OBJECTS} | "
                         f"{n_bin:.0f} |")
    if figures.get("by_kind"):
        lines += ["", "## AUROC against each non-lens type", "",
                  "Every lens of a set against the non-lenses of one type (their count and share of the set's "
                  "non-lenses in brackets), lowest first: the types the finder takes for lenses. A set's AUROC is "
                  "exactly the share-weighted mean of its column, so share × (1 − AUROC) is what a type costs.",
                  "", by_kind_table(figures["by_kind"])]
    if (shortcut or {}).get("auroc_by_kind"):
        lines += ["", "## Shortcut AUROC against each non-lens type", "",
                  "The same for the shortcut audit's classifier on lensing-agnostic statistics: a type it tells "
                  "from the lenses differs from them in light, colour or shape, not only in lensing. Against the "
                  "twins (the same scene without deflection) that difference is where the light lies: lensing "
                  "moves the source's light out to the Einstein radius.", "",
                  by_kind_table({k: v for k, v in shortcut["auroc_by_kind"].items() if k != LENSING_ONLY})]
    if "uncertainty" in figures:
        lines += ["", "## Error rate by uncertainty decile (test split)", "",
                  "Uncertainty: the candidates' `uncertainty` column, how far the members' spread and MC dropout move "
                  "the calibrated probability, (P(z + s) - P(z - s)) / 2. "
                  "Flagged-uncertain candidates should be where the errors are: the error rate should rise with "
                  "the decile.", "", uncertainty_table(figures["uncertainty"])]
    lines += ["", f"Calibrator: {calibrator['calibrator']['method']} after {calibrator['fusion']['method']} fusion "
              f"of {', '.join(m['name'] for m in calibrator['members'])}; {_fit_rows_text(calibrator)}", "",
              "![ROC](roc.png)", "", "![scores](score_histograms.png)", "",
              "![reliability](reliability.png)", ""]
    return "\n".join(lines)


def _fit_rows_text(calibrator: dict) -> str:
    """Which rows the calibrator was fit on, and its out-of-sample ECE when calibrator.json has it (a file written
    before the val split had halves has only ``n_val``)."""
    if "n_calibrate" not in calibrator:
        return f"fit on {calibrator['n_val']} validation rows."
    return (f"fit on the {calibrator['n_calibrate']} rows of the validation split's calibrate half (the members "
            f"early-stopped on the other {calibrator['n_val_stop']}); cross-fitted ECE on that half "
            f"{calibrator['ece_cal_crossfit_before']:.4f} before, {calibrator['ece_cal_crossfit_after']:.4f} after "
            "calibration.")


def read_shortcut(storage: LocalStorage, survey: str) -> dict | None:
    """shortcut_audit's ``shortcut.json``, or None when the audit has not run."""
    path = storage.pull(*layout.shortcut_doc(survey))
    return json.loads(path.read_text()) if path.exists() else None


@survey_asset(
    group_name="evaluation",
    kinds={"python", "markdown"},
    code_version=REPORT_CODE_VERSION,
    deps=[score_calibrator, shortcut_audit],
    check_specs=REPORT_CHECKS,
)
def bologna_report(context: dg.AssetExecutionContext, config: ReportConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """Bologna Lens Finding Challenge figures on the test split, each held-out simulation family and the
    lensing-only lens/twin pairs, beside the shortcut audit's AUROC.

    AUROC, AUPRC, TPR0, TPR10 (with the number of non-lenses; AUROC, TPR0 and TPR10
    with stratified bootstrap 95% intervals), TPR at FPR 0.1 and 1e-3, ECE, FNR
    per lensed-flux-ratio bin and recall per θE bin; lensing-only AUROC and paired
    win rate; ROC, score histograms and reliability diagram. Writes
    `reports/<survey>/bologna/report.json` and `report.md` (led by the summary table).
    """
    from scipy.special import expit

    from lens_assets.science.plots import reliability_plot, roc_plot, score_histograms

    survey = get_survey(context.partition_key)
    storage.pull(*layout.scores_dir(survey.name))
    storage.pull(*layout.calibrators_dir(survey.name))
    path = storage.path(*layout.ensemble_scores(survey.name))
    if not path.exists():
        raise dg.Failure(f"{path} does not exist: materialize score_calibrator for {survey.name} first")
    scores = pd.read_parquet(path)
    calibrator_text = storage.path(*layout.calibrator_doc(survey.name)).read_text()
    calibrator = json.loads(calibrator_text)
    families = calibrator.get("heldout_families", ["heldout"])
    figures = report_figures(scores, heldout_families=families, n_boot=config.n_boot)
    if "in_distribution" not in figures:
        raise dg.Failure(f"{path}: the test split needs lenses and non-lenses to be evaluated")
    shortcut = read_shortcut(storage, survey.name)
    ind, held, pairs = figures["in_distribution"], figures["heldout"], figures["lensing_only"]
    storage.path(*layout.report_dir(survey.name)).mkdir(parents=True, exist_ok=True)
    held_rows = scores[scores["split"] == "heldout"]
    parts = {"test": scores[scores["split"] == "test"],
             **{f"held-out: {f}": held_rows[held_rows["sim_family"] == f] for f, v in figures["families"].items()
                if v}}
    parts = {k: (v["label"].to_numpy(), v) for k, v in parts.items() if v["label"].nunique() == 2}
    roc = roc_plot({k: (y, v["logit"].to_numpy()) for k, (y, v) in parts.items()},
                   storage.path(*layout.report_roc(survey.name)))
    hist = score_histograms({k: (y, v["logit"].to_numpy()) for k, (y, v) in parts.items()},
                            storage.path(*layout.report_score_histograms(survey.name)))
    y, t = parts["test"]
    rel = reliability_plot({"test, sigmoid(fused logit)": (y, expit(t["logit"].to_numpy())),
                            "test, calibrated": (y, t["probability"].to_numpy())},
                           storage.path(*layout.report_reliability(survey.name)))
    gates = {k: getattr(config, k) for fields in GATE_FIELDS.values() for k in fields}
    report = {"survey": survey.name, "in_distribution": ind, "heldout": held, "families": figures["families"],
              "lensing_only": pairs, "by_kind": figures.get("by_kind", {}),
              "uncertainty": figures.get("uncertainty", {}),
              "shortcut": shortcut and {k: shortcut[k] for k in ("auroc", "n_lenses", "n_nonlenses",
                                                                 "auroc_without_twins") if k in shortcut},
              "gap": {k: ind[k] - held[k] for k in ("auroc", "tpr0", "tpr10") if k in held},
              "calibrator": calibrator, "scores_path": str(path), "gates": gates}
    md = storage.path(*layout.report_md(survey.name))
    report_json = storage.path(*layout.report_json(survey.name))
    nan = float("nan")
    context.log.info(f"{survey.name}: AUROC {ind['auroc']:.4f}, TPR0 {ind['tpr0']:.3f}, TPR10 {ind['tpr10']:.3f} "
                     f"({ind['n_test_nonlenses']:.0f} non-lenses), ECE {ind['ece']:.4f}; held-out AUROC "
                     f"{held.get('auroc', nan):.4f}; lensing-only AUROC {pairs['auroc']:.4f} over "
                     f"{pairs['n_pairs']:.0f} pairs; report {md}")
    # Dagster shows metadata in insertion order: the summary table leads the page
    metadata = {"summary": dg.MetadataValue.md(summary_table(figures, shortcut))}
    metadata.update({k: float(ind.get(k, nan)) for k in (*HEADLINE, "tpr_at_fpr_0.001", "n_test_lenses",
                                                          "n_test_nonlenses")})
    for k in CI_METRICS:
        metadata[f"{k}_ci_low"], metadata[f"{k}_ci_high"] = float(ind[f"{k}_ci_low"]), float(ind[f"{k}_ci_high"])
    for k in ("auroc", "tpr0", "tpr10"):
        metadata[f"heldout_{k}"] = float(held.get(k, nan))
    metadata["heldout_auroc_gap"] = float(ind["auroc"] - held.get("auroc", nan))
    metadata["n_heldout_nonlenses"] = float(held.get("n_test_nonlenses", 0.0))
    metadata["heldout_families"] = ",".join(figures["families"])  # the names in heldout_<family>_<figure>
    for f, fig in figures["families"].items():
        for k in ("auroc", "tpr0", "tpr10"):
            metadata[f"heldout_{f}_{k}"] = float(fig.get(k, nan))
    if figures.get("by_kind"):
        metadata["auroc_by_nonlens_type"] = dg.MetadataValue.md(by_kind_table(figures["by_kind"]))
    unc = figures.get("uncertainty", {})
    metadata["error_rate_by_uncertainty_decile"] = dg.MetadataValue.md(uncertainty_table(unc))
    metadata["uncertainty_error_auroc"] = float(unc.get("error_auroc", nan))
    metadata["lensing_only_auroc"] = float(pairs["auroc"])
    metadata["lensing_only_win_rate"] = float(pairs["win_rate"])
    metadata["n_lensing_only_pairs"] = float(pairs["n_pairs"])
    for name, *_ in THETA_E_BINS + THETA_E_HALVES:
        metadata[f"lensing_only_auroc_theta_e_{name}"] = float(pairs.get(f"auroc_theta_e_{name}", nan))
    sc = (shortcut or {}).get("auroc", {})
    metadata["shortcut_auroc"] = float(sc.get("test", nan))
    for f in figures["families"]:
        metadata[f"heldout_{f}_shortcut_auroc"] = float(sc.get(f, nan))
    for k, v in ind.items():
        if k.startswith(("fnr_flux_ratio_", "auroc_flux_ratio_", "noise_limited_fnr_flux_ratio_", "recall_theta_e_",
                         "recall_arc_snr_", "auroc_arc_snr_", "auroc_theta_e_")):
            metadata[k] = float(v)
    metadata.update({
        "report_path": path_metadata(storage, md),
        "report_json": path_metadata(storage, report_json),
        "roc": png_markdown(roc, alt="ROC"),
        "score_histograms": png_markdown(hist, alt="score histograms"),
        "reliability": png_markdown(rel, alt="reliability diagram"),
    })
    evaluated = {f: fig["auroc"] for f, fig in figures["families"].items() if fig}
    fnr = ind.get("fnr_flux_ratio_lt_0.1", nan)
    # name -> (passed at a threshold, metadata: the compared figure first); a threshold of None is not gated
    gated = {
        "auroc_at_least_gate": (lambda g: ind["auroc"] >= g, {"auroc": ind["auroc"]}),
        "tpr10_at_least_gate": (lambda g: ind["tpr10"] >= g,
                                {"tpr10": ind["tpr10"], "n_test_nonlenses": ind["n_test_nonlenses"]}),
        "ece_at_most_gate": (lambda g: ind["ece"] <= g, {"ece": ind["ece"]}),
        "heldout_auroc_at_least_gate": (
            lambda g: bool(evaluated) and all(v >= g for v in evaluated.values()),
            {"auroc": dg.MetadataValue.json(evaluated),
             NO_OBJECTS.replace(" ", "_"): ", ".join(f for f, v in figures["families"].items() if not v) or "none"}),
        "lensing_only_auroc_at_least_gate": (
            lambda g: pairs["n_pairs"] > 0 and pairs["auroc"] >= g,
            {"lensing_only_auroc": pairs["auroc"], "n_pairs": pairs["n_pairs"], "win_rate": pairs["win_rate"]}),
        "fnr_flux_ratio_lt_0_1_at_most_gate": (
            lambda g: np.isfinite(fnr) and fnr <= g,
            {"fnr_flux_ratio_lt_0.1": fnr, "n_lenses": ind.get("n_lenses_flux_ratio_lt_0.1", 0.0)}),
    }
    checks, recorded = [], {}
    for name, (passes, meta) in gated.items():
        gate, target = (getattr(config, k) for k in GATE_FIELDS[name])
        value = _plain(next(iter(meta.values())))
        gate_met = gate is None or bool(passes(gate))
        target_met = target is None or bool(passes(target))
        # a missed gate blocks (ERROR); a missed target or a figure with neither only tells (WARN). Dagster needs a
        # result for every check this asset declares (1.13 refuses a returned or yielded result without one)
        blocking = not gate_met or (gate is not None and target_met)
        checks.append(dg.AssetCheckResult(
            check_name=name, passed=gate_met and target_met,
            metadata={**meta, "gate": _gate(gate), "target": "none" if target is None else target,
                      "gate_met": gate_met, "target_met": target_met},
            severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN))
        recorded[name] = {"passed": gate_met and target_met, "value": value, "gate": _gate(gate), "target": target,
                          "blocking": blocking}
    version = sha256_of_strings([json.dumps(report["in_distribution"], default=float), calibrator_text,
                                 json.dumps(report["shortcut"], default=float), json.dumps(gates)])[:16]
    # what promoted_model reads: which calibrator (and so which checkpoints) was judged, and how each gate went
    report.update({"version": version, "calibrator_version": calibrator_version(calibrator_text),
                   "checks": recorded})
    write_text_atomic(report_json, json.dumps(report, indent=2, default=float))  # pushed with the folder
    write_text_atomic(md, report_markdown(survey.name, figures, calibrator, shortcut))
    storage.push(*layout.report_dir(survey.name))
    return dg.MaterializeResult(metadata=metadata, check_results=checks, data_version=dg.DataVersion(version))


def gate_verdict(check: dict) -> str:
    """How a gate check reads, from its record in report.json (``passed``, ``gate``, ``target``, ``blocking``): what
    the promotion page and ``make demo`` print."""
    if check["passed"]:
        return "not gated" if check["gate"] == "not gated" and check.get("target") is None else "passed"
    if not check.get("blocking", True):
        return f"target {check.get('target')} not met (WARN, not blocking)"
    return "FAILED"


def _gate(threshold: float | None):
    return "not gated" if threshold is None else threshold


def _plain(value):
    """A gate's figure (a number, or a JSON metadata value) as a plain value for report.json."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (int, float)) else json.loads(json.dumps(value, default=float))
