"""Held-out renderer throughput: GalSim + caustics (``render_galsim``) against lenstronomy (``simulate_one``).

    python benchmarks/bench_render_galsim.py [--survey des] [--n 60] [--rounds 3] [--n-parallel 120]

Per round, on one core and in one process, each renderer draws and renders the same
number of cutouts (objects ``i`` of its own family and seed, with noise, in memory,
no file): ``render_galsim.simulate_galsim_one`` on the ``galsim`` family and
``simulation.simulate_one`` on ``baseline``; then both again with the inbox-contract
FITS write. The figures are medians over the rounds; the rounds interleave the two
renderers so load from other processes falls on both alike. A warm-up cutout of
each first pays the imports (torch, caustics, galsim, lenstronomy) and GalSim's
Sersic tables for the warm-up's indices.

Last, ``simulate_galsim_to_directory`` on every core against one core (the asset's
path), and what that makes of the target: 8,000 DES cutouts in 10 minutes on 2
cores is 6.7 cutouts/s per core (the brief asks >= 15 per core for headroom).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report, timed  # noqa: E402

from lens_assets.ml.render_galsim import (_simulate_and_write as galsim_write, load_galsim_family,  # noqa: E402
                                          simulate_galsim_one, simulate_galsim_to_directory)
from lens_assets.science.families import load_family  # noqa: E402
from lens_assets.science.simulation import _simulate_and_write as lenstronomy_write, simulate_one  # noqa: E402
from lens_assets.science.surveys import get_survey  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n", type=int, default=60, help="cutouts per renderer per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-parallel", type=int, default=120, help="cutouts for the 1-core / all-cores asset path")
    args = ap.parse_args(argv)
    survey = get_survey(args.survey)
    gfam, lfam = load_galsim_family("galsim"), load_family("baseline")
    seed = 7
    for i in range(3):  # imports and caches
        simulate_galsim_one(survey, gfam, seed, 10**6 + i)
        simulate_one(survey, lfam, seed, 10**6 + i)

    t = {"galsim": [], "lenstronomy": [], "galsim_fits": [], "lenstronomy_fits": []}
    for r in range(args.rounds):
        idx = range(r * args.n, (r + 1) * args.n)
        t["galsim"].append(timed(lambda: [simulate_galsim_one(survey, gfam, seed, i) for i in idx])[1])
        t["lenstronomy"].append(timed(lambda: [simulate_one(survey, lfam, seed, i) for i in idx])[1])
        with tempfile.TemporaryDirectory() as tmp:
            t["galsim_fits"].append(timed(lambda: [galsim_write((survey, gfam, seed, i, tmp, True, "train"))
                                                   for i in idx])[1])
            t["lenstronomy_fits"].append(timed(lambda: [lenstronomy_write((survey, lfam, seed, i, tmp, True, "train"))
                                                        for i in idx])[1])
    rate = {k: args.n / statistics.median(v) for k, v in t.items()}
    n_cores = cores()
    with tempfile.TemporaryDirectory() as tmp:
        _, t1 = simulate_galsim_to_directory(survey, gfam, n_cutouts=args.n_parallel, seed=seed,
                                             out_dir=Path(tmp) / "a", workers=1, progress=False)
        _, tn = simulate_galsim_to_directory(survey, gfam, n_cutouts=args.n_parallel, seed=seed,
                                             out_dir=Path(tmp) / "b", workers=0, progress=False)
    rec = {
        "survey": survey.name, "bands": survey.n_bands, "cutout_px": survey.cutout_size_px, "n": args.n,
        "rounds": args.rounds, **{f"{k}_cutouts_per_s": v for k, v in rate.items()},
        "galsim_over_lenstronomy": rate["galsim"] / rate["lenstronomy"],
        "one_core_cutouts_per_s": args.n_parallel / t1, "all_cores_cutouts_per_s": args.n_parallel / tn,
        "cores": n_cores, "parallel_efficiency": (t1 / tn) / n_cores,
        "minutes_for_8000": 8000 / (args.n_parallel / tn) / 60,
        "round_seconds": t,
    }
    report("render_galsim", [
        ("survey", f"{survey.name}: {survey.n_bands} bands, {survey.cutout_size_px}x{survey.cutout_size_px} px"),
        ("medians over", f"{args.rounds} rounds of {args.n} cutouts per renderer (1 core)"),
        ("galsim+caustics, in memory", f"{rate['galsim']:.1f} cutouts/s"),
        ("lenstronomy, in memory", f"{rate['lenstronomy']:.1f} cutouts/s  "
                                   f"(galsim/lenstronomy = {rec['galsim_over_lenstronomy']:.2f})"),
        ("galsim+caustics + FITS", f"{rate['galsim_fits']:.1f} cutouts/s (target >= 15 per core)"),
        ("lenstronomy + FITS", f"{rate['lenstronomy_fits']:.1f} cutouts/s"),
        ("galsim asset path, 1 core", f"{rec['one_core_cutouts_per_s']:.1f} cutouts/s ({args.n_parallel} cutouts)"),
        (f"galsim asset path, {n_cores} cores", f"{rec['all_cores_cutouts_per_s']:.1f} cutouts/s "
                                                f"-> 8,000 in {rec['minutes_for_8000']:.1f} min (target <= 10)"),
        ("parallel efficiency", f"{rec['parallel_efficiency']:.1%}"),
    ], rec)
    return rec


if __name__ == "__main__":
    main()
