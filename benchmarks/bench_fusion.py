"""The cluster track's score fusion and its Deep SVDD anomaly backstop, against single components and sklearn.

    .venv/bin/python benchmarks/bench_fusion.py --n-fields 2000 --n-rows 4000 --seeds 5
    .venv/bin/python benchmarks/bench_fusion.py --table components.parquet   # a saved models.component_table

1. Fusion (medians over ``--seeds``): on synthetic component tables (``track_a``,
   ``track_b``, ``colour_consistency`` with 5 % NaN, ``anomaly``; lenses of three
   kinds, each plain in a different component) or on a saved component table
   (``--table``: split/val_role/label and component columns; the seeds then only
   change the fusion's random starts), the fused score's TPR at FPR 0.1 and AUROC
   on the test rows against the best single component's (the one best on the
   fusion's fit rows, the val calibrate rows, signed by its AUROC there), and the
   fit time (scipy minimize over all starts, for the final weights and each fold
   of the out-of-fold calibration, calibration included).
2. Deep SVDD against sklearn's IsolationForest and OneClassSVM (nu 0.1, RBF, gamma
   "scale") on the same data: ``--n-rows`` training inliers of a correlated
   ``--n-features``-dimensional Gaussian, scored on held-out inliers and on
   outliers (half shifted by 1 sigma along every axis, half 2x wider): fit time,
   rows/s of fitting, and AUROC.

Results go to ``benchmarks/results/fusion.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report  # noqa: E402

COMPONENTS = ("track_a", "track_b", "colour_consistency", "anomaly")


def synthetic_components(n: int, seed: int):
    """A component table: val (half stop, half calibrate) 40 %, test 60 %; 40 % lenses of three kinds: plain to
    track_a, plain to track_b, or odd (high anomaly, faint to both)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.4).astype(int)
    kind = rng.choice(3, size=n, p=[0.45, 0.4, 0.15]) * y
    lens_a, lens_b, odd = (y == 1) & (kind == 0), (y == 1) & (kind == 1), (y == 1) & (kind == 2)
    t = pd.DataFrame({
        "objid": [f"s{seed}_{i}" for i in range(n)], "label": y,
        "track_a": rng.normal(size=n) + 2.0 * lens_a + 0.6 * lens_b,
        "track_b": rng.normal(size=n) + 2.0 * lens_b + 0.6 * lens_a,
        "colour_consistency": np.clip(0.5 + 0.08 * y + 0.2 * rng.normal(size=n), 0, 1),
        "anomaly": np.abs(rng.normal(size=n)) + 2.5 * odd,
    })
    t.loc[rng.uniform(size=n) < 0.05, "colour_consistency"] = np.nan
    split = np.where(np.arange(n) < int(0.4 * n), "val", "test")
    t["split"] = split
    t["val_role"] = np.where(split == "val", np.where(np.arange(n) % 2 == 0, "stop", "calibrate"), "")
    return t


def fusion_figures(table, components, seed: int) -> dict:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from lens_assets.science.clusters.fusion import fit_fusion
    from lens_assets.science.metrics import tpr_at_fpr

    t0 = time.perf_counter()
    f = fit_fusion(table, components, max_fpr=0.1, seed=seed)
    fit_s = time.perf_counter() - t0
    test = table[table["split"] == "test"]
    y = test["label"].to_numpy(int)
    fit = table[(table["split"] == "val") & (table["val_role"] == f.fit_role)]
    best = max(f.fit_single, key=f.fit_single.get)  # chosen on the fit rows, as the fusion is
    sign = 1.0 if roc_auc_score(fit["label"], fit[best].fillna(f.impute[best])) >= 0.5 else -1.0
    single = sign * test[best].fillna(f.impute[best]).to_numpy()
    fused = f.logit(test)
    return {"fused_tpr": tpr_at_fpr(y, fused, 0.1), "fused_auroc": roc_auc_score(y, fused),
            "single_tpr": tpr_at_fpr(y, single, 0.1), "single_auroc": roc_auc_score(y, single), "best_single": best,
            "fit_s": fit_s, "n_fit": len(fit), "k": f.k, "weights": f.weights,
            "oracle_single_tpr": max(tpr_at_fpr(y, s * test[c].fillna(f.impute[c]), 0.1)
                                     for c in components for s in (1, -1))}


def anomaly_figures(n_rows: int, n_features: int, seed: int) -> dict:
    import numpy as np
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score
    from sklearn.svm import OneClassSVM

    from lens_assets.science.clusters.anomaly import fit_deep_svdd

    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features) + np.eye(n_features)

    def draw(n, shift=0.0, scale=1.0):
        return (rng.normal(size=(n, n_features)) * scale + shift) @ mix

    train = draw(n_rows)
    n_test = max(n_rows // 4, 100)
    test = np.vstack([draw(n_test), draw(n_test // 2, shift=1.0), draw(n_test - n_test // 2, scale=2.0)])
    y = np.r_[np.zeros(n_test), np.ones(n_test)]
    out = {}
    models = {
        "deep_svdd": lambda: fit_deep_svdd(train, seed=seed),
        "isolation_forest": lambda: IsolationForest(random_state=seed, n_jobs=1).fit(train),
        "one_class_svm": lambda: OneClassSVM(nu=0.1, gamma="scale").fit(train),
    }
    for name, fit in models.items():
        t0 = time.perf_counter()
        m = fit()
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = m.score(test) if name == "deep_svdd" else -m.score_samples(test)
        score_s = time.perf_counter() - t0
        out[name] = {"fit_s": fit_s, "rows_per_s": n_rows / fit_s, "score_rows_per_s": len(test) / score_s,
                     "auroc": roc_auc_score(y, s)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fields", type=int, default=2000, help="fields per synthetic component table")
    ap.add_argument("--table", default=None, help="a saved component table (Parquet) instead of synthetic ones")
    ap.add_argument("--n-rows", type=int, default=4000, help="training rows of the anomaly comparison")
    ap.add_argument("--n-features", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    import pandas as pd

    med = statistics.median
    saved = pd.read_parquet(args.table) if args.table else None
    runs = []
    for seed in range(args.seeds):
        table = saved if saved is not None else synthetic_components(args.n_fields, seed)
        comps = [c for c in COMPONENTS if c in table]
        runs.append(fusion_figures(table, comps, seed))
    anomaly = [anomaly_figures(args.n_rows, args.n_features, seed) for seed in range(args.seeds)]
    record = {"args": vars(args), "fusion": runs, "anomaly": anomaly}
    m = {k: med(r[k] for r in runs) for k in ("fused_tpr", "single_tpr", "oracle_single_tpr", "fused_auroc",
                                              "single_auroc", "fit_s", "n_fit", "k")}
    source = args.table or f"synthetic, {args.n_fields} fields"
    rows = [("fusion data", f"{source}; fit on {int(m['n_fit'])} val calibrate rows (k = {int(m['k'])}); "
                            f"components {comps}"),
            ("TPR@FPR0.1 fused / best single", f"{m['fused_tpr']:.3f} / {m['single_tpr']:.3f}  (best single on "
                                               f"test, chosen after the fact: {m['oracle_single_tpr']:.3f})"),
            ("AUROC fused / best single", f"{m['fused_auroc']:.3f} / {m['single_auroc']:.3f}"),
            ("best single (fit rows)", ", ".join(sorted({r["best_single"] for r in runs}))),
            ("fit_fusion (minimize x (1 + folds) + calibration)", f"{m['fit_s']:.2f} s"),
            ("weights (seed 0)", ", ".join(f"{k} {v:+.3f}" for k, v in runs[0]["weights"].items()))]
    rows.append(("anomaly data", f"{args.n_rows} training rows x {args.n_features} features"))
    for name in ("deep_svdd", "isolation_forest", "one_class_svm"):
        f = {k: med(a[name][k] for a in anomaly) for k in ("fit_s", "rows_per_s", "score_rows_per_s", "auroc")}
        rows.append((name, f"fit {f['fit_s']:.2f} s ({f['rows_per_s']:.0f} rows/s), scoring "
                           f"{f['score_rows_per_s']:.0f} rows/s, AUROC {f['auroc']:.3f}"))
    report("fusion", rows, record)
    return record


if __name__ == "__main__":
    main()
