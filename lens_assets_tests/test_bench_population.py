"""bench_population's selection variants are the packaged family with the named [selection] keys changed."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_population  # noqa: E402


def test_variants_edit_the_selection_and_the_tables_hold_every_scene(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_population, "report", lambda *a, **k: None)  # no results file from a test
    fam = bench_population._family("neither", tmp_path)
    sel = fam.sections["selection"]
    rng = np.random.default_rng(0)
    assert sel["deflector_photon_noise"].sample(rng) == 0 and sel["source_size_in_resolution"].sample(rng) == 0.0
    assert fam.name == "physical"  # the same random streams as the packaged family
    packaged = bench_population._family("collett", tmp_path)
    assert packaged.sections["selection"]["source_size_in_resolution"].sample(rng) == 1.0
    out = bench_population.main(["--n", "3", "--survey", "lsst", "--variants", "collett,neither", "--speed-scenes",
                                 "2", "--rounds", "1", "--ring-objects", "0"])
    speed = out.pop("selection_speed")
    assert list(out) == ["collett", "neither"]
    # both backends drew the same scenes; the ratio is the closed forms' rate over lenstronomy's
    assert speed["same_scenes"] and speed["max_rel_diff_magnification"] < 1e-12
    rates = speed["scenes_per_s"]
    assert speed["ratio"] == rates["closed_form"] / rates["lenstronomy"]
    for variant in out.values():
        table = variant["table"]
        assert all(len(v) == 3 for v in table.values()) and (table["magnification"] >= 3.0).all()
        assert ((table["flux_ratio"] > 0) & (table["flux_ratio"] < 1)).all()


def test_the_rings_radius_and_flux_share_follow_each_familys_priors():
    from lens_assets.science.families import load_family
    from lens_assets.science.surveys import get_survey

    rings = bench_population.ring_table(get_survey("des"), 80, 0)
    held, phys = rings["heldout"], rings["physical"]
    assert len(held["extent"]) >= 3 and len(phys["extent"]) >= 2
    hn = load_family("heldout").sections["hard_negatives"]
    # heldout's knots share ring_flux_fraction of their galaxy's flux: the share is that prior's draw
    f = hn["ring_flux_fraction"].params
    assert ((held["flux_share"] >= f["low"] - 1e-9) & (held["flux_share"] <= f["high"] + 1e-9)).all()
    r, q = hn["ring_radius_arcsec"].params, hn["ring_axis_ratio"].params["low"]
    assert ((held["extent"] >= q * r["low"] - 1e-9) & (held["extent"] <= r["high"] + 1e-9)).all()
    # the training rings carry the lensed arcs' flux and lie within 1.3 of an Einstein radius of at most 3"
    assert (phys["flux_share"] > 0).all() and (phys["extent"] <= 1.3 * 3.0).all()
