"""How many of a held-out family's lenses a survey could see as lensed, and how the finder scores those.

    .venv/bin/python benchmarks/bench_heldout_visibility.py --root <a run's data root>   # e.g. a bench_ablation lever

The training population (``physical``) keeps a scene only where the survey can see its lensing (Collett 2015:
total magnification ≥ 3, arcs at reference-band S/N ≥ 20 with the deflector's photon noise, images resolved
beyond the seeing and the source's size, θE ≤ 3″; ``[selection]`` of ``physical.toml``), the way the Bologna
challenge counted a lens only where its lensed images showed. The ``heldout`` family (independent priors,
``population = "priors"``) labels every scene with a source behind the deflector a lens, seen or not. This redraws
each ``heldout`` object of a finished run from its seed and index (``science.simulation._member``, the same
draws), applies the training population's selection to its lensed galaxies (the population selects a scene on its
extended source and only then may make it a quasar's host, so lensed quasars, whose point images the selection
never tests, are reported apart) and splits the run's ``heldout`` AUROC (``scores/<survey>/ensemble_logits.parquet``)
into the lenses that pass, those that do not and the quasars, each against all non-lenses, and the ones that pass
against each non-lens type. A finder can be asked to find the lenses that pass; the others bound the family's AUROC
from above. The rings of knots are split by their radius (the knots' largest distance from the centre) at 1.2″,
where the training population's own rings, at 0.7-1.3 of their scene's Einstein radius, mostly end.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import knot_extent, report  # noqa: E402

SELECTION_KEYS = ("min_magnification", "min_arc_snr", "min_theta_e_over_fwhm", "source_size_in_resolution",
                  "max_theta_e_arcsec", "deflector_photon_noise")


def selection_of(family) -> dict:
    """The ``[selection]`` constants of a physical family (``physical.toml``'s are the training population's)."""
    out = {}
    for key in SELECTION_KEYS:
        prior = family.prior("selection", key)
        if prior.dist != "constant":
            raise ValueError(f"family {family.name}: [selection] {key} is a {prior.dist} prior, not a constant")
        out[key] = float(prior.params["value"])
    return out


def visibility(system, survey, selection: dict) -> dict:
    """The selection's figures of one lens ``system`` and whether it passes: a galaxy lens of a ``priors`` family
    (``science.simulation.System``, whose unlensed light is the deflector's alone), or anything with its
    ``components`` (the deflector's light first, unlensed; the source's lensed, its Sersic first), ``kwargs_lens``,
    ``psf_fwhm_arcsec``, ``exposure_scale`` (the selection's) and ``theta_e_arcsec``."""
    from lens_assets.science.population import lensed_source_check

    ref = survey.band(survey.reference_band).name
    fwhm = system.psf_fwhm_arcsec[ref]
    lensed = [c for c in system.components if c.lensed]
    unlensed = [c for c in system.components if not c.lensed]
    foreground = unlensed[:1] if selection["deflector_photon_noise"] else []  # the deflector's photon noise
    if lensed:
        mu, snr = lensed_source_check(system.kwargs_lens, lensed, survey=survey, fwhm_arcsec=fwhm,
                                      exposure_scale=system.exposure_scale, foreground=foreground)
    else:
        mu, snr = 0.0, 0.0
    r_src = float(lensed[0].shape.get("R_sersic", 0.0)) if lensed else 0.0
    theta_e = system.theta_e_arcsec
    resolved = theta_e**2 >= ((selection["min_theta_e_over_fwhm"] * fwhm) ** 2
                              + (selection["source_size_in_resolution"] * r_src) ** 2)
    visible = bool(mu >= selection["min_magnification"] and snr >= selection["min_arc_snr"] and resolved
                   and theta_e <= selection["max_theta_e_arcsec"])
    return {"magnification": float(mu), "selection_snr": float(snr), "resolved": bool(resolved), "visible": visible}


def redraw(objid: str, survey, family):
    """The ``System`` of a simulated object from its id (``sim-<survey>-<family>-s<seed>-<index>``)."""
    from lens_assets.science.simulation import _member

    m = re.fullmatch(rf"sim-{survey.name}-{re.escape(family.name)}-s(\d+)-(\d+)", objid)
    if m is None:
        raise ValueError(f"{objid!r} is not an object of family {family.name} on {survey.name}")
    return _member(survey, family, int(m.group(1)), int(m.group(2)))[0]


def visibility_table(scores, *, survey, family, selection: dict):
    """One row per ``family`` object in ``scores`` (a run's ensemble logits): its label, kind, logit and, for a
    lens, the selection's figures (:func:`visibility`). The redrawn Einstein radius must match the file's."""
    import numpy as np
    import pandas as pd

    rows = scores[scores["sim_family"] == family.name]
    out = []
    for objid, label, theta_e, logit in zip(rows["objid"], rows["label"], rows["theta_e"], rows["logit"]):
        system = redraw(objid, survey, family)
        if int(system.is_lens) != int(label) or (system.is_lens and not np.isclose(system.theta_e_arcsec, theta_e,
                                                                                  rtol=1e-4)):
            raise RuntimeError(f"{objid}: the redrawn object differs from the file's truth (label {label}, θE "
                               f"{theta_e}; redrawn {int(system.is_lens)}, {system.theta_e_arcsec}): another code "
                               "version drew it")
        rec = {"objid": objid, "label": int(label), "kind": system.kind, "theta_e": system.theta_e_arcsec,
               "logit": float(logit)}
        if system.is_lens and system.kind != "quasar":
            rec.update(visibility(system, survey, selection))
        if system.kind == "ring":
            rec["ring_radius"] = knot_extent(system)
        out.append(rec)
    return pd.DataFrame(out)


def main(argv=None) -> dict:
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from lens_assets import layout
    from lens_assets.resources.storage import LocalStorage
    from lens_assets.science.families import load_family
    from lens_assets.science.surveys import get_survey

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="data root of a run that has scored its rows (score_calibrator)")
    ap.add_argument("--survey", default="des")
    ap.add_argument("--family", default="heldout", help="a held-out family of independent priors")
    ap.add_argument("--selection-family", default="physical", help="the physical family whose selection applies")
    args = ap.parse_args(argv)
    path = LocalStorage(root=args.root).path(*layout.ensemble_scores(args.survey))
    if not path.exists():
        raise SystemExit(f"{path} does not exist: materialize score_calibrator in {args.root} first")
    survey, family = get_survey(args.survey), load_family(args.family)
    if family.population != "priors":
        raise SystemExit(f"family {family.name} has population {family.population!r}: this redraws families of "
                         "independent priors (population 'priors'); a physical family is selected already")
    selection = selection_of(load_family(args.selection_family))
    table = visibility_table(pd.read_parquet(path), survey=survey, family=family, selection=selection)
    lenses, nonlenses = table[table["label"] == 1], table[table["label"] == 0]
    if lenses.empty or nonlenses.empty:
        raise SystemExit(f"{path}: no {family.name} lenses or non-lenses to score")
    quasars = lenses[lenses["kind"] == "quasar"]
    galaxies = lenses[lenses["kind"] != "quasar"]
    if galaxies.empty:
        raise SystemExit(f"{path}: no {family.name} lenses of an extended source to select")
    seen = galaxies[galaxies["visible"].astype(bool)]
    unseen = galaxies[~galaxies["visible"].astype(bool)]

    def auroc(pos, neg) -> float:
        if pos.empty or neg.empty:
            return float("nan")
        return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos["logit"], neg["logit"]]))

    record = {"root": args.root, "family": family.name, "selection": selection, "n_lenses": len(lenses),
              "n_quasar_lenses": len(quasars), "n_nonlenses": len(nonlenses),
              "share_visible": len(seen) / len(galaxies),
              "share_magnification_pass": float((galaxies["magnification"] >= selection["min_magnification"]).mean()),
              "share_snr_pass": float((galaxies["selection_snr"] >= selection["min_arc_snr"]).mean()),
              "share_resolved": float(galaxies["resolved"].astype(bool).mean()),
              "auroc_all": auroc(lenses, nonlenses), "auroc_visible": auroc(seen, nonlenses),
              "auroc_not_visible": auroc(unseen, nonlenses), "auroc_quasar": auroc(quasars, nonlenses), "by_kind": {}}
    rows = [("lenses (quasars) / non-lenses", f"{len(lenses)} ({len(quasars)}) / {len(nonlenses)}"),
            ("galaxy lenses the selection keeps", f"{len(seen)} of {len(galaxies)} ({record['share_visible']:.2f}); "
             f"magnification {record['share_magnification_pass']:.2f}, S/N {record['share_snr_pass']:.2f}, "
             f"resolved {record['share_resolved']:.2f}"),
            ("AUROC, all lenses", f"{record['auroc_all']:.3f}"),
            ("AUROC, galaxy lenses it keeps", f"{record['auroc_visible']:.3f}"),
            ("AUROC, galaxy lenses it rejects", f"{record['auroc_not_visible']:.3f}"),
            ("AUROC, lensed quasars", f"{record['auroc_quasar']:.3f}")]
    for kind in sorted(nonlenses["kind"].unique()):
        neg = nonlenses[nonlenses["kind"] == kind]
        record["by_kind"][kind] = {"n": len(neg), "auroc_all": auroc(lenses, neg), "auroc_visible": auroc(seen, neg)}
        rows.append((f"  against {kind} ({len(neg)})", f"all lenses {record['by_kind'][kind]['auroc_all']:.3f}, "
                     f"kept galaxy lenses {record['by_kind'][kind]['auroc_visible']:.3f}"))
    rings = nonlenses[nonlenses["kind"] == "ring"]
    for lo, hi in ((0.0, 1.2), (1.2, np.inf)) if not rings.empty else ():
        part = rings[(rings["ring_radius"] >= lo) & (rings["ring_radius"] < hi)]
        key = f"rings_radius_{'lt_1.2' if lo == 0 else 'ge_1.2'}"
        record[key] = {"n": len(part), "auroc_all": auroc(lenses, part), "auroc_visible": auroc(seen, part)}
        rows.append((f"  against rings of radius {'< 1.2' if lo == 0 else '≥ 1.2'}″ ({len(part)})",
                     f"all lenses {record[key]['auroc_all']:.3f}, kept galaxy lenses "
                     f"{record[key]['auroc_visible']:.3f}"))
    for lo, hi in ((0.0, 1.2), (1.2, np.inf)):
        part = seen[(seen["theta_e"] >= lo) & (seen["theta_e"] < hi)]
        key = f"auroc_visible_theta_e_{'lt_1.2' if lo == 0 else 'ge_1.2'}"
        record[key] = auroc(part, nonlenses)
        rows.append((f"  kept lenses θE {'< 1.2' if lo == 0 else '≥ 1.2'}″ ({len(part)})", f"{record[key]:.3f}"))
    report("heldout_visibility", rows, record)
    return record


if __name__ == "__main__":
    main()
