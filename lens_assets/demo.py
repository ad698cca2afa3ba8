"""`make demo`: run the survey pipeline for one survey on the local Dagster instance and say what it made.

    python -m lens_assets.demo [--survey des] [--n-cutouts 300] [--seed 0]

Runs are recorded in $DAGSTER_HOME (SQLite), so `make dev` shows them in the UI.
"""

import argparse
import sys

import dagster as dg

from lens_assets.definitions import defs
from lens_assets.science.surveys import SURVEY_NAMES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--survey", default="des", choices=SURVEY_NAMES)
    parser.add_argument("--n-cutouts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    instance = dg.DagsterInstance.get()
    job = defs.resolve_job_def("survey_pipeline")
    run_config = {"ops": {"simulated_cutouts": {"config": {"n_cutouts": args.n_cutouts, "seed": args.seed}}},
                  "loggers": {"console": {"config": {"log_level": "INFO"}}}}
    result = job.execute_in_process(partition_key=args.survey, instance=instance, run_config=run_config,
                                    raise_on_error=False)
    if not result.success:
        print(f"survey_pipeline failed for {args.survey}; see the run {result.run_id} in the UI (make dev)",
              file=sys.stderr)
        return 1
    meta = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        meta[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    sim, cat = meta["simulated_cutouts"], meta["cutout_catalog"]
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    print()
    print(f"lens_assets demo: survey {args.survey}, run {result.run_id}")
    print(f"  simulated cutouts : {sim['n_cutouts']} ({sim['n_lenses']} lenses, {sim['n_nonlenses']} non-lenses) "
          f"at {sim['cutouts_per_s']:.1f}/s in {sim['path']}")
    print(f"  catalog           : {cat['n_ingested']} rows -> {cat['path']}")
    print(f"  quarantine        : {cat['n_quarantined']} rows -> {cat['quarantine_path']}")
    print(f"  files             : {cat['n_files']} read at {cat['files_per_s']:.0f} files/s")
    if "psf_matched_shards" in meta:
        sh = meta["psf_matched_shards"]
        print(f"  shards            : {sh['n_rows']} cutouts in {sh['n_shards']} shard(s), PSF-matched to "
              f"{sh['target_fwhm_arcsec']:.2f}\" FWHM at {sh['cutouts_per_s']:.0f} cutouts/s -> {sh['path']}")
    if "dataset_splits" in meta:
        sp = meta["dataset_splits"]
        print(f"  splits            : train {sp['n_train']} / val {sp['n_val']} / test {sp['n_test']}, lens "
              f"fractions {sp['lens_fraction_train']:.3f} / {sp['lens_fraction_val']:.3f} / "
              f"{sp['lens_fraction_test']:.3f} -> {sp['path']}")
    for c in checks:
        print(f"  check {c.asset_key.to_user_string() + '.' + c.check_name:<48}: {'passed' if c.passed else 'FAILED'}")
    print("Open the UI with `make dev` (http://127.0.0.1:3000) to see the assets, their lineage and this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
