"""Simulation throughput: the wrapper against bare lenstronomy on the same parameters, 1 core vs all.

    python benchmarks/bench_simulation.py [--survey des] [--n 200] [--n-parallel 400]

* bare: lenstronomy alone on the same physical parameters — per band build
  PSF / LightModel / LensModel / PointSource / ImageModel and call
  ``ImageModel.image``; quasars are given by their source position
  (``SOURCE_POSITION``, lenstronomy solves the lens equation). Parameters, PSF
  kernels and amplitudes are computed beforehand (untimed).
* image() floor: only the ``ImageModel.image`` calls on models built beforehand
  (the least any lenstronomy-based simulator must spend).
* wrapper: ``simulate_one`` — draw the parameters from the family, make the PSF
  kernels, render every band through lenstronomy, add noise, compute the truth.
* wrapper + FITS: the same and write the inbox-contract file (what the asset does).
* parallel efficiency: ``simulate_to_directory`` on every core against one core,
  rate(all) / (cores x rate(1)).
* the asset path with ``renderer: torch`` (``ml/torch_simulation.simulate_to_directory_torch``: the same objects
  and files, the light by the batched torch renderer), on one core and on every core, against lenstronomy's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report, timed  # noqa: E402

from lens_assets.ml.torch_simulation import simulate_to_directory_torch  # noqa: E402
from lens_assets.science.families import load_family  # noqa: E402
from lens_assets.science.simulation import (_simulate_and_write, lenstronomy_band_setup, simulate_one,  # noqa: E402
                                            simulate_to_directory, systems_for)
from lens_assets.science.surveys import get_survey  # noqa: E402


def physical(setup, system):
    """The band's kwargs with lensed quasars given by source position, as a bare lenstronomy user writes them."""
    s = {k: v for k, v in setup.items() if k != "image_model"}
    if s["point_source_type_list"]:
        types, kws = [], []
        for p, t, kw in zip(system.points, s["point_source_type_list"], s["kwargs_ps"]):
            if t == "LENSED_POSITION":
                types.append("SOURCE_POSITION")
                kws.append({"ra_source": p.source_xy[0], "dec_source": p.source_xy[1],
                            "source_amp": float(kw["point_amp"][0] / p.magnification[0])})
            else:
                types.append(t)
                kws.append(kw)
        s["point_source_type_list"], s["kwargs_ps"] = types, kws
    return s


def image_floor(setups):
    for bands in setups:
        for s in bands:
            s["image_model"].image(s["kwargs_lens"], s["kwargs_source"], s["kwargs_lens_light"], s["kwargs_ps"])


def bare_lenstronomy(prepared, survey):
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.PointSource.point_source import PointSource
    from lenstronomy.Util.simulation_util import data_configure_simple

    data = ImageData(**data_configure_simple(survey.cutout_size_px, survey.pixel_scale_arcsec, inverse=True))
    for bands in prepared:
        for s in bands:
            lens = LensModel(s["lens_model_list"]) if s["lens_model_list"] else None
            im = ImageModel(
                data, PSF(psf_type="PIXEL", kernel_point_source=s["psf"]), lens_model_class=lens,
                source_model_class=LightModel(s["source_light_model_list"]) if s["source_light_model_list"] else None,
                lens_light_model_class=LightModel(s["lens_light_model_list"]) if s["lens_light_model_list"] else None,
                point_source_class=(PointSource(s["point_source_type_list"], lens_model=lens,
                                                fixed_magnification_list=[t == "SOURCE_POSITION" for t in
                                                                          s["point_source_type_list"]])
                                    if s["point_source_type_list"] else None),
                kwargs_numerics={"supersampling_factor": 2})
            im.image(s["kwargs_lens"], s["kwargs_source"], s["kwargs_lens_light"], s["kwargs_ps"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--survey", default="des")
    ap.add_argument("--family", default="baseline")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-parallel", type=int, default=400)
    args = ap.parse_args(argv)
    survey, family = get_survey(args.survey), load_family(args.family)
    seed = 7
    simulate_one(survey, family, seed, 0)  # import and cache warm-up

    systems = systems_for(survey, family, seed, range(args.n))
    setups = [[lenstronomy_band_setup(s, survey, b) for b in survey.band_names] for s in systems]
    prepared = [[physical(b, s) for b in bands] for s, bands in zip(systems, setups)]
    _, t_bare = timed(bare_lenstronomy, prepared, survey)
    _, t_floor = timed(image_floor, setups)
    _, t_wrap = timed(lambda: [simulate_one(survey, family, seed, i) for i in range(args.n)])
    with tempfile.TemporaryDirectory() as tmp:
        _, t_write = timed(lambda: [_simulate_and_write((survey, family, seed, i, tmp, True, "train"))
                                    for i in range(args.n)])
    with tempfile.TemporaryDirectory() as tmp:
        _, t1 = simulate_to_directory(survey, family, n_cutouts=args.n_parallel, seed=seed, out_dir=Path(tmp) / "a",
                                      workers=1, progress=False)
        _, tn = simulate_to_directory(survey, family, n_cutouts=args.n_parallel, seed=seed, out_dir=Path(tmp) / "b",
                                      workers=0, progress=False)
        # the same objects and files, the light drawn by the batched torch renderer (renderer: torch)
        _, t1_torch = simulate_to_directory_torch(survey, family, n_cutouts=args.n_parallel, seed=seed,
                                                  out_dir=Path(tmp) / "c", workers=1, progress=False)
        _, tn_torch = simulate_to_directory_torch(survey, family, n_cutouts=args.n_parallel, seed=seed,
                                                  out_dir=Path(tmp) / "d", workers=0, progress=False)
    n_cores = cores()
    rec = {
        "survey": survey.name, "bands": survey.n_bands, "cutout_px": survey.cutout_size_px, "n": args.n,
        "bare_cutouts_per_s": args.n / t_bare, "image_floor_cutouts_per_s": args.n / t_floor,
        "wrapper_over_floor": t_wrap / t_floor - 1.0, "wrapper_cutouts_per_s": args.n / t_wrap,
        "wrapper_fits_cutouts_per_s": args.n / t_write,
        "wrapper_overhead": t_wrap / t_bare - 1.0, "wrapper_fits_overhead": t_write / t_bare - 1.0,
        "one_core_cutouts_per_s": args.n_parallel / t1, "all_cores_cutouts_per_s": args.n_parallel / tn,
        "cores": n_cores, "parallel_efficiency": (t1 / tn) / n_cores,
        "torch_one_core_cutouts_per_s": args.n_parallel / t1_torch,
        "torch_all_cores_cutouts_per_s": args.n_parallel / tn_torch,
        "torch_over_lenstronomy_one_core": t1 / t1_torch, "torch_over_lenstronomy_all_cores": tn / tn_torch,
    }
    report("simulation", [
        ("survey", f"{survey.name}: {survey.n_bands} bands, {survey.cutout_size_px}x{survey.cutout_size_px} px"),
        ("bare lenstronomy (1 core)", f"{rec['bare_cutouts_per_s']:.1f} cutouts/s"),
        ("image() floor (1 core)", f"{rec['image_floor_cutouts_per_s']:.1f} cutouts/s"),
        ("wrapper, in memory (1 core)", f"{rec['wrapper_cutouts_per_s']:.1f} cutouts/s  "
                                        f"-> adds {rec['wrapper_overhead']:+.1%} over bare (target <= +15%), "
                                        f"{rec['wrapper_over_floor']:+.1%} over the image() floor"),
        ("wrapper + FITS write (1 core)", f"{rec['wrapper_fits_cutouts_per_s']:.1f} cutouts/s  "
                                          f"-> adds {rec['wrapper_fits_overhead']:+.1%} over bare"),
        ("asset path, 1 core", f"{rec['one_core_cutouts_per_s']:.1f} cutouts/s ({args.n_parallel} cutouts)"),
        (f"asset path, {n_cores} cores", f"{rec['all_cores_cutouts_per_s']:.1f} cutouts/s"),
        ("parallel efficiency", f"{rec['parallel_efficiency']:.1%} (target >= 85%)"),
        ("asset path, torch renderer, 1 core", f"{rec['torch_one_core_cutouts_per_s']:.1f} cutouts/s  "
                                               f"({rec['torch_over_lenstronomy_one_core']:.2f}x lenstronomy)"),
        (f"asset path, torch renderer, {n_cores} cores",
         f"{rec['torch_all_cores_cutouts_per_s']:.1f} cutouts/s  "
         f"({rec['torch_over_lenstronomy_all_cores']:.2f}x lenstronomy)"),
    ], rec)
    return rec


if __name__ == "__main__":
    main()
