"""bench_heldout_visibility: held-out objects redrawn from their ids, the training population's selection applied."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_heldout_visibility as bench  # noqa: E402
from _util import knot_extent  # noqa: E402

from lens_assets.science.families import load_family  # noqa: E402
from lens_assets.science.population import lensed_source_check  # noqa: E402
from lens_assets.science.simulation import simulate_to_directory  # noqa: E402
from lens_assets.science.surveys import get_survey  # noqa: E402


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    survey, family = get_survey("des"), load_family("heldout")
    truth, _ = simulate_to_directory(survey, family, n_cutouts=24, seed=4, out_dir=tmp_path_factory.mktemp("h"),
                                     workers=1, progress=False, role="heldout")
    scores = truth.assign(sim_family=family.name, logit=np.linspace(-1, 1, len(truth)))
    return survey, family, scores


def test_the_selection_is_the_physical_familys_constants():
    sel = bench.selection_of(load_family("physical"))
    assert sel == {"min_magnification": 3.0, "min_arc_snr": 20.0, "min_theta_e_over_fwhm": 0.5,
                   "source_size_in_resolution": 1.0, "max_theta_e_arcsec": 3.0, "deflector_photon_noise": 1.0}


def test_each_lens_is_redrawn_and_kept_exactly_when_it_passes_every_test(heldout_run):
    survey, family, scores = heldout_run
    sel = bench.selection_of(load_family("physical"))
    table = bench.visibility_table(scores, survey=survey, family=family, selection=sel)
    assert len(table) == len(scores) and table["label"].tolist() == scores["label"].tolist()
    quasars = table[(table["label"] == 1) & (table["kind"] == "quasar")]
    lenses = table[(table["label"] == 1) & (table["kind"] != "quasar")]
    assert len(quasars) >= 1 and quasars["magnification"].isna().all()  # never selected: reported apart
    assert len(lenses) >= 2 and lenses["magnification"].notna().all()
    expected = ((lenses["magnification"] >= 3) & (lenses["selection_snr"] >= 20) & lenses["resolved"].astype(bool)
                & (lenses["theta_e"] <= 3))
    assert (lenses["visible"].astype(bool) == expected).all()
    assert lenses["visible"].astype(bool).any() and not lenses["visible"].astype(bool).all()  # both outcomes here
    # the figures are the population's own check on the redrawn scene: its lensed light, the galaxy as foreground
    row = lenses.iloc[0]
    system = bench.redraw(row["objid"], survey, family)
    ref = survey.band(survey.reference_band).name
    mu, snr = lensed_source_check(system.kwargs_lens, [c for c in system.components if c.lensed], survey=survey,
                                  fwhm_arcsec=system.psf_fwhm_arcsec[ref], exposure_scale=system.exposure_scale,
                                  foreground=[c for c in system.components if not c.lensed])
    assert row["magnification"] == pytest.approx(mu) and row["selection_snr"] == pytest.approx(snr)
    assert table[table["label"] == 0]["kind"].isin(["plain", "companions", "merger", "ring", "spiral",
                                                    "chance_alignment"]).all()


def test_every_scene_the_training_population_kept_passes_with_its_own_figures():
    """The bench's selection against the population's: scenes ``draw_scene`` kept pass ``visibility`` with the
    magnification and S/N the population recorded."""
    from types import SimpleNamespace

    from lens_assets.science.population import _deflector_light, draw_scene

    survey, physical = get_survey("des"), load_family("physical")
    sel = bench.selection_of(physical)
    rng = np.random.default_rng(11)
    scenes = [s for s in (draw_scene(physical, survey, rng) for _ in range(12)) if s.source_kind == "extended"]
    assert len(scenes) >= 5
    for scene in scenes:
        system = SimpleNamespace(
            components=[_deflector_light(scene.galaxy, scene.galaxy_mag, scene.galaxy_beta),
                        *scene.source_components],
            kwargs_lens=scene.kwargs_lens, psf_fwhm_arcsec=scene.psf_fwhm_arcsec,
            exposure_scale=scene.exposure_scale, theta_e_arcsec=scene.theta_e_arcsec)
        got = bench.visibility(system, survey, sel)
        assert got["visible"] and got["resolved"]
        assert got["magnification"] == pytest.approx(scene.magnification, rel=1e-9)
        assert got["selection_snr"] == pytest.approx(scene.arc_snr_ref, rel=1e-9)


def test_an_object_whose_truth_differs_from_its_redraw_is_refused(heldout_run):
    survey, family, scores = heldout_run
    sel = bench.selection_of(load_family("physical"))
    lens = scores[scores["label"] == 1].index[0]
    tampered = scores.copy()
    tampered.loc[lens, "theta_e"] += 0.1
    with pytest.raises(RuntimeError, match="redrawn object differs"):
        bench.visibility_table(tampered, survey=survey, family=family, selection=sel)
    with pytest.raises(ValueError, match="not an object of family heldout"):
        bench.redraw("sim-des-physical-s0-000001", survey, family)


def test_main_reads_a_runs_scores_and_splits_the_auroc(heldout_run, tmp_path, monkeypatch):
    import _util

    from lens_assets import layout
    from lens_assets.resources.storage import LocalStorage

    monkeypatch.setattr(_util, "RESULTS", tmp_path / "results")
    survey, family, scores = heldout_run
    path = LocalStorage(root=str(tmp_path)).path(*layout.ensemble_scores("des"))
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(scores).to_parquet(path)
    rec = bench.main(["--root", str(tmp_path)])
    assert rec["n_lenses"] + rec["n_nonlenses"] == len(scores)
    table = bench.visibility_table(scores, survey=survey, family=family, selection=bench.selection_of(
        load_family("physical")))
    galaxies = table[(table["label"] == 1) & (table["kind"] != "quasar")]
    assert rec["n_quasar_lenses"] == int(((table["label"] == 1) & (table["kind"] == "quasar")).sum())
    assert rec["share_visible"] == pytest.approx(galaxies["visible"].astype(bool).mean())
    # the AUROCs are sklearn's on the run's logits: the kept galaxy lenses against every non-lens
    from sklearn.metrics import roc_auc_score

    kept, neg = galaxies[galaxies["visible"].astype(bool)], table[table["label"] == 0]
    assert rec["auroc_visible"] == pytest.approx(roc_auc_score(
        np.r_[np.ones(len(kept)), np.zeros(len(neg))], np.r_[kept["logit"], neg["logit"]]))
    # rings split by their knots' extent: every ring in one bin or the other, each bin sklearn's AUROC
    rings = table[table["kind"] == "ring"]
    small = rings[rings["ring_radius"] < 1.2]
    assert rec["rings_radius_lt_1.2"]["n"] + rec["rings_radius_ge_1.2"]["n"] == len(rings) > 0
    if len(small):
        lenses = table[table["label"] == 1]
        assert rec["rings_radius_lt_1.2"]["auroc_all"] == pytest.approx(roc_auc_score(
            np.r_[np.ones(len(lenses)), np.zeros(len(small))], np.r_[lenses["logit"], small["logit"]]))
    with pytest.raises(SystemExit, match="population 'physical'"):
        bench.main(["--root", str(tmp_path), "--family", "physical"])


def test_a_rings_extent_lies_within_its_priors_and_a_system_without_knots_has_none():
    import math
    from dataclasses import replace

    from lens_assets.science.simulation import _member

    survey, family = get_survey("des"), load_family("heldout")
    found = 0
    for index in range(60):
        system = _member(survey, family, 9, index)[0]
        if system.kind != "ring":
            continue
        found += 1
        extent = knot_extent(system)
        ring = family.prior("hard_negatives", "ring_radius_arcsec").params
        q_min = family.prior("hard_negatives", "ring_axis_ratio").params["low"]
        assert q_min * ring["low"] - 1e-9 <= extent <= ring["high"] + 1e-9
        assert len([c for c in system.components if c.profile == "GAUSSIAN"]) >= family.prior(
            "hard_negatives", "ring_n_knots").params["low"]
    assert found >= 5
    assert math.isnan(knot_extent(replace(system, components=())))
