"""The physical population's lens properties, to compare with published lens samples, and what its selection costs.

    .venv/bin/python benchmarks/bench_population.py                    # DES, 1,500 scenes per variant
    .venv/bin/python benchmarks/bench_population.py --survey lsst --n 3000

Draws scenes of the ``physical`` family (``lens_assets.science.population.draw_scene``: the deflector from the
velocity-dispersion function, the redshifts, θE, the deflector's light, the source, then the selection) and prints
the quantiles (10/25/50/75/90 %) of θE, σ, z_l, z_s, the deflector's and the lensed source's reference-band
magnitudes, the scene-level flux ratio (lensed source / (lensed source + deflector), from the magnitudes) and the
total magnification, side by side for each selection variant in ``--variants``:

* ``collett``: the family as packaged (Collett 2015, ApJ 811, 20): arc S/N against the sky and the deflector's
  photon noise, images resolved when θE² > r_s² + (s/2)².
* ``no_deflector_noise``: the arcs' S/N against sky, read and source noise alone.
* ``no_source_size``: the resolution test without the source's size (θE > s/2 alone).
* ``neither``: both of the above (the selection before either was added).

Beside them, the scenes drawn per second and the tries per kept scene (the selection's cost). Then the selection's
ray tracing (``population.lensed_image``, about eight calls per kept scene) with lenstronomy's profiles in closed
form (the default) against ``LensModel`` / ``LightModel``: the same ``--speed-scenes`` scenes drawn with each,
alternating (each round in the other order), ``--rounds`` times; medians, their ratio, whether the two drew the
same scenes, and the largest relative difference between their magnifications. Then the rings of knots among the
first ``--ring-objects`` objects of ``physical`` and of the ``heldout`` family: their radius and their knots' flux
over their galaxy's (quantiles), and the share of rings reaching 1.2". Published samples
to set beside it (θE): SLACS 0.7-1.6″ (Bolton et al. 2008, ApJ 682, 964), HSC/SuGOHI and DES candidates mostly
above 1″ where the seeing is ~0.7-1″.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _util import edit_toml_key, report  # noqa: E402

# variant -> [selection] keys replaced in physical.toml (None: the family as packaged)
VARIANTS = {"collett": None,
            "no_deflector_noise": {"deflector_photon_noise": "0"},
            "no_source_size": {"source_size_in_resolution": "0.0"},
            "neither": {"deflector_photon_noise": "0", "source_size_in_resolution": "0.0"}}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _family(variant: str, tmp: Path):
    from lens_assets.science.families import FAMILY_DIR, load_family

    edits = VARIANTS[variant]
    if edits is None:
        return load_family("physical")
    text = (FAMILY_DIR / "physical.toml").read_text()
    for key, value in edits.items():
        text = edit_toml_key(text, "selection", key, value)
    path = tmp / f"physical_{variant}.toml"
    path.write_text(text)
    return load_family(path)


def scene_table(family, survey, n: int, seed: int) -> tuple[dict, float, float]:
    """Per-scene properties of ``n`` scenes, the scenes per second and the mean tries per kept scene."""
    from lens_assets.science.population import draw_scene
    from lens_assets.science.simulation import object_rng

    cols: dict[str, list] = {k: [] for k in ("theta_e", "sigma", "z_l", "z_s", "deflector_mag", "arc_mag",
                                             "flux_ratio", "magnification", "source_r_eff")}
    tries = 0
    t0 = time.perf_counter()
    for i in range(n):
        s = draw_scene(family, survey, object_rng(survey.name, family.name, seed, i))
        tries += s.tries
        f_arc, f_gal = 10 ** (-0.4 * s.arc_mag), 10 ** (-0.4 * s.galaxy_mag)
        for key, value in (("theta_e", s.theta_e_arcsec), ("sigma", s.sigma_kms), ("z_l", s.z_lens),
                           ("z_s", s.z_source), ("deflector_mag", s.galaxy_mag), ("arc_mag", s.arc_mag),
                           ("flux_ratio", f_arc / (f_arc + f_gal)), ("magnification", s.magnification),
                           ("source_r_eff", s.source_components[0].shape["R_sersic"])):
            cols[key].append(value)
    wall = time.perf_counter() - t0
    return {k: np.asarray(v) for k, v in cols.items()}, n / wall, tries / n


def selection_speed(family, survey, n: int, seed: int, rounds: int) -> dict:
    """Scenes per second with each ``lensed_image`` backend (the same ``n`` scenes, alternating ``rounds`` times;
    medians) and the largest relative differences between what the two selections kept."""
    import functools

    from lens_assets.science import population

    real = population.lensed_image
    rates: dict[str, list[float]] = {"closed_form": [], "lenstronomy": []}
    tables = {}
    try:
        for k in range(rounds):
            for backend in (list(rates) if k % 2 == 0 else list(rates)[::-1]):
                population.lensed_image = functools.partial(real, backend=backend)
                table, rate, _ = scene_table(family, survey, n, seed)
                rates[backend].append(rate)
                tables[backend] = table
    finally:
        population.lensed_image = real
    a, b = tables["closed_form"], tables["lenstronomy"]
    same = all(np.array_equal(a[k], b[k]) for k in ("theta_e", "sigma", "z_l", "z_s", "deflector_mag"))
    return {"scenes_per_s": {k: float(np.median(v)) for k, v in rates.items()},
            "ratio": float(np.median(rates["closed_form"]) / np.median(rates["lenstronomy"])),
            "same_scenes": same,
            "max_rel_diff_magnification": float(np.max(np.abs(a["magnification"] / b["magnification"] - 1.0)))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--speed-scenes", type=int, default=100, help="scenes per backend and round (0: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ring-objects", type=int, default=2000,
                    help="objects of physical and heldout whose rings of knots are described (0: skip)")
    args = ap.parse_args(argv)
    from lens_assets.science.surveys import get_survey

    survey = get_survey(args.survey)
    out, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; variants are {list(VARIANTS)}")
            table, rate, tries = scene_table(_family(variant, Path(tmp)), survey, args.n, args.seed)
            out[variant] = {"table": table, "scenes_per_s": rate, "tries_per_scene": tries}
    names = list(out)
    print(f"{args.survey}, {args.n} scenes per variant; quantiles {', '.join(f'{q:.0%}' for q in QUANTILES)}")
    print("| property | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in next(iter(out.values()))["table"]:
        cells = [" / ".join(f"{v:.2f}" for v in np.quantile(out[n]["table"][key], QUANTILES)) for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for label, fn in (("share theta_e >= 1.5\"", lambda t: (t["theta_e"] >= 1.5).mean()),
                      ("share flux_ratio < 0.1", lambda t: (t["flux_ratio"] < 0.1).mean())):
        print(f"| {label} | " + " | ".join(f"{fn(out[n]['table']):.3f}" for n in names) + " |")
    print("| scenes/s | " + " | ".join(f"{out[n]['scenes_per_s']:.1f}" for n in names) + " |")
    print("| tries per kept scene | " + " | ".join(f"{out[n]['tries_per_scene']:.1f}" for n in names) + " |")
    for n in names:
        rows.append((n, f"theta_e median {np.median(out[n]['table']['theta_e']):.3f}\", "
                        f"{out[n]['scenes_per_s']:.1f} scenes/s"))
    record = {n: {k: [float(x) for x in np.quantile(v, QUANTILES)] for k, v in out[n]["table"].items()} for n in names}
    if args.speed_scenes > 0:
        from lens_assets.science.families import load_family

        speed = selection_speed(load_family("physical"), survey, args.speed_scenes, args.seed, args.rounds)
        r = speed["scenes_per_s"]
        print(f"selection's ray tracing, {args.speed_scenes} scenes x {args.rounds} rounds (medians): closed forms "
              f"{r['closed_form']:.1f} scenes/s, lenstronomy {r['lenstronomy']:.1f} scenes/s ({speed['ratio']:.2f}x); "
              f"same scenes: {speed['same_scenes']}, magnifications within {speed['max_rel_diff_magnification']:.1e}")
        rows.append(("selection, closed forms / lenstronomy", f"{speed['ratio']:.2f}x ({r['closed_form']:.1f} against "
                                                              f"{r['lenstronomy']:.1f} scenes/s)"))
        record["selection_speed"] = speed
        out["selection_speed"] = speed
    if args.ring_objects > 0:
        rings = ring_table(survey, args.ring_objects, args.seed)
        for name, t in rings.items():
            extent, share = (np.quantile(t[k], QUANTILES) if len(t[k]) else [np.nan] * len(QUANTILES)
                             for k in ("extent", "flux_share"))
            big = float((t["extent"] >= 1.2).mean()) if len(t["extent"]) else float("nan")
            print(f"rings of {name}: {len(t['extent'])} in {args.ring_objects} objects; radius (arcsec) "
                  f"{' / '.join(f'{v:.2f}' for v in extent)}, share >= 1.2\" {big:.3f}; knots' flux over the "
                  f"galaxy's {' / '.join(f'{v:.2f}' for v in share)}")
            rows.append((f"rings of {name}", f"{len(t['extent'])}, radius median {extent[2]:.2f}\", share >= 1.2\" "
                                              f"{big:.3f}, flux share median {share[2]:.2f}"))
            record[f"rings_{name}"] = {"n": len(t["extent"]), "share_radius_ge_1.2": big,
                                       "radius": [float(v) for v in extent], "flux_share": [float(v) for v in share]}
        out["rings"] = rings
    report("population", rows, record)
    return out


def ring_table(survey, n_objects: int, seed: int) -> dict:
    """The rings of knots among the first ``n_objects`` objects of ``physical`` (the training population: rings at
    0.7-1.3 of their scene's Einstein radius with the lensed arcs' flux) and of ``heldout`` (independent priors):
    per family, each ring's radius (``_util.knot_extent``) and its knots' flux over its galaxy's
    (``_util.knot_flux_share``) in the reference band."""
    from _util import knot_extent, knot_flux_share

    from lens_assets.science.families import load_family
    from lens_assets.science.simulation import systems_for

    out = {}
    for name in ("physical", "heldout"):
        systems = [s for s in systems_for(survey, load_family(name), seed, range(n_objects)) if s.kind == "ring"]
        out[name] = {"extent": np.array([knot_extent(s) for s in systems]),
                     "flux_share": np.array([knot_flux_share(s) for s in systems])}
    return out


if __name__ == "__main__":
    main()
