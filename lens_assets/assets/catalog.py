"""Asset group `ingestion`: the validated cutout catalog and its quarantine table."""


import warnings

import dagster as dg
from dagster_pandera import pandera_schema_to_dagster_type
from pydantic import Field

from lens_assets import layout
from lens_assets.assets._common import counts_markdown, path_metadata, scan_inbox_folder, sha256_of_strings, \
    survey_asset
from lens_assets.assets.simulation import simulated_cutouts
from lens_assets.resources.storage import LocalStorage
from lens_assets.science.ingest import ingest_files
from lens_assets.science.schemas import catalog_schema, quarantine_schema
from lens_assets.science.surveys import get_survey

INGEST_CODE_VERSION = "ingest-5"  # 4: scene_theta_e (SCENE_TE); 5: sim_role (SIMROLE)
LABEL_FRACTION_RANGE = (0.05, 0.95)

# blocking: a catalog that breaks its schema or loses a file fails the run, so shards are never built from it
CHECKS = [
    dg.AssetCheckSpec("catalog_matches_schema", asset="cutout_catalog", blocking=True,
                      description="catalog (and quarantine table) validate against the pandera schema v2 of "
                                  "the survey"),
    dg.AssetCheckSpec("every_file_accounted_for", asset="cutout_catalog", blocking=True,
                      description="n_files == n_ingested + n_quarantined, and no file appears twice"),
    dg.AssetCheckSpec("label_balance_and_provenance", asset="cutout_catalog",
                      description=f"lens fraction of labeled rows within {LABEL_FRACTION_RANGE}; "
                                  "counts per label source (warns, does not block)"),
]


class CatalogConfig(dg.Config):
    workers: int = Field(default=0, description="processes reading files; 0 = every core")


@survey_asset(
    group_name="ingestion",
    kinds={"python", "pandas", "parquet"},
    code_version=INGEST_CODE_VERSION,
    deps=[simulated_cutouts],
    check_specs=CHECKS,
)
def cutout_catalog(context: dg.AssetExecutionContext, config: CatalogConfig,
                   storage: LocalStorage) -> dg.MaterializeResult:
    """Validated catalog of every cutout under raw/<survey>/ (metadata schema v2), one row per object.

    Fluxes in nanomaggies, magnitudes AB, sizes in arcsec. Files that break the
    FITS contract go to the quarantine table with a reason code, never dropped.
    """
    survey = get_survey(context.partition_key)
    raw = storage.pull(*layout.raw_survey(survey.name))
    files, unread = scan_inbox_folder(context, storage, raw, what="cutouts")
    if not files:
        others = (f" ({unread['n_unread_files']} other item(s) there are not read: the warning above names them "
                  "and says why)" if unread["n_unread_files"] else "")
        raise dg.Failure(f"no FITS files under {raw}{others}: materialize simulated_cutouts for {survey.name} "
                         f"or put inbox-contract files there")
    result = ingest_files(files, survey, root=storage.root_path, workers=config.workers)
    catalog, quarantine = result.catalog, result.quarantine
    schema = catalog_schema(survey)
    q_path = storage.write_parquet(quarantine, *layout.quarantine_table(survey.name))
    cat_path = storage.write_parquet(catalog, *layout.catalog_table(survey.name))
    context.log.info(f"ingested {len(catalog)} of {result.n_files} files ({len(quarantine)} quarantined) "
                     f"at {result.files_per_s:.0f} files/s")

    checks = [_schema_check(catalog, quarantine, schema),
              _accounting_check(result.n_files, catalog, quarantine),
              _balance_check(catalog)]
    reasons = quarantine["reason"].value_counts().sort_index()
    labeled = catalog[catalog["label"] >= 0]
    metadata = {
        "path": path_metadata(storage, cat_path),
        "quarantine_path": path_metadata(storage, q_path),
        "n_files": result.n_files,
        "n_ingested": len(catalog),
        "n_quarantined": len(quarantine),
        **unread,
        "quarantine_reasons": counts_markdown({k: int(v) for k, v in reasons.items()}, key="reason"),
        "quarantine_preview": dg.MetadataValue.md(quarantine.head(20)[["source_file", "reason", "message"]]
                                                  .to_markdown(index=False) if len(quarantine) else "none"),
        "n_lenses": int((catalog["label"] == 1).sum()),
        "n_nonlenses": int((catalog["label"] == 0).sum()),
        "n_unlabeled": int((catalog["label"] == -1).sum()),
        "lens_fraction": float(labeled["label"].mean()) if len(labeled) else float("nan"),
        "files_per_s": float(result.files_per_s),
        "dagster/row_count": len(catalog),
        "dagster/column_schema": _column_schema(schema),
    }
    version = sha256_of_strings(sorted(catalog["source_sha256"]) + sorted(quarantine["source_sha256"])
                                + [INGEST_CODE_VERSION])
    return dg.MaterializeResult(metadata=metadata, check_results=checks,
                                data_version=dg.DataVersion(version[:16]))


def _column_schema(schema) -> dg.TableSchema:
    """The pandera schema as the Dagster table schema the UI shows (dagster-pandera's conversion)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return pandera_schema_to_dagster_type(schema).metadata["schema"].value


def _schema_check(catalog, quarantine, schema) -> dg.AssetCheckResult:
    import pandera.errors

    try:
        schema.validate(catalog, lazy=True)
        quarantine_schema().validate(quarantine, lazy=True)
        return dg.AssetCheckResult(check_name="catalog_matches_schema", passed=True,
                                   metadata={"schema": schema.name, "n_columns": len(schema.columns)})
    except pandera.errors.SchemaErrors as err:
        cases = err.failure_cases.head(20)
        return dg.AssetCheckResult(check_name="catalog_matches_schema", passed=False,
                                   metadata={"n_failures": len(err.failure_cases),
                                             "failures": dg.MetadataValue.md(cases.to_markdown(index=False))})


def _accounting_check(n_files: int, catalog, quarantine) -> dg.AssetCheckResult:
    files = list(catalog["source_file"]) + list(quarantine["source_file"])
    passed = n_files == len(catalog) + len(quarantine) and len(set(files)) == len(files)
    return dg.AssetCheckResult(check_name="every_file_accounted_for", passed=passed,
                               metadata={"n_files": n_files, "n_ingested": len(catalog),
                                         "n_quarantined": len(quarantine)})


def _balance_check(catalog) -> dg.AssetCheckResult:
    labeled = catalog[catalog["label"] >= 0]
    fraction = float(labeled["label"].mean()) if len(labeled) else float("nan")
    lo, hi = LABEL_FRACTION_RANGE
    provenance = catalog.groupby("label_source").agg(
        n=("objid", "size"), lenses=("label", lambda s: int((s == 1).sum())),
        usable=("usable_for_training", "sum"), mean_confidence=("label_confidence", "mean")).reset_index()
    return dg.AssetCheckResult(
        check_name="label_balance_and_provenance", passed=bool(lo <= fraction <= hi),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"lens_fraction": fraction, "n_labeled": len(labeled),
                  "n_usable_for_training": int(catalog["usable_for_training"].sum()),
                  "provenance": dg.MetadataValue.md(provenance.to_markdown(index=False))})
