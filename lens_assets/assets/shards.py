"""Asset group `datasets`: PSF-matched HDF5 shards and leak-free train/val/test splits."""

import json
from typing import Literal

import dagster as dg
import pandas as pd
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import path_metadata, sha256_of_strings, survey_asset
from lens_assets.assets.catalog import cutout_catalog
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.shards import (COMPRESSIONS, SHARD_FORMAT_VERSION, build_shards, matched_psf_fwhm,
                                        shard_settings)
from lens_assets.science.splits import (SPLITS, VAL_ROLES, balance_table, cross_split_pairs, make_splits,
                                        split_checks, val_role_checks)
from lens_assets.science.surveys import get_survey

SHARDS_CODE_VERSION = f"shards-{SHARD_FORMAT_VERSION}"
SPLITS_CODE_VERSION = "splits-5"  # splits-3: val_role halves of the val split; 4: the simulation's held-out families;
# 5: files held out by their SIMROLE
FWHM_TOLERANCE = 0.03


class ShardConfig(dg.Config):
    target_fwhm_arcsec: float | None = Field(
        default=None, description="target PSF FWHM; default: broadest band's nominal seeing at `percentile`")
    percentile: float = Field(default=90.0, gt=0, lt=100, description="seeing percentile of the default target")
    rows_per_shard: int = Field(default=4096, ge=1)
    batch_size: int = Field(default=256, ge=1, description="cutouts per worker task (bounds memory)")
    compression: Literal[COMPRESSIONS] = Field(default="lzf", description="HDF5 compression of the shards")
    workers: int = Field(default=0, description="processes; 0 = every core")


@survey_asset(
    group_name="datasets",
    kinds={"python", "hdf5"},
    code_version=SHARDS_CODE_VERSION,
    deps=[cutout_catalog],
    check_specs=[dg.AssetCheckSpec(
        "matched_fwhm_within_3pct", asset="psf_matched_shards", blocking=True,
        description="measured FWHM of the matched PSF images of a sample of cutouts within 3% of the target. "
                    "Fails (ERROR, blocking) when cutouts with PSF images were sampled but none gave a "
                    "measurement; warns (WARN, not blocking) when no cutout has PSF images, because bands matched "
                    "with analytic Gaussian kernels from PSFFWHM or the nominal seeing (which the FITS contract "
                    "allows) leave no PSF image to measure")],
)
def psf_matched_shards(context: dg.AssetExecutionContext, config: ShardConfig,
                       storage: LocalStorage) -> dg.MaterializeResult:
    """PSF-matched cutouts in HDF5 shards: (N, bands, H, W) float32 in nanomaggies at the survey's pixel scale.

    Every band is convolved to one Gaussian target PSF per survey (photutils
    matching kernels from the PSF images, analytic for Gaussian PSFs), variance
    propagated; bands already broader than the target are kept and flagged.
    `manifest.json` lists the shards with their sha256; its hash is the data version.
    """
    survey = get_survey(context.partition_key)
    cat_path = storage.pull(*layout.catalog_table(survey.name))
    if not cat_path.exists():
        raise dg.Failure(f"{cat_path} does not exist: materialize cutout_catalog for {survey.name} first")
    catalog = pd.read_parquet(cat_path)
    storage.pull(*layout.raw_survey(survey.name))
    settings = shard_settings(survey, target_fwhm_arcsec=config.target_fwhm_arcsec, percentile=config.percentile,
                              rows_per_shard=config.rows_per_shard, batch_size=config.batch_size,
                              compression=config.compression)
    with storage.staged_dir(f"shards-{survey.name}") as staged:
        manifest = build_shards(catalog, survey, root=storage.root_path, out_dir=staged, settings=settings,
                                workers=config.workers)
        dest = storage.publish_dir(staged, *layout.shards_dir(survey.name))
    rate = manifest["n_rows"] / manifest["seconds"] if manifest["seconds"] > 0 else float("nan")
    context.log.info(f"wrote {manifest['n_rows']} cutouts in {len(manifest['shards'])} shards to {dest} "
                     f"at {rate:.0f} cutouts/s; target FWHM {settings.target_fwhm_arcsec:.3f}\"")

    fwhm = matched_psf_fwhm(catalog, survey, root=storage.root_path, settings=settings)
    check = fwhm_check(fwhm, n_with_psf_image=int(catalog["psf_image_available"].sum()),
                       target_fwhm_arcsec=settings.target_fwhm_arcsec)
    n_planes = manifest["n_rows"] * survey.n_bands
    metadata = {
        "path": path_metadata(storage, dest),
        "manifest": dg.MetadataValue.path(storage.url(*layout.shards_manifest(survey.name))),
        "manifest_sha256": manifest["sha256"],
        "n_rows": manifest["n_rows"],
        "n_shards": len(manifest["shards"]),
        "shards": dg.MetadataValue.md("| file | rows | sha256 |\n|---|---|---|\n" + "\n".join(
            f"| {s['file']} | {s['rows']} | `{s['sha256'][:16]}…` |" for s in manifest["shards"])),
        "target_fwhm_arcsec": settings.target_fwhm_arcsec,
        "kernel_size_px": settings.kernel_size,
        "band_fraction_matched": manifest["n_band_matched"] / n_planes if n_planes else 0.0,
        "band_fraction_broader_than_target": manifest["n_band_broader_than_target"] / n_planes if n_planes else 0.0,
        "cutouts_per_s": rate,
        "bytes": int(sum((dest / s["file"]).stat().st_size for s in manifest["shards"])),
        "dagster/row_count": manifest["n_rows"],
    }
    return dg.MaterializeResult(metadata=metadata, check_results=[check],
                                data_version=dg.DataVersion(manifest["sha256"][:16]))


def fwhm_check(fwhm: pd.DataFrame, *, n_with_psf_image: int, target_fwhm_arcsec: float) -> dg.AssetCheckResult:
    """``matched_fwhm_within_3pct`` from :func:`matched_psf_fwhm`'s table; see the check's description."""
    metadata = {"n_measured": len(fwhm), "n_cutouts_with_psf_image": n_with_psf_image,
                "target_fwhm_arcsec": target_fwhm_arcsec}
    if len(fwhm) == 0:
        reason = ("no cutout has PSF images: every band was matched with an analytic Gaussian kernel from "
                  "PSFFWHM or the nominal seeing, so there is no PSF image to measure" if n_with_psf_image == 0 else
                  f"{n_with_psf_image} cutouts have PSF images, but every sampled band was already at least as "
                  "broad as the target (kept unmatched), so no match was measured")
        severity = dg.AssetCheckSeverity.WARN if n_with_psf_image == 0 else dg.AssetCheckSeverity.ERROR
        return dg.AssetCheckResult(check_name="matched_fwhm_within_3pct", passed=False, severity=severity,
                                   metadata={**metadata, "reason": reason})
    worst = float(fwhm["rel_error"].abs().max())
    return dg.AssetCheckResult(
        check_name="matched_fwhm_within_3pct", passed=bool(worst <= FWHM_TOLERANCE),
        metadata={**metadata, "max_abs_rel_error": worst, "median_rel_error": float(fwhm["rel_error"].median()),
                  "tolerance": FWHM_TOLERANCE})


class SplitConfig(dg.Config):
    seed: int = Field(default=0, ge=0)
    fractions: list[float] = Field(default=[0.70, 0.15, 0.15], description="train, val, test")
    link_arcsec: float = Field(default=10.0, gt=0, description="objects closer than this share a sky group")
    n_bins: int = Field(default=3, ge=1, description="quantile bins per continuous factor")
    min_groups_per_stratum: int = Field(default=10, ge=1, description="smaller strata are merged")
    exclude_families: list[str] = Field(default=["heldout", "lensing_only", "galsim"],
                                        description="simulation families kept out of splits (held-out families, "
                                        "the lens/twin pairs)")
    label_fraction_tolerance: float = Field(default=0.02, ge=0)


SPLIT_CHECKS = [
    dg.AssetCheckSpec("label_fractions_agree", asset="dataset_splits",
                      description="lens fractions of train/val/test within ±2% of each other (or one object's "
                                  "share of the smallest split); fails when a split is empty"),
    dg.AssetCheckSpec("no_objid_in_two_splits", asset="dataset_splits", blocking=True,
                      description="no objid has rows in two splits (counted from the written table)"),
    dg.AssetCheckSpec("no_sky_group_across_splits", asset="dataset_splits", blocking=True,
                      description="no two objects within link_arcsec of each other (catalog positions, a KD-tree "
                                  "search independent of the sky_group column) are in different splits, nor does "
                                  "any sky_group label span two splits"),
    dg.AssetCheckSpec("val_halves_hold_both_labels", asset="dataset_splits",
                      description="the val split's stop half (early stopping) and calibrate half (fusion weights, "
                                  "calibrator) each hold lenses and non-lenses"),
]


def simulated_heldout_families(instance: dg.DagsterInstance, survey: str) -> list[str]:
    """The held-out families of every ``simulated_cutouts`` materialization of ``survey`` on ``instance`` (their
    ``heldout_families`` metadata, oldest first; none when it has not run there), less the latest one's training
    ``family``: an earlier run's held-out drops stay under ``raw/<survey>/`` and are cataloged with the rest.
    ``dataset_splits`` keeps them out of the splits beside its ``exclude_families``, so a held-out family named only
    in the simulation's config cannot reach training."""
    from lens_assets.assets.simulation import simulated_cutouts

    def text(record, key):
        value = record.asset_materialization.metadata.get(key)
        return str(getattr(value, "value", value) or "")

    found, cursor, training = [], None, ""
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=simulated_cutouts.key, asset_partitions=[survey]), limit=500,
            cursor=cursor, ascending=True)
        for record in result.records:
            found += [f for f in text(record, "heldout_families").split(",") if f]
            training = text(record, "family")
        if not result.has_more:
            # a family held out by an earlier run and trained on by the latest is the latest's training data
            return [f for f in dict.fromkeys(found) if f != training]
        cursor = result.cursor


@survey_asset(
    group_name="datasets",
    kinds={"python", "parquet"},
    code_version=SPLITS_CODE_VERSION,
    deps=[cutout_catalog, psf_matched_shards],
    check_specs=SPLIT_CHECKS,
)
def dataset_splits(context: dg.AssetExecutionContext, config: SplitConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """Train/val/test assignment (70/15/15) of the shards' labeled rows, stratified and grouped on the sky.

    One row per object: `objid`, `split`, `sky_group`, `stratum`, `label`, and
    `val_role` ("stop": early stopping and checkpoint choice; "calibrate": fusion
    weights and calibrator; "" outside the val split; sky groups kept whole).
    pretrain:*, unlabeled and held-out rows (by family name or by the file's SIMROLE) are left out and counted.
    """
    survey = get_survey(context.partition_key)
    cat_path = storage.pull(*layout.catalog_table(survey.name))
    rows_path = storage.pull(*layout.shards_rows(survey.name))
    if not rows_path.exists():
        raise dg.Failure(f"{rows_path} does not exist: materialize psf_matched_shards for {survey.name} first")
    catalog = pd.read_parquet(cat_path)
    in_shards = set(pd.read_parquet(rows_path, columns=["objid"])["objid"])
    catalog = catalog[catalog["objid"].isin(in_shards)]
    ref = survey.band(survey.reference_band).name
    simulated = simulated_heldout_families(context.instance, survey.name)
    exclude = tuple(dict.fromkeys([*config.exclude_families, *simulated]))
    result = make_splits(catalog, reference_band=ref, fractions=tuple(config.fractions), seed=config.seed,
                         link_arcsec=config.link_arcsec, n_bins=config.n_bins,
                         min_groups_per_stratum=config.min_groups_per_stratum,
                         exclude_families=exclude)
    table = result.table
    out = storage.write_parquet(table, *layout.splits_table(survey.name))
    checks = split_checks(table, tolerance=config.label_fraction_tolerance)
    positions = table[["objid", "split"]].merge(catalog[["objid", "ra", "dec"]], on="objid", how="left",
                                                validate="many_to_one")
    leaks = cross_split_pairs(positions, link_arcsec=config.link_arcsec)
    balance = balance_table(table, catalog, reference_band=ref, n_bins=config.n_bins)
    halves = val_role_checks(table, source=str(out))
    merged_levels = pd.Series([m[0].count("|") - m[1].count("|") for m in result.merged]).value_counts()
    context.log.info(f"splits {checks['counts']} with lens fractions {checks['label_fraction']}; "
                     f"excluded {result.excluded}; {len(result.merged)} small strata merged; val halves "
                     f"{ {r: halves[r] for r in VAL_ROLES} }")
    summary = pd.DataFrame({"split": list(SPLITS), "n": [checks["counts"][s] for s in SPLITS],
                            "lens_fraction": [checks["label_fraction"][s] for s in SPLITS]})
    metadata = {
        "path": path_metadata(storage, out),
        **{f"n_{s}": checks["counts"][s] for s in SPLITS},
        **{f"lens_fraction_{s}": checks["label_fraction"][s] for s in SPLITS},
        **{f"n_val_{r}": halves[r]["n"] for r in VAL_ROLES},
        **{f"lens_fraction_val_{r}": halves[r]["lens_fraction"] for r in VAL_ROLES},
        "splits": dg.MetadataValue.md(summary.to_markdown(index=False)),
        "excluded": dg.MetadataValue.json(result.excluded),
        "excluded_families": ",".join(exclude),
        "n_strata": int(table["stratum"].nunique()),
        "n_strata_merged": len(result.merged),
        "merged": dg.MetadataValue.md(
            "small strata merged by dropping factors (in order psf_fwhm, pixel_scale, magnitude, redshift, "
            f"seeing, survey, label): {json.dumps({int(k): int(v) for k, v in merged_levels.items()})} "
            "(factors dropped: count)" if len(result.merged) else "none"),
        "balance": dg.MetadataValue.md(balance.to_markdown(index=False, floatfmt=".3f")),
        "n_sky_groups": int(table["sky_group"].nunique()),
        "dagster/row_count": len(table),
    }
    results = [
        dg.AssetCheckResult(check_name="label_fractions_agree", passed=checks["label_fractions_agree"],
                            metadata={"spread": checks["label_fraction_spread"],
                                      "allowed": checks["label_fraction_allowed"],
                                      "empty_splits": ", ".join(checks["empty_splits"]) or "none"}),
        dg.AssetCheckResult(check_name="no_objid_in_two_splits", passed=checks["objids_in_two_splits"] == 0,
                            metadata={"n": checks["objids_in_two_splits"]}),
        dg.AssetCheckResult(
            check_name="no_sky_group_across_splits",
            passed=leaks["n_pairs"] == 0 and checks["sky_groups_across_splits"] == 0,
            metadata={"n_cross_split_pairs": leaks["n_pairs"], "link_arcsec": config.link_arcsec,
                      "min_cross_split_separation_arcsec": leaks["min_separation_arcsec"],
                      "examples": dg.MetadataValue.md(pd.DataFrame(leaks["examples"]).to_markdown(index=False)
                                                      if leaks["examples"] else "none"),
                      "n_sky_group_labels_across_splits": checks["sky_groups_across_splits"]}),
        dg.AssetCheckResult(check_name="val_halves_hold_both_labels", passed=halves["both_labels_in_each_half"],
                            metadata={f"n_lenses_{r}": halves[r]["n_lenses"] for r in VAL_ROLES}
                            | {f"n_{r}": halves[r]["n"] for r in VAL_ROLES}),
    ]
    version = sha256_of_strings(table["objid"] + ":" + table["split"] + ":" + table["val_role"])
    return dg.MaterializeResult(metadata=metadata, check_results=results, data_version=dg.DataVersion(version[:16]))
