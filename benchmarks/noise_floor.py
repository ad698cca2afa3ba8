"""How far below the noise the simulated lenses lie: the FNR floor a perfect finder would have.

    python benchmarks/noise_floor.py [--survey des] [--family baseline] [--n 4000] [--n-nonlenses 5417]

Simulates ``--n`` objects of a family (no files written) and, for the lenses,
gives the matched-filter S/N of their noiseless lensed light (``arc_snr``) and
the FNR of an observer who knew every arc exactly at the TPR10 false-alarm rate
for ``--n-nonlenses`` non-lenses (``metrics.noise_limited_fnr``), per lensed-flux
-ratio bin. A trained finder's FNR can approach these figures, never beat them:
where the floor itself is above a gate, the gate asks for the impossible on that
population. The same floor is in every ``bologna_report`` (``noise_limited_fnr_*``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report  # noqa: E402


def _truth(args):
    from lens_assets.science.families import load_family
    from lens_assets.science.simulation import simulate_one
    from lens_assets.science.surveys import get_survey

    survey_name, family_name, seed, index = args
    family = load_family(family_name)
    if family.renderer == "galsim":  # a family rendered by other code: its own simulator, the same truth
        from lens_assets.ml.render_galsim import load_galsim_family, simulate_galsim_one

        c = simulate_galsim_one(get_survey(survey_name), load_galsim_family(family.path), seed, index)
        return {"label": int(c.scene.is_lens), "flux_ratio": c.flux_ratio, "theta_e": c.scene.theta_e_arcsec,
                "arc_snr": c.arc_snr}
    c = simulate_one(get_survey(survey_name), family, seed, index)
    return {"label": int(c.system.is_lens), "flux_ratio": c.flux_ratio, "theta_e": c.system.theta_e_arcsec,
            "arc_snr": c.arc_snr}


def main(argv=None) -> dict:
    import numpy as np
    import pandas as pd

    from lens_assets.science.metrics import ARC_SNR_BINS, FLUX_RATIO_BINS, noise_limited_fnr
    from lens_assets.science.parallel import parallel_map

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", default="des")
    ap.add_argument("--family", default="baseline")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--n-nonlenses", type=int, default=5417, help="non-lenses that set the TPR10 threshold")
    args = ap.parse_args(argv)
    truth = pd.DataFrame(parallel_map(_truth, [(args.survey, args.family, args.seed, i) for i in range(args.n)],
                                      workers=0, progress=True, desc="simulate", unit="obj"))
    lenses = truth[truth["label"] == 1]
    floor = noise_limited_fnr(lenses["arc_snr"], n_nonlenses=args.n_nonlenses)
    rec = {"survey": args.survey, "family": args.family, "n": args.n, "n_lenses": len(lenses),
           "n_nonlenses": args.n_nonlenses, "floor_all": float(floor.mean())}
    rows = [("population", f"{args.n} {args.survey} objects of '{args.family}', {len(lenses)} lenses; TPR10 "
                           f"threshold for {args.n_nonlenses} non-lenses ({cores()} cores)")]
    for name, lo, hi in FLUX_RATIO_BINS:
        m = ((lenses["flux_ratio"] >= lo) & (lenses["flux_ratio"] < hi)).to_numpy()
        snr = lenses["arc_snr"].to_numpy()[m]
        rec[f"noise_limited_fnr_flux_ratio_{name}"] = float(floor[m].mean()) if m.any() else float("nan")
        rec[f"median_arc_snr_flux_ratio_{name}"] = float(np.median(snr)) if m.any() else float("nan")
        rec[f"share_lenses_flux_ratio_{name}"] = float(m.mean())
        rows.append((f"flux ratio {name}", f"{m.sum()} lenses ({m.mean():.0%}); median arc S/N "
                                           f"{rec[f'median_arc_snr_flux_ratio_{name}']:.1f}; noise-limited FNR "
                                           f"{rec[f'noise_limited_fnr_flux_ratio_{name}']:.3f}"))
    for name, lo, hi in ARC_SNR_BINS:
        share = float(((lenses["arc_snr"] >= lo) & (lenses["arc_snr"] < hi)).mean())
        rec[f"share_lenses_arc_snr_{name}"] = share
        rows.append((f"arc S/N {name}", f"{share:.1%} of lenses"))
    rows.append(("all lenses", f"noise-limited FNR {rec['floor_all']:.3f} (TPR10 ceiling {1 - rec['floor_all']:.3f})"))
    report(f"noise_floor_{args.survey}_{args.family}", rows, rec)
    return rec


if __name__ == "__main__":
    main()
