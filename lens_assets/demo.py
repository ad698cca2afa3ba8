"""`make demo`: run the whole graph for one survey on the local Dagster instance and say what it made.

    python -m lens_assets.demo [--survey des] [--profile demo|full] [--n-cutouts N] [--epochs N] [--seed 0]
                               [--renderer lenstronomy|torch]
    python -m lens_assets.demo --track clusters [--survey des] [--n-fields 300]   # the cluster-scale track

Profiles (``lens_assets.profiles``): ``demo`` takes a few minutes on 2 CPU
cores; ``full`` is the quality run (120,000 cutouts, 18 epochs; about 90 minutes on 2 bf16 cores).

Runs are recorded in $DAGSTER_HOME (SQLite), so `make dev` shows them in the UI.
"""

import argparse
import sys
import time

import dagster as dg

from lens_assets import layout
from lens_assets.definitions import ALL_ASSETS, defs
from lens_assets.ml.torch_simulation import RENDERERS
from lens_assets.profiles import PROFILES, check_run_config, run_config
from lens_assets.science.surveys import SURVEY_NAMES


def _uncertainty_of_report(storage, survey: str) -> dict:
    """The report's error rate by uncertainty decile (report.json, pulled from ``storage``: the metadata names it by
    its storage URL, ``s3://`` on S3), or {} when none was measured."""
    import json

    path = storage.pull(*layout.report_json(survey))  # a key missing from the bucket leaves no file
    if not path.is_file():
        return {}
    unc = json.loads(path.read_text()).get("uncertainty") or {}
    return unc if unc.get("bins") else {}


def precision_note(precision: str) -> str | None:
    """What the demo says before it starts where training will run in float32 (``precision``, what the training
    config's "auto" resolves to here: ``ml.precision.resolve_precision``), so that a user knows why it takes about
    twice as long; None where it runs in bf16."""
    if precision != "32-true":
        return None
    return ("note: this CPU has no native bf16 (AVX512-BF16 or AMX-BF16), so training and scoring run in float32, "
            "and the demo takes about twice as long as on a CPU with it (docs/results.md, 'make demo from a fresh "
            "clone', gives the times of both)")


def member_line(member: str, meta: dict) -> str:
    """The demo's line for one ensemble member from ``lens_classifier``'s metadata: its best validation AUROC, its
    epochs and the rate this run trained at, or, where this run fitted no epoch (an earlier run trained every
    epoch it could: a second ``make demo``), that it fitted none."""
    from lens_assets.ml.progress import rate_text

    m, epochs = member, meta[f"{member}/epochs_run"]
    rate = rate_text(meta[f"{m}/train_img_per_s"], meta[f"{m}/epochs_fitted"])
    return (f"  model {m:<12}: best val AUROC {meta[f'{m}/best_val_auroc']:.4f} after {epochs} epochs {rate} on "
            f"{meta[f'{m}/device']} ({meta.get(f'{m}/precision') or 'precision not recorded'}) -> "
            f"{meta[f'{m}/checkpoint']}")


def check_verdict(evaluation) -> str:
    """How the demo prints an asset check's evaluation: a bologna_report gate check as its promotion page does
    (:func:`~lens_assets.assets.evaluation.gate_verdict`: passed, FAILED, a missed target, not gated), any other
    check as passed, FAILED or FAILED (not blocking)."""
    from lens_assets.assets.evaluation import gate_verdict

    meta = {k: v.value for k, v in evaluation.metadata.items()}
    error = evaluation.severity == dg.AssetCheckSeverity.ERROR
    if "target_met" in meta:  # a gate check of bologna_report: its record in report.json, rebuilt
        target = None if meta["target"] == "none" else meta["target"]
        return gate_verdict({"passed": evaluation.passed, "gate": meta["gate"], "target": target, "blocking": error})
    if evaluation.passed:
        return "passed"
    return "FAILED" if evaluation.blocking and error else "FAILED (not blocking)"


def failed_steps(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"}


def only_gates_failed(result, report: str = "bologna_report") -> bool:
    """True when the run's only failure is ``report``'s blocking gate checks: the report was written, the model
    was not promoted (vetted); every figure is there to read."""
    return failed_steps(result) == {report} and any(
        "blocking asset check" in str(e.event_specific_data.error) for e in result.all_events
        if e.event_type_value == "STEP_FAILURE")


def run_job(name: str, instance, *, survey: str, ops: dict, tolerate=lambda result: False):
    """Run job ``name`` for one survey on ``instance``: (result, metadata by asset, wall seconds), or None (the
    failure printed) when it failed and ``tolerate(result)`` does not accept the failure. A config its assets'
    classes refuse (a bound dagster's schema does not carry, such as ``epochs: 0``) is refused before the run."""
    try:
        check_run_config(ALL_ASSETS, {"ops": ops})
    except ValueError as err:
        print(f"{name} not started, its run config is refused: {err}", file=sys.stderr)
        return None
    job = defs.resolve_job_def(name)
    config = {"ops": ops, "loggers": {"console": {"config": {"log_level": "INFO"}}}}
    t0 = time.perf_counter()
    result = job.execute_in_process(partition_key=survey, instance=instance, run_config=config, raise_on_error=False)
    wall = time.perf_counter() - t0
    if not result.success and not tolerate(result):
        print(f"{name} failed for {survey} in {sorted(failed_steps(result)) or 'the run'}; see the run "
              f"{result.run_id} in the UI (make dev)", file=sys.stderr)
        return None
    meta = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        meta[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    return result, meta, wall


def run_clusters(instance, *, survey: str, profile: str, n_fields: int | None, seed: int) -> int:
    """``cluster_pipeline`` for one survey on the local instance, and what it made."""
    overrides = {"cluster_fields": {"n_fields": n_fields}} if n_fields is not None else {}
    ran = run_job("cluster_pipeline", instance, survey=survey,
                  ops=run_config(profile, seed=seed, overrides=overrides, track="clusters")["ops"],
                  tolerate=lambda result: only_gates_failed(result, "cluster_report"))
    if ran is None:
        return 1
    result, meta, wall = ran
    f, seg, clf = meta["cluster_fields"], meta["arc_segments"], meta["cluster_classifier"]
    tb, fus, rep = meta["cluster_track_b"], meta["cluster_fusion"], meta["cluster_report"]
    print()
    print(f"lens_assets cluster track: survey {survey}, run {result.run_id}, {wall / 60:.1f} min")
    print(f"  cluster fields : {f['n_fields']} ({f['n_lenses']} lenses, {f['n_nonlenses']} non-lenses) + "
          f"{f['n_heldout']} of {f['heldout_family']}, {f['field_size_px']} px, median θE "
          f"{f['theta_e_median_arcsec']:.1f}\" at {f['fields_per_s']:.2f}/s -> {f['path']}")
    print(f"  arc segments   : {seg['n_segments']} in {seg['n_fields']} fields ({seg['n_quarantined']} files "
          f"quarantined) at {seg['fields_per_s']:.2f} fields/s -> {seg['path']}")
    print(f"  models         : {clf['models']} -> {clf['path']}")
    print(f"  track_b        : {tb['epochs_run']} epochs at {tb['train_img_per_s']:.0f} stamps/s "
          f"({tb['precision']}), best val AUROC {tb['best_val_auroc']:.3f}")
    if "field_view_best_val_auroc" in tb:
        print(f"  field_view     : {tb['field_view_overview_px']} px overviews, best val AUROC "
              f"{tb['field_view_best_val_auroc']:.3f} ({tb['field_view_seconds']:.0f} s)")
    weights = ", ".join(" ".join(line.strip("| ").replace("|", " ").split()) for line in
                        str(fus["weights"]).splitlines()[2:])
    print(f"  fusion weights : {weights}")
    print(f"  scoring model  : {rep['cluster_model_version']}")
    print("\n" + "\n".join("    " + line for line in str(meta["cluster_report"]["summary"]).splitlines()))
    return 1 if str(rep["cluster_model_version"]).startswith("not vetted") else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--survey", default="des", choices=SURVEY_NAMES)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--n-cutouts", type=int, default=None, help="override the profile's simulation size")
    parser.add_argument("--epochs", type=int, default=None, help="override the profile's training epochs")
    parser.add_argument("--renderer", default=None, choices=RENDERERS,
                        help="what draws the training family's light (simulated_cutouts' renderer; default the "
                        "profile's: torch in both; lenstronomy is the reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop-size", type=int, default=200, help="cutouts in the unlabeled inbox drop scored at "
                        "the end (0: none)")
    parser.add_argument("--track", default="galaxy", choices=["galaxy", "clusters", "all"],
                        help="galaxy: survey_pipeline (the default); clusters: cluster_pipeline; all: both, one "
                        "after the other (make demo)")
    parser.add_argument("--n-fields", type=int, default=None, help="override the cluster profile's fields of the "
                        "training family (the held-out family gets a quarter as many)")
    args = parser.parse_args(argv)

    import torch

    from lens_assets.ml.precision import resolve_precision

    note = precision_note(resolve_precision("auto", gpu=torch.cuda.is_available()))  # the demo trains at "auto"
    if note:
        print(note, flush=True)
    instance = dg.DagsterInstance.get()
    if args.track == "clusters":
        return run_clusters(instance, survey=args.survey, profile=args.profile, n_fields=args.n_fields, seed=args.seed)
    code = run_galaxy(instance, args)
    if args.track == "all":
        code = max(code, run_clusters(instance, survey=args.survey, profile=args.profile, n_fields=args.n_fields,
                                      seed=args.seed))
    return code


def run_galaxy(instance, args) -> int:
    """``survey_pipeline`` with ``args``' profile, then a drop scored by the promoted model; what it made."""
    overrides = {}
    sim = {k: v for k, v in (("n_cutouts", args.n_cutouts), ("renderer", args.renderer)) if v is not None}
    if sim:
        overrides["simulated_cutouts"] = sim
    if args.epochs is not None:
        overrides["lens_classifier"] = {"epochs": args.epochs}
    ran = run_job("survey_pipeline", instance, survey=args.survey,
                  ops=run_config(args.profile, seed=args.seed, overrides=overrides)["ops"], tolerate=only_gates_failed)
    if ran is None:
        return 1
    result, meta, wall = ran
    sim, cat = meta["simulated_cutouts"], meta["cutout_catalog"]
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    print()
    print(f"lens_assets demo: survey {args.survey}, profile {args.profile}, run {result.run_id}, "
          f"{wall / 60:.1f} min")
    print(f"  simulated cutouts : {sim['n_cutouts']} ({sim['n_lenses']} lenses, {sim['n_nonlenses']} non-lenses) "
          f"at {sim['cutouts_per_s']:.1f}/s ({sim.get('renderer', 'lenstronomy')}) in {sim['path']}")
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
    if "lens_classifier" in meta:
        lc = meta["lens_classifier"]
        for m in lc["members"].split(","):
            print(member_line(m, lc))
    if "score_calibrator" in meta:
        sc = meta["score_calibrator"]
        print(f"  calibrator        : {sc['method']} after {sc['fusion']} fusion, cross-fitted ECE "
              f"{sc['ece_cal_crossfit_before']:.4f} -> {sc['ece_cal_crossfit_after']:.4f} on the "
              f"{sc['n_calibrate']} calibration rows -> {sc['path']}")
    if "bologna_report" in meta:
        r = meta["bologna_report"]
        print(f"  Bologna report    : test AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}  TPR0 {r['tpr0']:.3f}  "
              f"TPR10 {r['tpr10']:.3f} (n_nonlenses {r['n_test_nonlenses']:.0f}, lenses {r['n_test_lenses']:.0f})")
        print(f"                      TPR@FPR0.1 {r['tpr_at_fpr_0.1']:.3f}  ECE {r['ece']:.4f}  FNR(flux ratio<0.1) "
              f"{r['fnr_flux_ratio_lt_0.1']:.3f}")
        print(f"                      held-out family: AUROC {r['heldout_auroc']:.4f}  TPR0 {r['heldout_tpr0']:.3f}  "
              f"TPR10 {r['heldout_tpr10']:.3f}  (AUROC gap {r['heldout_auroc_gap']:+.4f})")
        unc = _uncertainty_of_report(defs.resources["storage"], args.survey)
        if unc:
            print(f"  uncertainty       : test error rate {unc['bins'][0]['error_rate']:.3f} in the least uncertain "
                  f"tenth, {unc['bins'][-1]['error_rate']:.3f} in the most; AUROC of the uncertainty for the errors "
                  f"{unc['error_auroc']:.3f} (the probability's closeness to 0.5 alone: "
                  f"{unc.get('margin_error_auroc', float('nan')):.3f})")
        print(f"  report            : {r['report_path']} (and report.json, roc.png, score_histograms.png, "
              "reliability.png beside it)")
        if "summary" in r:  # test split and every held-out family, lensing-only and shortcut figures
            print("\n" + "\n".join("    " + line for line in str(r["summary"]).splitlines()) + "\n")
    for c in checks:
        print(f"  check {c.asset_key.to_user_string() + '.' + c.check_name:<48}: {check_verdict(c)}")
    if "promoted_model" in meta:
        p = meta["promoted_model"]
        print(f"  promoted model    : ensemble {p['model_version']} with calibrator {p['calibrator_version']} "
              f"-> {p['path']} (new drops are scored with it)")
    else:
        failed = [c.check_name for c in checks if not c.passed and c.asset_key.to_user_string() == "bologna_report"
                  and c.severity == dg.AssetCheckSeverity.ERROR]
        print(f"  promoted model    : none: bologna_report failed {', '.join(failed)}; no drop is scored with this "
              "ensemble (the previous promotion, if any, stays in use)")
        return 1
    if args.drop_size:
        if score_demo_drop(instance, args.survey, n=args.drop_size, seed=args.seed) != 0:
            return 1
    print("Open the UI with `make dev` (http://127.0.0.1:3000) to see the assets, their lineage and this run; "
          "leave it running and the inbox sensor scores every new drop under inbox/<survey>/<drop>/.")
    return 0


def score_demo_drop(instance, survey: str, *, n: int, seed: int) -> int:
    """Drop unlabeled simulated cutouts into the inbox, run one tick of the inbox sensor and the scoring runs it
    asks for (as `dagster dev` would), and show the ranked candidates."""
    from lens_assets.inbox import candidate_table, simulate_drop
    from lens_assets.sensors.inbox import SENSOR_NAME, survey_inbox_sensor

    storage = defs.resources["storage"]
    drop = f"demo-{time.strftime('%Y%m%dT%H%M%S')}"
    truth = simulate_drop(storage, survey, drop, n=n, seed=100_000 + seed)
    print(f"\ninbox drop {storage.url(*layout.inbox_drop(survey, drop))}: {n} unlabeled cutouts, _COMPLETE written")
    tick = survey_inbox_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
    for req in tick.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    print(f"survey_inbox_sensor: {len(tick.run_requests)} run request(s): "
          f"{', '.join(r.run_key for r in tick.run_requests)}")
    job = defs.resolve_job_def("score_drops")
    for req in tick.run_requests:
        result = job.execute_in_process(partition_key=str(req.partition_key), instance=instance, raise_on_error=False,
                                        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
                                        tags={**req.tags, "dagster/sensor_name": SENSOR_NAME,
                                              "dagster/run_key": req.run_key})
        if not result.success:
            print(f"scoring {req.run_key} failed; see the run {result.run_id} in the UI", file=sys.stderr)
            return 1
    table = candidate_table(storage, survey, drop)
    lens = dict(zip(truth["objid"], truth["label"]))
    top = table.head(10)
    print(f"candidate_scores {drop}|{survey}: {len(table)} scored -> "
          f"{storage.url(*layout.candidate_table(survey, drop))}")
    print(f"  model {table['model_version'].iloc[0]}, calibrator {table['calibrator_version'].iloc[0]}, "
          f"trained on shards {table['training_manifest_sha256'].iloc[0][:16]}")
    print("  rank  score   ±p      objid                              (simulation truth, not in the files)")
    for r in top.itertuples():
        print(f"  {r.rank:>4}  {r.score:.3f}   {r.uncertainty:5.2f}   {r.objid:<34} "
              f"{'lens' if lens.get(r.objid) == 1 else 'non-lens'}")
    k = len(top)
    print(f"  {sum(lens.get(o) == 1 for o in top['objid'])} of the top {k} are simulated lenses; the drop has "
          f"{int(truth['label'].sum())} lenses in {len(truth)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
