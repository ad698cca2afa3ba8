"""Calibrators on synthetic logits: in-sample vs cross-fitted vs fresh-data ECE, and fit time, per method.

    python benchmarks/bench_calibration.py [--n 2000] [--repeats 5] [--folds 5]

Three populations of ``--n`` logits (about the size of a calibrate half), labels
drawn from a known truth: ``overconfident`` (truth sigmoid(z / 2.5)), ``shifted``
(truth sigmoid(z - 2): the offset a mean of biased members gives, which
temperature scaling cannot remove) and ``noise`` (labels independent of z, lens
rate 0.3). For each method of ``science.calibration`` (and ``auto``) the table
gives the ECE on the rows it was fit to (in-sample: what ``ece_val_after`` used to
report), the cross-fitted ECE (``cross_fit`` by sky groups of two rows: what
``score_calibrator`` reports as ``ece_cal_crossfit_after``), the ECE of the same
fit on ``--n`` fresh rows from the truth (what cross-fitting estimates), and the
fit time on all rows. Medians over ``--repeats`` data sets (seeds 0, 1, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report  # noqa: E402

POPULATIONS = ("overconfident", "shifted", "noise")


def _draw(population: str, n: int, rng):
    import numpy as np
    from scipy.special import expit

    z = rng.normal(0.0, 3.0, n)
    truth = {"overconfident": expit(z / 2.5), "shifted": expit(z - 2.0), "noise": np.full(n, 0.3)}[population]
    return z, (rng.uniform(size=n) < truth).astype(int)


def main(argv=None) -> dict:
    import numpy as np

    from lens_assets.science.calibration import METHODS, cross_fit, fit_calibrator
    from lens_assets.science.metrics import expected_calibration_error as ece

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="rows fit to (and fresh rows scored)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args(argv)
    runs: dict = {}
    for seed in range(args.repeats):
        for population in POPULATIONS:
            rng = np.random.default_rng(seed)
            z, y = _draw(population, args.n, rng)
            zf, yf = _draw(population, args.n, rng)
            groups = np.arange(args.n) // 2
            for method in ("auto", *METHODS):
                t0 = time.perf_counter()
                cal = fit_calibrator(z, y, method=method, n_folds=args.folds, groups=groups)
                seconds = time.perf_counter() - t0
                oof = cross_fit(lambda zt, yt, m=cal.method: fit_calibrator(zt, yt, method=m).predict, z, y, groups,
                                n_folds=args.folds, seed=seed)
                r = runs.setdefault((population, method), {"in_sample": [], "crossfit": [], "fresh": [],
                                                           "fit_s": [], "chosen": []})
                r["in_sample"].append(ece(y, cal.predict(z)))
                r["crossfit"].append(ece(y, oof))
                r["fresh"].append(ece(yf, cal.predict(zf)))
                r["fit_s"].append(seconds)
                r["chosen"].append(cal.method)
    rows, record = [], {"n": args.n, "repeats": args.repeats, "folds": args.folds, "results": []}
    rows.append(("population / method", "ECE in-sample | cross-fitted | fresh data | fit time (medians)"))
    for (population, method), r in runs.items():
        med = {k: float(np.median(v)) for k, v in r.items() if k != "chosen"}
        chosen = max(set(r["chosen"]), key=r["chosen"].count) if method == "auto" else ""
        rows.append((f"{population} / {method}" + (f" (-> {chosen})" if chosen else ""),
                     f"{med['in_sample']:.4f} | {med['crossfit']:.4f} | {med['fresh']:.4f} | "
                     f"{med['fit_s'] * 1e3:.1f} ms"))
        record["results"].append({"population": population, "method": method, "chosen": r["chosen"], **med})
    report("calibration", rows, record)
    return record


if __name__ == "__main__":
    main()
