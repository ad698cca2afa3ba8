import hashlib
import math

import numpy as np
import pytest

from lens_assets.science.families import available_families, load_family
from lens_assets.science.simulation import (LightComponent, System, _lensed_points, lenstronomy_band_setup,
                                            psf_kernel, render_system, simulate_one, simulate_to_directory,
                                            summarize_truth)
from lens_assets.science.psf import measure_fwhm_px
from lens_assets.science.surveys import get_survey

BASELINE = load_family("baseline")


def _system(survey, *, kwargs_lens=(), components=(), points=(), fwhm=None, is_lens=True, kind="quasar"):
    return System(objid="test", is_lens=is_lens, kind=kind,
                  theta_e_arcsec=kwargs_lens[0]["theta_E"] if kwargs_lens else 0.0,
                  kwargs_lens=tuple(kwargs_lens), components=tuple(components), points=tuple(points),
                  psf_profile="gaussian",
                  psf_fwhm_arcsec={b.name: fwhm or b.seeing_fwhm_arcsec for b in survey.bands},
                  moffat_beta=3.0, exposure_scale=1.0, z_lens=0.5, z_source=2.0, ra_deg=10.0, dec_deg=-5.0,
                  galaxy={"n": 4.0, "r_eff": 1.0, "q": 1.0, "pa": 0.0})


def _peaks(image, n, *, exclude_px=6):
    img = image.copy()
    out = []
    for _ in range(n):
        y, x = np.unravel_index(np.argmax(img), img.shape)
        out.append((x, y))
        yy, xx = np.ogrid[:img.shape[0], :img.shape[1]]
        img[(yy - y) ** 2 + (xx - x) ** 2 <= exclude_px**2] = -np.inf
    return out


@pytest.mark.parametrize("theta_e,beta", [(1.0, 0.3), (1.5, 0.5), (0.8, 0.15)])
def test_sis_puts_two_images_at_theta_e_plus_and_minus_beta(theta_e, beta):
    hst = get_survey("hst")  # 0.05"/px: "within a pixel" is a 0.05" test
    kwargs_lens = ({"theta_E": theta_e, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
                   {"gamma1": 0.0, "gamma2": 0.0, "ra_0": 0.0, "dec_0": 0.0})
    qso = _lensed_points(kwargs_lens, (beta, 0.0), 20.0, 0.0, hst)
    assert len(qso.ra) == 2
    system = _system(hst, kwargs_lens=kwargs_lens, points=(qso,), fwhm=0.1)
    cutout = render_system(system, hst, np.random.default_rng(0))
    data = lenstronomy_band_setup(system, hst, "F814W")["image_model"].Data
    radii, angles = [], []
    for x, y in _peaks(cutout.lensed[0], 2):
        ra, dec = data.map_pix2coord(x, y)
        radii.append(math.hypot(ra, dec))
        angles.append(math.atan2(dec, ra))
    assert sorted(radii) == pytest.approx([theta_e - beta, theta_e + beta], abs=hst.pixel_scale_arcsec)
    separation = abs((angles[0] - angles[1] + math.pi) % (2 * math.pi) - math.pi)
    assert separation == pytest.approx(math.pi, abs=0.1)  # on opposite sides of the lens
    assert cutout.unlensed.sum() == 0.0


def test_a_star_beside_a_lens_is_unlensed_light_not_arcs():
    """Points go to the lensed or unlensed image by their own flag: a star in a lens's stamp must not count
    as arcs in the flux ratio or the arc S/N (it did when points followed the system's label)."""
    from lens_assets.science.simulation import PointComponent

    des = get_survey("des")
    kwargs_lens = ({"theta_E": 1.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
                   {"gamma1": 0.0, "gamma2": 0.0, "ra_0": 0.0, "dec_0": 0.0})
    qso = _lensed_points(kwargs_lens, (0.3, 0.0), 22.0, 0.0, des)
    star = PointComponent((0.0,), (1.3,), (1.0,), 18.0, 1.0, lensed=False)  # over the images: its noise counts
    alone = render_system(_system(des, kwargs_lens=kwargs_lens, points=(qso,)), des, np.random.default_rng(0))
    both = render_system(_system(des, kwargs_lens=kwargs_lens, points=(qso, star)), des, np.random.default_rng(0))
    np.testing.assert_allclose(both.lensed, alone.lensed, rtol=1e-12, atol=0)
    assert both.unlensed.sum() > 0 and alone.unlensed.sum() == 0
    assert both.arc_snr < alone.arc_snr  # the star's photon noise, not its light, enters the arcs' S/N
    r = des.band_names.index(des.reference_band)
    assert both.flux_ratio == pytest.approx(both.lensed[r].sum() / (both.lensed[r].sum() + both.unlensed[r].sum()))
    assert both.flux_ratio < 0.5


@pytest.mark.parametrize("survey_name,index", [("des", i) for i in range(6)] + [("hst", 1), ("euclid", 1)])
def test_flux_ratio_is_lensed_over_total_on_the_noiseless_image(survey_name, index):
    survey = get_survey(survey_name)
    rng = np.random.default_rng(index)
    from lens_assets.science.simulation import draw_system

    system = draw_system(BASELINE, survey, rng, objid="t", force_lens=True)
    cutout = render_system(system, survey, rng)
    s = lenstronomy_band_setup(system, survey, survey.reference_band)
    args = (s["kwargs_lens"], s["kwargs_source"], s["kwargs_lens_light"], s["kwargs_ps"])
    total = s["image_model"].image(*args)
    lensed = s["image_model"].image(*args, lens_light_add=False)
    assert cutout.flux_ratio == pytest.approx(lensed.sum() / total.sum(), rel=1e-9)
    assert 0.0 < cutout.flux_ratio < 1.0


def test_arc_snr_is_the_mean_of_the_matched_filter_statistic_over_noise_draws():
    """arc_snr is what a matched filter for the known arcs measures: over noise realizations of the same
    cutout, T = sum((image - unlensed) * lensed / var) / sqrt(sum(lensed**2 / var)) has mean arc_snr and
    standard deviation 1 (and mean 0 on the same cutout without the arcs)."""
    from lens_assets.science.simulation import draw_system

    survey = get_survey("des")
    rng = np.random.default_rng(3)
    cutout = render_system(draw_system(BASELINE, survey, rng, objid="t", force_lens=True), survey, rng)
    w = cutout.lensed / cutout.variance
    norm = np.sqrt(np.sum(cutout.lensed * w))
    draws = np.random.default_rng(0).standard_normal((400, *cutout.lensed.shape)) * np.sqrt(cutout.variance)
    with_arcs = np.einsum("nbyx,byx->n", cutout.lensed + draws, w) / norm
    without = np.einsum("nbyx,byx->n", draws, w) / norm
    assert with_arcs.mean() == pytest.approx(cutout.arc_snr, abs=4 * 1 / np.sqrt(400))
    assert with_arcs.std() == pytest.approx(1.0, abs=0.1) and abs(without.mean()) < 4 / np.sqrt(400)
    assert cutout.arc_snr > 0
    assert simulate_one(survey, BASELINE, seed=5, index=next(
        i for i in range(50) if not simulate_one(survey, BASELINE, seed=5, index=i).system.is_lens)).arc_snr == 0.0


@pytest.mark.parametrize("survey_name", ["des", "sdss"])
def test_noiseless_image_is_lenstronomys_image_in_every_band(survey_name):
    survey = get_survey(survey_name)
    cutout = simulate_one(survey, BASELINE, seed=5, index=3)
    for i, band in enumerate(survey.band_names):
        s = lenstronomy_band_setup(cutout.system, survey, band)
        bare = s["image_model"].image(s["kwargs_lens"], s["kwargs_source"], s["kwargs_lens_light"], s["kwargs_ps"])
        np.testing.assert_allclose(cutout.noiseless[i], bare, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_pixel_noise_matches_the_variance_map(index):
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    survey = get_survey("des")
    cutout = simulate_one(survey, BASELINE, seed=11, index=index)
    z = (cutout.image - cutout.noiseless) / np.sqrt(cutout.variance)
    assert abs(z.mean()) < 0.03
    assert z.std() == pytest.approx(1.0, abs=0.03)  # 20480 pixels: the std of std is 0.005
    for i, band in enumerate(survey.band_names):
        noise = SingleBand(**survey.kwargs_single_band(band, exposure_scale=cutout.system.exposure_scale))
        np.testing.assert_allclose(cutout.variance[i], noise.estimate_noise(cutout.noiseless[i]) ** 2, rtol=1e-12)


def test_colors_follow_the_power_law_in_every_band():
    survey = get_survey("des")
    beta, mag_i = 2.0, 19.0
    comp = LightComponent("SERSIC_ELLIPSE", {"R_sersic": 0.3, "n_sersic": 1.0, "e1": 0.0, "e2": 0.0,
                                             "center_x": 0.0, "center_y": 0.0}, mag_i, beta, lensed=False)
    system = _system(survey, components=(comp,), is_lens=False, kind="plain")
    cutout = render_system(system, survey, np.random.default_rng(1))
    lam_i = survey.band("i").wavelength_nm
    for k, band in enumerate(survey.bands):
        measured = band.magnitude_zero_point - 2.5 * math.log10(cutout.noiseless[k].sum())
        expected = mag_i - 2.5 * beta * math.log10(band.wavelength_nm / lam_i)
        assert measured == pytest.approx(expected, abs=0.01), band.name
    assert cutout.flux_ratio == 0.0


@pytest.mark.parametrize("profile,fwhm,beta", [("gaussian", 3.0, 3.0), ("gaussian", 5.5, 3.0),
                                               ("moffat", 4.0, 2.5), ("moffat", 3.0, 4.5)])
def test_psf_kernel_is_normalized_odd_and_has_its_fwhm(profile, fwhm, beta):
    k = psf_kernel(profile, fwhm, moffat_beta=beta)
    assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert k.sum() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(k), k.shape) == (k.shape[0] // 2, k.shape[0] // 2)
    assert measure_fwhm_px(k) == pytest.approx(fwhm, rel=0.02)


@pytest.mark.parametrize("fwhm,beta,size,oversample", [(4.0, 2.5, 41, 3), (3.1, 4.5, 21, 1), (6.3, 2.0, 63, 2),
                                                        (2.2, 3.3, 11, 4)])
def test_moffat_pixels_are_astropys_moffat_summed_over_each_pixels_samples(fwhm, beta, size, oversample):
    """The Moffat image is drawn for one quadrant of pixels and mirrored: against astropy's Moffat2D on the whole
    oversampled grid, odd and even sampling alike."""
    from astropy.modeling.functional_models import Moffat2D

    half = size // 2
    sub = (np.arange(size * oversample) + 0.5) / oversample - half - 0.5
    gamma = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    assert Moffat2D(1.0, 0.0, 0.0, gamma, beta).fwhm == pytest.approx(fwhm)
    fine = Moffat2D(1.0, 0.0, 0.0, gamma, beta)(*np.meshgrid(sub, sub))
    ref = fine.reshape(size, oversample, size, oversample).sum(axis=(1, 3))
    ours = psf_kernel("moffat", fwhm, moffat_beta=beta, size=size, oversample=oversample)
    assert np.allclose(ours, ref / ref.sum(), rtol=1e-12, atol=0)


def test_core_wings_covers_its_wings_default_size():
    """The core-plus-wings image is as large as its Moffat wings' default image (twice the core's FWHM), and is the
    Gaussian core and those wings in their shares."""
    from lens_assets.science.psf import CORE_WINGS_FRACTION, CORE_WINGS_SCALE

    for fwhm, max_size in ((2.5, None), (3.0, 63), (9.0, 63), (9.0, 48)):
        k = psf_kernel("core_wings", fwhm, moffat_beta=3.0, max_size=max_size)
        wings = psf_kernel("moffat", CORE_WINGS_SCALE * fwhm, moffat_beta=3.0, max_size=max_size)
        assert k.shape == wings.shape
        core = psf_kernel("gaussian", fwhm, size=k.shape[0])
        mix = (1 - CORE_WINGS_FRACTION) * core + CORE_WINGS_FRACTION * wings
        assert np.allclose(k, mix / mix.sum(), rtol=1e-12, atol=0)
    assert psf_kernel("core_wings", 9.0, max_size=48).shape == (47, 47)


def test_psf_kernel_rejects_bad_options():
    with pytest.raises(ValueError, match=r"psf profile 'airy' is not one of \['gaussian', 'moffat', 'core_wings'\]"):
        psf_kernel("airy", 3.0)
    with pytest.raises(ValueError, match="psf FWHM must be positive, got -1"):
        psf_kernel("gaussian", -1)
    with pytest.raises(ValueError, match="psf size must be odd and positive, got 10"):
        psf_kernel("gaussian", 3.0, size=10)
    for profile in ("gaussian", "moffat", "core_wings"):  # a max_size below 1 leaves no image to draw
        with pytest.raises(ValueError, match="psf size must be odd and positive, got -1"):
            psf_kernel(profile, 3.0, max_size=0)


def test_simulation_is_deterministic_and_independent_of_worker_count(tmp_path):
    survey = get_survey("sdss")
    a, _ = simulate_to_directory(survey, BASELINE, n_cutouts=6, seed=3, out_dir=tmp_path / "a", workers=1,
                                 progress=False)
    b, _ = simulate_to_directory(survey, BASELINE, n_cutouts=6, seed=3, out_dir=tmp_path / "b", workers=2,
                                 progress=False)
    assert a.equals(b)

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.fits"))}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert len(digest(tmp_path / "a")) == 6
    other = simulate_one(survey, BASELINE, seed=4, index=0)
    assert not np.array_equal(other.image, simulate_one(survey, BASELINE, seed=3, index=0).image)


def test_a_lensed_quasar_is_the_same_on_every_call_and_leaves_numpys_global_state_alone():
    """lenstronomy's image solver redraws failed Newton steps from np.random: the simulation seeds it from the lens
    and source, so a lensed quasar's file is a function of (survey, family, seed, index) alone."""
    from lens_assets.science.fits_writer import simulated_cutout_bytes

    survey, family = get_survey("des"), load_family("physical")
    index = 1904  # a lensed quasar whose solution takes the solver's random fallback
    first = simulate_one(survey, family, 0, index)
    assert first.system.kind == "quasar" and len(first.system.points[0].ra) >= 2
    np.random.seed(123)
    state = np.random.get_state()
    files = {hashlib.sha256(simulated_cutout_bytes(simulate_one(survey, family, 0, index), survey=survey,
                                                   family=family, seed=0)).hexdigest() for _ in range(3)}
    assert len(files) == 1
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    src = first.system.points[0].source_xy
    again = [_lensed_points(first.system.kwargs_lens, src, 20.0, 0.0, survey) for _ in range(3)]
    assert all(p.ra == again[0].ra and p.dec == again[0].dec for p in again)


def test_population_has_a_real_hard_share_and_every_negative_type():
    survey = get_survey("des")
    from lens_assets.science.simulation import systems_for

    systems = systems_for(survey, BASELINE, 0, range(300))
    lenses = [s for s in systems if s.is_lens]
    assert 0.4 < len(lenses) / len(systems) < 0.6
    seeing = survey.band("i").seeing_fwhm_arcsec
    assert sum(s.theta_e_arcsec < seeing for s in lenses) / len(lenses) > 0.15  # blended with the lens
    assert {s.kind for s in systems if not s.is_lens} == set(BASELINE.negative_weights)
    assert {s.kind for s in lenses} == {"extended", "quasar"}
    assert any(len(s.components) > 2 for s in lenses)  # clumpy sources

    # faint arcs: rendered flux ratios below 0.1 are a real share
    rendered = [simulate_one(survey, BASELINE, 0, i) for i in range(40)]
    import pandas as pd

    truth = pd.DataFrame([{"label": int(c.system.is_lens), "kind": c.system.kind, "flux_ratio": c.flux_ratio,
                           "theta_e": c.system.theta_e_arcsec, "seeing_ref": c.system.psf_fwhm_arcsec["i"]}
                          for c in rendered])
    summary = summarize_truth(truth, survey)
    assert summary["n_lenses"] + summary["n_nonlenses"] == 40
    assert summary["lens_share_flux_ratio_lt_0.1"] > 0.1


def test_heldout_family_differs_in_its_stated_choices():
    assert {"baseline", "heldout"} <= set(available_families())
    held = load_family("heldout")
    survey = get_survey("des")
    from lens_assets.science.simulation import systems_for

    systems = systems_for(survey, held, 0, range(80))
    assert {s.psf_profile for s in systems} == {"moffat"}
    assert all(2.0 <= s.moffat_beta <= 3.0 for s in systems)
    assert "chance_alignment" in {s.kind for s in systems} and "chance_alignment" not in BASELINE.negative_weights
    assert held.prior("lens_light", "color_beta").mean < BASELINE.prior("lens_light", "color_beta").mean
    assert held.sha256 != BASELINE.sha256


def test_family_errors_name_the_file_section_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown simulation family 'nope'; valid families are \['baseline'"):
        load_family("nope")
    text = (load_family.__globals__["FAMILY_DIR"] / "baseline.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('shear = { dist = "uniform", low = 0.0, high = 0.08 }',
                                'shear = { dist = "gamma", k = 2 }'))
    with pytest.raises(ValueError, match=r"bad.toml \[lens\] shear: unknown dist 'gamma'; valid ones are"):
        load_family(bad)
    bad.write_text(text.replace("lens_fraction = 0.5", "lens_fraction = 1.5"))
    with pytest.raises(ValueError, match=r"bad.toml: lens_fraction must be in \[0, 1\], got 1.5"):
        load_family(bad)
    bad.write_text(text.replace("[lens]\n", "[lens]\nsurprise = 1\n"))
    with pytest.raises(ValueError, match=r"\[lens\] has unknown keys \['surprise'\]"):
        load_family(bad)
    bad.write_text(text.replace("plain = 0.35", "plain = 0.35\nunicorn = 0.1"))
    with pytest.raises(ValueError, match=r"\[negatives\] has unknown types \['unicorn'\]"):
        load_family(bad)
    good = tmp_path / "mine.toml"
    good.write_text(text.replace('name = "baseline"', 'name = "mine"'))
    assert load_family(good).name == "mine"
