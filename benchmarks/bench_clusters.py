"""The cluster track end to end, and its speed against the raw library calls, in one run.

    .venv/bin/python benchmarks/bench_clusters.py --survey des --n-fields 600 --root /tmp/clusters

1. Speed, side by side on the same fields (medians over ``--n-speed`` fields of the ``cluster`` family):
   ``render_field`` (rays shot once for all bands) against lenstronomy's ``ImageModel`` per band
   (``simulation.render_system``), and ``find_arc_segments`` against photutils' ``detect_sources`` +
   ``deblend_sources`` alone on the same residual (what the segment table adds: light removal, photometry, shapes),
   the light removal's box median (``segments.box_median``, the 2'' box of ``subtract_cluster_light``, each band)
   against ``scipy.ndimage.median_filter`` on the same images (the values must be equal),
   and the selection's ``einstein_radius_arcsec`` with ``ClusterConvergence`` (closed-form convergence of the
   halo and members, inside the circle only) against the same function on lenstronomy's ``LensModel.kappa`` (the
   trace of the full hessian) and against lenstronomy's ``kappa`` on the whole square grid it used to evaluate
   (the scene's lens model, the selection's radius); the radii agree to ``einstein_radius_max_rel_diff``. Then
   on ``--n-candidates`` of the selection's candidate clusters (most sub-critical), the radius over the whole disc
   against only out to the selection's largest radius (``within_arcsec``): the same scenes must be kept.
2. The graph: materializes ``cluster_fields`` ... ``cluster_report`` under ``--root`` and prints each asset's
   wall time and the report's figures per model (test split and held-out family).

Results go to ``benchmarks/results/clusters.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report  # noqa: E402


def speed(survey_name: str, n: int) -> dict:
    import numpy as np

    from lens_assets.science.clusters import fields as cf
    from lens_assets.science.clusters.segments import find_arc_segments, subtract_cluster_light
    from lens_assets.science.families import load_family
    from lens_assets.science.simulation import render_system
    from lens_assets.science.surveys import get_survey

    survey = get_survey(survey_name)
    fam = load_family("cluster")
    fsurvey = cf._field_survey(fam, survey)
    rng = np.random.default_rng(0)
    from lenstronomy.LensModel.lens_model import LensModel

    import inspect

    from lens_assets.science.clusters.segments import _odd_filter_size, box_median
    from scipy import ndimage

    t_field, t_system, t_seg, t_raw, diffs, t_te, t_square, t_lm, te_diffs = [], [], [], [], [], [], [], [], []
    t_box, t_scipy_median, box_equal = [], [], True
    box = _odd_filter_size(inspect.signature(subtract_cluster_light).parameters["filter_arcsec"].default,
                           survey.pixel_scale_arcsec)  # the box subtract_cluster_light uses by default
    half = fsurvey.cutout_size_px * survey.pixel_scale_arcsec / 2
    r_max = 1.2 * fam.draw("selection", "max_theta_e_over_field", np.random.default_rng(0)) * 2 * half
    for i in range(n):
        scene = cf.draw_cluster_scene(fam, survey, rng)
        lens_model = LensModel(list(scene.lens_model_list))
        t0 = time.perf_counter()
        fast = cf.einstein_radius_arcsec(cf.ClusterConvergence(scene.lens_model_list), scene.kwargs_lens,
                                         max_radius_arcsec=r_max)
        t1 = time.perf_counter()
        t_te.append(t1 - t0)
        slow = cf.einstein_radius_arcsec(lens_model, scene.kwargs_lens, max_radius_arcsec=r_max)
        t_lm.append(time.perf_counter() - t1)
        te_diffs.append(abs(fast - slow) / max(slow, 1e-12))
        t1 = time.perf_counter()
        m = 2 * int(np.ceil(r_max / 0.25))
        axis = (np.arange(m) - (m - 1) / 2) * 0.25
        xx, yy = np.meshgrid(axis, axis)
        lens_model.kappa(xx.ravel(), yy.ravel(), list(scene.kwargs_lens))
        t_square.append(time.perf_counter() - t1)
        system = cf.build_cluster_system(scene, "lens", fam, survey, rng, objid=f"b{i}")
        t0 = time.perf_counter()
        got = cf.render_field(system, fsurvey, np.random.default_rng(i))  # no cache: every profile evaluated
        t1 = time.perf_counter()
        want = render_system(system, fsurvey, np.random.default_rng(i))
        t2 = time.perf_counter()
        t_field.append(t1 - t0)
        t_system.append(t2 - t1)
        diffs.append(float(np.abs(got.noiseless - want.noiseless).max() / want.noiseless.max()))
        image, variance = want.image, want.variance
        fwhm_px = max(system.psf_fwhm_arcsec.values()) / survey.pixel_scale_arcsec
        t0 = time.perf_counter()
        find_arc_segments(image, variance, bands=survey.band_names, pixel_scale_arcsec=survey.pixel_scale_arcsec,
                          psf_fwhm_px=fwhm_px)
        t1 = time.perf_counter()
        resid = subtract_cluster_light(image, variance, pixel_scale_arcsec=survey.pixel_scale_arcsec,
                                       psf_fwhm_px=fwhm_px)
        t2 = time.perf_counter()
        from photutils.segmentation import deblend_sources, detect_sources

        w = 1.0 / np.where(variance > 0, variance, np.inf)
        snr = (resid * w).sum(0) / np.sqrt(w.sum(0))
        seg = detect_sources(snr, 2.0, n_pixels=5)
        if seg is not None:
            deblend_sources(snr, seg, n_pixels=5, progress_bar=False)
        t3 = time.perf_counter()
        t_seg.append(t1 - t0)
        t_raw.append((t3 - t2) + (t2 - t1))  # the light removal alone plus photutils alone
        t0 = time.perf_counter()
        ours = [box_median(band, box) for band in image]
        t1 = time.perf_counter()
        ref = [ndimage.median_filter(band, size=box, mode="reflect") for band in image]
        t2 = time.perf_counter()
        t_box.append(t1 - t0)
        t_scipy_median.append(t2 - t1)
        box_equal = box_equal and all(np.array_equal(a, b) for a, b in zip(ours, ref))
    med = statistics.median
    return {"survey": survey_name, "n_fields": n, "field_px": fsurvey.cutout_size_px,
            "render_field_s": med(t_field), "render_system_s": med(t_system),
            "render_speedup": med(t_system) / med(t_field), "render_max_rel_diff": max(diffs),
            "segments_s": med(t_seg), "light_removal_plus_photutils_s": med(t_raw),
            "segments_overhead": med(t_seg) / med(t_raw),
            "einstein_radius_s": med(t_te), "einstein_radius_lensmodel_s": med(t_lm),
            "convergence_speedup": med(t_lm) / med(t_te), "einstein_radius_max_rel_diff": max(te_diffs),
            "square_grid_kappa_s": med(t_square), "einstein_radius_speedup": med(t_square) / med(t_te),
            "box_px": box, "box_median_s": med(t_box), "median_filter_s": med(t_scipy_median),
            "box_median_speedup": med(t_scipy_median) / med(t_box), "box_median_equal": box_equal}


def selection_einstein(survey_name: str, n: int, rounds: int = 3) -> dict:
    """The selection's Einstein radius on ``n`` of its candidate clusters (drawn as ``draw_cluster_scene`` draws
    them, most of them sub-critical and rejected): over the whole disc against only out to the selection's largest
    radius (``within_arcsec``), alternating which goes first each round; medians of the per-round totals."""
    import math

    import numpy as np

    from lens_assets.science.clusters import fields as cf
    from lens_assets.science.families import load_family
    from lens_assets.science.surveys import get_survey

    fam, survey = load_family("cluster"), get_survey(survey_name)
    half = cf.field_size_px(fam, survey) * survey.pixel_scale_arcsec / 2
    max_theta = fam.draw("selection", "max_theta_e_over_field", np.random.default_rng(0)) * 2 * half
    rng = np.random.default_rng(1)
    candidates = []
    while len(candidates) < n:  # the selection's own draws up to its Einstein radius
        candidate = cf._candidate(fam, survey, rng, half)
        if candidate is not None:
            candidates.append((cf.ClusterConvergence(candidate[3]), candidate[4]))

    def radii(within):
        return [cf.einstein_radius_arcsec(c, kw, max_radius_arcsec=1.2 * max_theta, within_arcsec=within)
                for c, kw in candidates]

    t_whole, t_within = [], []
    for r in range(rounds):
        for within in ((None, max_theta) if r % 2 == 0 else (max_theta, None)):
            t0 = time.perf_counter()
            got = radii(within)
            (t_whole if within is None else t_within).append(time.perf_counter() - t0)
            if within is None:
                whole = got
            else:
                cut = got
    kept = [w for w in whole if 0 < w <= max_theta]
    same = all((math.isnan(c) and (w == 0 or w > max_theta)) or c == w for w, c in zip(whole, cut))
    med = statistics.median
    return {"n_candidates": n, "subcritical_share": sum(w == 0 for w in whole) / n,
            "cut_share": sum(math.isnan(c) for c in cut) / n,  # candidates the prefix alone rejected
            "within_share": len(kept) / n, "whole_disc_s": med(t_whole) / n, "within_s": med(t_within) / n,
            "speedup": med(t_whole) / med(t_within), "same_selection": same}


def track_a_rates(root: str, survey: str, repeats: int = 3) -> dict:
    """Track A's training and scoring rates on the graph's features table, side by side with the raw library:
    ``fit_track_a`` (validation, monotone constraints, early stopping) against ``xgboost.train`` for the same
    number of trees, and ``TrackAModel.logit`` against the booster's ``inplace_predict``."""
    import numpy as np
    import pandas as pd
    import xgboost as xgb

    from lens_assets import layout
    from lens_assets.science.clusters.features import FEATURE_MONOTONE, cluster_feature_names
    from lens_assets.science.clusters.track_a import TrackAConfig, fit_track_a
    from lens_assets.science.surveys import get_survey

    table = pd.read_parquet(Path(root, *layout.cluster_features_table(survey)))
    cols = cluster_feature_names(get_survey(survey).band_names)
    train = table[table["split"] == "train"]
    stop = table[(table["split"] == "val") & (table["val_role"] == "stop")]
    config = TrackAConfig()
    fit_s, raw_s, score_s, raw_score_s = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = fit_track_a(train[cols], train["label"], stop[cols], stop["label"], config=config,
                            monotone=FEATURE_MONOTONE)
        fit_s.append(time.perf_counter() - t0)
        params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": config.max_depth,
                  "eta": config.learning_rate, "subsample": config.subsample, "nthread": config.n_jobs,
                  "colsample_bytree": config.colsample_bytree, "seed": config.seed}
        t0 = time.perf_counter()
        booster = xgb.train(params, xgb.DMatrix(train[cols].to_numpy(float), label=train["label"].to_numpy()),
                            num_boost_round=model.best_iteration + 1)
        raw_s.append(time.perf_counter() - t0)
        X = table[cols]
        t0 = time.perf_counter()
        model.logit(X)
        score_s.append(time.perf_counter() - t0)
        a = np.ascontiguousarray(X.to_numpy(float))
        t0 = time.perf_counter()
        booster.inplace_predict(a, predict_type="margin")
        raw_score_s.append(time.perf_counter() - t0)
    med = statistics.median
    return {"n_train": len(train), "n_trees": model.best_iteration + 1, "fit_s": med(fit_s), "raw_fit_s": med(raw_s),
            "fit_overhead": med(fit_s) / med(raw_s), "train_rows_per_s": len(train) / med(fit_s),
            "score_rows_per_s": len(table) / med(score_s), "score_overhead": med(score_s) / med(raw_score_s)}


def graph(survey: str, n_fields: int, n_heldout: int, root: str, workers: int,
          skip_fields: bool = False, track_b_pu=(), fusion_max_fpr: float = 0.1) -> tuple[dict, dict, dict]:
    import dagster as dg

    from lens_assets.assets.clusters import CLUSTER_ASSETS
    from lens_assets.resources.launchers import LocalSubprocessLauncher
    from lens_assets.resources.storage import LocalStorage

    storage = LocalStorage(root=root)
    config = {"ops": {"cluster_fields": {"config": {"n_fields": n_fields, "n_heldout": n_heldout,
                                                    "workers": workers}},
                      "arc_segments": {"config": {"workers": workers}},
                      "cluster_track_b": {"config": {"workers": workers, "pu_labeled": list(track_b_pu)}},
                      "cluster_fusion": {"config": {"max_fpr": fusion_max_fpr}}}}
    instance = dg.DagsterInstance.ephemeral()
    times, meta = {}, {}
    for asset in CLUSTER_ASSETS:  # one asset per run: its wall time alone
        if skip_fields and asset.key.to_user_string() == "cluster_fields":
            continue  # the fields of an earlier run under --root
        key = asset.key.to_user_string()
        t0 = time.perf_counter()
        run = {"ops": {k: v for k, v in config["ops"].items() if k == key}}
        others = [a.to_source_asset() for a in CLUSTER_ASSETS if a is not asset]
        result = dg.materialize([asset, *others], partition_key=survey,
                                resources={"storage": storage, "launcher": LocalSubprocessLauncher()},
                                run_config=run, instance=instance, raise_on_error=key != "cluster_report")
        if key == "cluster_report":  # a failed gate is a figure here, not an error
            meta["cluster_report_checks"] = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        times[key] = time.perf_counter() - t0
        (mat,) = result.asset_materializations_for_node(key)
        meta[key] = {k: v.value for k, v in mat.metadata.items()
                     if isinstance(v.value, (int, float, str)) and not str(v.value).startswith("![")}
    from lens_assets import layout

    figures = json.loads(storage.path(*layout.cluster_report_json(survey)).read_text())
    return times, meta, figures


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n-fields", type=int, default=600)
    ap.add_argument("--n-heldout", type=int, default=None, help="default n_fields // 4")
    ap.add_argument("--n-speed", type=int, default=5, help="fields timed side by side")
    ap.add_argument("--n-candidates", type=int, default=200,
                    help="candidate clusters of the selection whose Einstein radius is timed both ways")
    ap.add_argument("--root", default=None, help="data root of the graph run (default: a new temporary folder)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--skip-graph", action="store_true")
    ap.add_argument("--skip-fields", action="store_true", help="reuse the cluster fields already under --root")
    ap.add_argument("--fusion-max-fpr", type=float, default=0.1,
                    help="FPR the fusion's weights aim at (a small run may need more than 0.1 to allow one false "
                         "positive among the val calibrate non-lenses)")
    ap.add_argument("--track-b-pu", type=int, nargs="*", default=[10, 50, 200],
                    help="labeled lenses of each Track B PU model (none: no PU training for Track B)")
    args = ap.parse_args(argv)
    if args.root is None:
        import tempfile

        args.root = tempfile.mkdtemp(prefix="lens_clusters_")
    record = {"speed": speed(args.survey, args.n_speed),
              "selection_einstein": selection_einstein(args.survey, args.n_candidates)}
    s, e = record["speed"], record["selection_einstein"]
    rows = [("field", f"{s['field_px']} px, {args.survey}"),
            ("render_field / render_system", f"{s['render_field_s']:.2f} s / {s['render_system_s']:.2f} s per field "
                                             f"= {s['render_speedup']:.1f}x faster (max diff "
                                             f"{s['render_max_rel_diff']:.1e} "
                                             f"of the peak)"),
            ("find_arc_segments", f"{s['segments_s']:.2f} s per field, {s['segments_overhead']:.2f}x the light "
                                  "removal + photutils detect/deblend alone "
                                  f"({s['light_removal_plus_photutils_s']:.2f} s)"),
            ("box_median", f"{s['box_median_s'] * 1e3:.1f} ms per field ({s['box_px']} px box, every band), "
                           f"{s['box_median_speedup']:.2f}x scipy's median_filter "
                           f"({s['median_filter_s'] * 1e3:.1f} ms); equal: {s['box_median_equal']}"),
            ("einstein_radius_arcsec", f"{s['einstein_radius_s'] * 1e3:.1f} ms per draw, "
                                       f"{s['convergence_speedup']:.1f}x the same on lenstronomy's LensModel.kappa "
                                       f"({s['einstein_radius_lensmodel_s'] * 1e3:.1f} ms; radii agree to "
                                       f"{s['einstein_radius_max_rel_diff']:.0e}), "
                                       f"{s['einstein_radius_speedup']:.1f}x lenstronomy kappa on the square grid "
                                       f"({s['square_grid_kappa_s'] * 1e3:.1f} ms)"),
            ("selection's Einstein radius", f"{e['within_s'] * 1e3:.1f} ms per candidate out to the largest radius "
                                            f"kept against {e['whole_disc_s'] * 1e3:.1f} ms over the whole disc "
                                            f"({e['speedup']:.2f}x; {e['n_candidates']} candidates, "
                                            f"{e['subcritical_share']:.0%} sub-critical; same selection: "
                                            f"{e['same_selection']})")]
    if not args.skip_graph:
        n_heldout = args.n_fields // 4 if args.n_heldout is None else args.n_heldout
        times, meta, figures = graph(args.survey, args.n_fields, n_heldout, args.root, args.workers,
                                     skip_fields=args.skip_fields, track_b_pu=args.track_b_pu,
                                     fusion_max_fpr=args.fusion_max_fpr)
        record.update(times=times, metadata=meta, figures=figures)
        for k, v in times.items():
            rows.append((f"wall {k}", f"{v:.1f} s"))
        if "cluster_fields" in meta:
            rows.append(("fields/s (simulation, all workers)", f"{meta['cluster_fields'].get('fields_per_s', 0):.2f}"))
        rows.append(("report gates", ", ".join(f"{k} {'pass' if v else 'FAIL'}"
                                               for k, v in meta.get("cluster_report_checks", {}).items())))
        rows.append(("fusion weights", str(meta["cluster_fusion"].get("weights", "")).replace("\n", " ")))
        rows.append(("track_b", f"{meta['cluster_track_b'].get('train_img_per_s', 0):.0f} stamps/s training, "
                                f"{meta['cluster_track_b'].get('precision', '')}"))
        tb = meta["cluster_track_b"]
        if "field_view_seconds" in tb:
            rows.append(("field_view", f"{tb['field_view_seconds']:.0f} s training on "
                                       f"{tb['field_view_overview_px']} px "
                                       f"overviews ({tb['field_view_seconds'] / times['cluster_track_b']:.2f} of "
                                       f"cluster_track_b's wall time)"))
        rates = track_a_rates(args.root, args.survey)
        record["track_a_rates"] = rates
        rows.append(("track_a fit", f"{rates['fit_s']:.2f} s for {rates['n_train']} fields ({rates['n_trees']} trees, "
                                    f"{rates['train_rows_per_s']:.0f} fields/s), {rates['fit_overhead']:.2f}x "
                                    "xgboost.train alone with early stopping's tree count "
                                    f"({rates['raw_fit_s']:.2f} s)"))
        rows.append(("track_a scoring", f"{rates['score_rows_per_s']:.0f} fields/s, {rates['score_overhead']:.2f}x "
                                        "the booster's inplace_predict"))
        for model, sets in figures.items():
            for name, f in sets.items():
                if "auroc" in f:
                    lo, hi = f["auroc_ci"]
                    rows.append((f"{model} {name}", f"AUROC {f['auroc']:.3f} [{lo:.3f}, {hi:.3f}]  TPR10 "
                                 f"{f['tpr10']:.3f}  TPR@FPR0.1 {f['tpr_at_fpr_0.1']:.3f}  "
                                 f"({f['n_lenses']} lenses / {f['n_nonlenses']} non-lenses)"))
    report("clusters", rows, record)
    return record


if __name__ == "__main__":
    main()
