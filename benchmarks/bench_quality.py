"""The quality run: a profile of the whole graph on one survey, its Bologna figures and its wall time.

    .venv/bin/python benchmarks/bench_quality.py --profile full --survey des --root /data/lens_full
    .venv/bin/python benchmarks/bench_quality.py --profile full --from lens_classifier --epochs 6   # reuse data
    .venv/bin/python benchmarks/bench_quality.py --profile full --from lens_classifier --train-seed 1   # another seed

Materializes ``simulated_cutouts`` ... ``bologna_report`` (or the part from
``--from`` on, reusing what is already under ``--root``) with the profile's run
config, then prints the report's headline figures beside the profile's gates
and the wall time of each asset. Results go to ``benchmarks/results/quality_<profile>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report  # noqa: E402


# metadata holding inlined PNGs or long markdown tables: left out of the JSON record
FIGURES = {"gallery", "roc", "reliability", "score_histograms", "balance", "shards", "splits", "merged", "by_kind"}


def main(argv=None) -> dict:
    import dagster as dg

    from lens_assets.assets.evaluation import GATE_FIELDS, ReportConfig
    from lens_assets.definitions import ASSETS, training_launcher
    from lens_assets.demo import only_gates_failed
    from lens_assets.ml.torch_simulation import RENDERERS
    from lens_assets.profiles import PROFILES, check_run_config, run_config
    from lens_assets.resources.storage import LocalStorage

    names = [a.key.to_user_string() for a in ASSETS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", choices=sorted(PROFILES))
    ap.add_argument("--survey", default="des")
    ap.add_argument("--root", default="data_quality", help="data root (LENS_DATA_ROOT) of the run")
    ap.add_argument("--from", dest="start", default=names[0], choices=names,
                    help="first asset to materialize; earlier ones are reused from --root")
    ap.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    ap.add_argument("--n-cutouts", type=int, default=None,
                    help="override the profile's number of training-family cutouts (held-out families keep theirs; the "
                         "lens/twin pairs follow it, n_cutouts // 10); ignored with --from past simulated_cutouts")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="override lens_classifier's seed (initialization, data order, augmentation, and the "
                         "fresh objects where fresh_fraction > 0); the shards are unchanged")
    ap.add_argument("--members", default=None, help="override the profile's members (comma-separated)")
    ap.add_argument("--fusion", default=None, choices=["mean", "val_weights"], help="override the fusion")
    ap.add_argument("--renderer", default=None, choices=RENDERERS,
                    help="override what draws the training family's light (both profiles': torch)")
    args = ap.parse_args(argv)

    overrides = {}
    if args.epochs is not None:
        overrides.setdefault("lens_classifier", {})["epochs"] = args.epochs
    if args.n_cutouts is not None:
        overrides.setdefault("simulated_cutouts", {})["n_cutouts"] = args.n_cutouts
    if args.train_seed is not None:
        overrides.setdefault("lens_classifier", {})["seed"] = args.train_seed
    if args.members:
        overrides.setdefault("lens_classifier", {})["members"] = args.members.split(",")
    if args.fusion:
        overrides.setdefault("score_calibrator", {})["fusion"] = args.fusion
    if args.renderer:
        overrides.setdefault("simulated_cutouts", {})["renderer"] = args.renderer
    selected = ASSETS[names.index(args.start):]
    keys = {a.key.to_user_string() for a in selected}
    ignored = sorted(op for op in overrides if op not in keys)
    if ignored:  # the run reuses those assets: their overrides would be recorded but change nothing
        print(f"ignored: the overrides of {', '.join(ignored)}, which --from {args.start} reuses from --root",
              flush=True)
        overrides = {op: fields for op, fields in overrides.items() if op in keys}
    config = run_config(args.profile, overrides=overrides)
    config["ops"] = {k: v for k, v in config["ops"].items() if k in keys}
    try:  # refused now, not when its asset is reached an hour in
        check_run_config(selected, config)
    except ValueError as err:
        ap.error(str(err))
    resources = {"storage": LocalStorage(root=args.root), "launcher": training_launcher()}
    times, metadata = {}, {}
    t_all = time.perf_counter()
    for asset in selected:  # one at a time, so each asset's wall time is its own
        name = asset.key.to_user_string()
        t0 = time.perf_counter()
        result = dg.materialize([asset], partition_key=args.survey, resources=resources, raise_on_error=False,
                                run_config={"ops": {k: v for k, v in config["ops"].items() if k == name}})
        times[name] = time.perf_counter() - t0
        if not result.success and not only_gates_failed(result):
            raise RuntimeError(f"{name} failed: " + "; ".join(str(e.event_specific_data.error)[:400] for e in
                                                          result.all_events if e.event_type_value == "STEP_FAILURE"))
        for mat in result.asset_materializations_for_node(name):
            metadata[name] = {k: v.value for k, v in mat.metadata.items() if k not in FIGURES}
        print(f"{name}: {times[name]:.0f} s", flush=True)
        if not result.success:  # the report's gates failed: nothing to promote, every figure is written
            print("bologna_report: a release gate failed; promoted_model is not run", flush=True)
            break
    wall = time.perf_counter() - t_all
    r = metadata["bologna_report"]
    gates = PROFILES[args.profile]["bologna_report"]

    report_config = ReportConfig(**gates)

    def gate(check: str) -> str:
        gate_field, target_field = GATE_FIELDS[check]
        threshold, target = getattr(report_config, gate_field), getattr(report_config, target_field)
        sign = ">=" if gate_field.startswith("min_") else "<="
        shown = [f"gate {sign} {threshold}"] if threshold is not None else []
        shown += [f"target {sign} {target}"] if target is not None else []
        return ", ".join(shown) or "not gated"

    rows = [
        ("profile", f"{args.profile} on {args.survey} (overrides {overrides or 'none'}), data root {args.root}"),
        ("AUROC", f"{r['auroc']:.4f} ({gate('auroc_at_least_gate')})"),
        ("AUPRC", f"{r['auprc']:.4f}"),
        ("TPR0", f"{r['tpr0']:.4f}"),
        ("TPR10", f"{r['tpr10']:.4f} with {r['n_test_nonlenses']:.0f} test non-lenses, {r['n_test_lenses']:.0f} "
                  f"lenses ({gate('tpr10_at_least_gate')})"),
        ("TPR at FPR 0.1 / 1e-3", f"{r['tpr_at_fpr_0.1']:.4f} / {r['tpr_at_fpr_0.001']:.4f}"),
        ("ECE (calibrated, test)", f"{r['ece']:.4f} ({gate('ece_at_most_gate')})"),
        ("FNR by flux ratio", "  ".join(f"{b}: {r[f'fnr_flux_ratio_{b}']:.3f}" for b in ("lt_0.1", "0.1_0.3", "ge_0.3"))
         + f" (lt_0.1: {gate('fnr_flux_ratio_lt_0_1_at_most_gate')})"),
        ("held-out family", f"AUROC {r['heldout_auroc']:.4f} ({gate('heldout_auroc_at_least_gate')}), "
                            f"TPR0 {r['heldout_tpr0']:.4f}, "
                            f"TPR10 {r['heldout_tpr10']:.4f}; AUROC gap {r['heldout_auroc_gap']:+.4f}"),
        ("held-out families", ", ".join(f"{f} {r[f'heldout_{f}_auroc']:.4f}"
                                        for f in r["heldout_families"].split(",") if f)),
        ("lensing-only AUROC", f"{r['lensing_only_auroc']:.4f} on {r['n_lensing_only_pairs']:.0f} lens/twin pairs "
                               f"({gate('lensing_only_auroc_at_least_gate')})"),
        ("shortcut AUROC", f"{r['shortcut_auroc']:.4f} (the training population's, not the model's)"),
        ("report", str(r["report_path"])),
        ("wall time", f"{wall / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items())),
    ]
    if "lens_classifier" in metadata:
        lc = metadata["lens_classifier"]
        for m in lc["members"].split(","):
            rows.append((f"member {m}", f"best val AUROC {lc[f'{m}/best_val_auroc']:.4f}, "
                                        f"{lc[f'{m}/epochs_run']} epochs at {lc[f'{m}/train_img_per_s']:.0f} img/s "
                                        f"on {lc[f'{m}/device']}"))
    record = {"profile": args.profile, "survey": args.survey, "overrides": overrides, "seconds": times,
              "wall_s": wall, "metadata": metadata}
    report(f"quality_{args.profile}", rows, record)
    return record


if __name__ == "__main__":
    main()
