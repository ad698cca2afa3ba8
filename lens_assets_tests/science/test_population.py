"""The physical population: relations checked against hand-derived values and astropy, twins, pairs."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lens_assets.science import population as pop
from lens_assets.science.families import load_family
from lens_assets.science.fits_contract import read_cutout
from lens_assets.science.simulation import (LENSING_ONLY, object_rng, render_system, simulate_one,
                                            simulate_pairs_to_directory)
from lens_assets.science.surveys import get_survey

PHYSICAL = load_family("physical")
PHYSICAL_PATH = Path(PHYSICAL.path)
LSST = get_survey("lsst")  # deep and sharp: scenes pass the selection in few tries
DES = get_survey("des")


def _d_ls(cosmo, z1, z2):
    """astropy's angular diameter distance between two redshifts: ``angular_diameter_distance(z1, z2)`` where
    astropy has it (8.0 deprecates ``angular_diameter_distance_z1z2``), the older name before."""
    try:
        return cosmo.angular_diameter_distance(z1, z2)
    except TypeError:
        return cosmo.angular_diameter_distance_z1z2(z1, z2)


def test_sis_einstein_radius_by_hand():
    # 4 pi (200 / 299792.458)^2 * 0.5 rad = 2.79640e-6 rad = 0.576798 arcsec
    assert pop.theta_e_sis_arcsec(200.0, 0.5) == pytest.approx(0.576798, rel=1e-5)
    # theta_E grows as sigma^2
    assert pop.theta_e_sis_arcsec(400.0, 0.5) == pytest.approx(4 * pop.theta_e_sis_arcsec(200.0, 0.5))


def test_redshift_tables_distances_match_astropy():
    from astropy.cosmology import FlatLambdaCDM

    t = pop.redshift_tables(70.0, 0.3, 0.1, 1.2, 0.6, 4.0, 1.0)
    cosmo = FlatLambdaCDM(H0=70.0, Om0=0.3)
    for i, j in ((10, 50), (100, 120), (40, 5)):
        zl, zs = t.zl[i], t.zs[j]
        if zl >= zs - 0.05:
            assert t.dls_over_ds[i, j] == 0.0 and t.weight[i, j] == 0.0
            continue
        ref = (_d_ls(cosmo, zl, zs) / cosmo.angular_diameter_distance(zs)).value
        assert t.dls_over_ds[i, j] == pytest.approx(ref, rel=1e-6)
    assert t.p_zs.sum() == pytest.approx(1.0)


def test_velocity_dispersions_follow_the_lensing_weighted_vdf():
    grid, cdf = pop._sigma_cdf(161.0, 2.32, 2.67, 150.0, 400.0)
    x = grid / 161.0
    pdf = x**2.32 * np.exp(-(x**2.67)) / grid
    weighted_mean = np.trapezoid(grid * pdf * grid**4, grid) / np.trapezoid(pdf * grid**4, grid)
    plain_mean = np.trapezoid(grid * pdf, grid) / np.trapezoid(pdf, grid)
    draws = np.interp(np.random.default_rng(0).uniform(size=20000), cdf, grid)
    assert draws.mean() == pytest.approx(weighted_mean, rel=0.01)
    assert weighted_mean > plain_mean + 20  # the cross-section favours massive deflectors


def test_observed_magnitude_of_a_flat_spectrum_is_the_bandwidth_term_alone():
    # f_nu flat (beta = 0): m = M + DM - 2.5 log10(1 + z) whatever the bands
    assert pop._observed_mag(-21.0, 42.0, 1.0, 0.0, 800.0, 620.0) == pytest.approx(-21.0 + 42.0 - 2.5 * math.log10(2))
    # a red spectrum (beta > 0) observed redward of its rest band is brighter than the flat one
    assert pop._observed_mag(-21.0, 42.0, 0.1, 2.0, 800.0, 620.0) < pop._observed_mag(-21.0, 42.0, 0.1, 0.0, 800.0,
                                                                                        620.0)


@pytest.mark.parametrize("beta,z", [(2.0, 1.0), (-1.5, 0.4)])
def test_observed_magnitude_from_the_redshifted_spectrum_in_astropy_units(beta, z):
    """From first principles: L_nu(lambda) = C lambda^beta normalized to the absolute AB magnitude at the rest
    wavelength (10 pc), observed as f_nu(lambda_obs) = (1 + z) L_nu(lambda_obs / (1 + z)) / (4 pi D_L^2)."""
    import astropy.units as u
    from astropy.cosmology import Planck18

    abs_mag, lam_obs, lam_rest = -21.0, 800.0 * u.nm, 620.0 * u.nm
    ab_zero = 3631 * u.Jy
    l_rest = 10 ** (-0.4 * abs_mag) * ab_zero * 4 * np.pi * (10 * u.pc) ** 2  # L_nu at lam_rest

    def l_nu(lam):
        return l_rest * (lam / lam_rest).decompose().value ** beta

    d_l = Planck18.luminosity_distance(z)
    f_nu = (1 + z) * l_nu(lam_obs / (1 + z)) / (4 * np.pi * d_l**2)
    want = -2.5 * np.log10((f_nu / ab_zero).decompose().value)
    got = pop._observed_mag(abs_mag, Planck18.distmod(z).value, z, beta, lam_obs.value, lam_rest.value)
    assert got == pytest.approx(want, abs=1e-6)


def test_power_law_counts_by_hand():
    rng = np.random.default_rng(1)
    m = np.array([pop._power_law_mag(rng, 0.3, 20.0, 26.0) for _ in range(20000)])
    # dN/dm ~ 10^(0.3 m): the share in the faintest magnitude is (10^(1.8)-10^(1.5)) / (10^(1.8)-1)
    expected = (10**1.8 - 10**1.5) / (10**1.8 - 1)
    assert ((m > 25.0).mean()) == pytest.approx(expected, abs=0.01)
    assert m.min() >= 20.0 and m.max() <= 26.0


def test_every_scene_passes_the_selection():
    sel = PHYSICAL.sections["selection"]
    for i in range(15):
        rng = object_rng("lsst", "physical", 0, i)
        s = pop.draw_scene(PHYSICAL, LSST, rng)
        fwhm = s.psf_fwhm_arcsec[LSST.reference_band]
        assert s.magnification >= sel["min_magnification"].sample(rng)
        assert s.arc_snr_ref >= sel["min_arc_snr"].sample(rng)
        assert sel["min_theta_e_over_fwhm"].sample(rng) * fwhm <= s.theta_e_arcsec <= 3.0
        # Collett's resolution: theta_E^2 > r_s^2 + (s/2)^2, with the source's Sersic half-light radius
        r_s = s.source_components[0].shape["R_sersic"]
        assert s.theta_e_arcsec**2 >= r_s**2 + (0.5 * fwhm) ** 2
        assert s.z_source > s.z_lens + 0.05


def test_a_twin_is_its_lens_without_deflection_and_as_bright():
    for i in range(6):
        rng = object_rng("des", "physical", 3, i)
        scene = pop.draw_scene(PHYSICAL, DES, rng)
        pos = {"ra_deg": 10.0, "dec_deg": -20.0}
        lens = pop.build_system(scene, "lens", PHYSICAL, DES, rng, objid="a", **pos)
        twin = pop.build_system(scene, "twin", PHYSICAL, DES, rng, objid="b", **pos)
        assert lens.is_lens and not twin.is_lens and twin.kind == "twin" and twin.kwargs_lens == ()
        assert twin.galaxy == lens.galaxy and twin.psf_fwhm_arcsec == lens.psf_fwhm_arcsec
        assert not any(c.lensed for c in twin.components) and not any(p.lensed for p in twin.points)
        if scene.quasar is not None:
            continue
        a, b = render_system(lens, DES, np.random.default_rng(0)), render_system(twin, DES, np.random.default_rng(0))
        r = DES.band_names.index(DES.reference_band)
        # same total light (to the flux the stamp's edge and the magnification grid lose)
        assert b.noiseless[r].sum() == pytest.approx(a.noiseless[r].sum(), rel=0.03)
        assert a.flux_ratio > 0 and b.flux_ratio == 0.0 and b.arc_snr == 0.0


def test_non_lens_types_all_render():
    rng = object_rng("lsst", "physical", 0, 99)
    scene = pop.draw_scene(PHYSICAL, LSST, rng)
    for role in PHYSICAL.negative_weights:
        s = pop.build_system(scene, role, PHYSICAL, LSST, rng, objid=role, ra_deg=1.0, dec_deg=1.0)
        assert not s.is_lens and s.kind == role and s.theta_e_arcsec == 0.0
        assert s.scene_theta_e_arcsec == scene.theta_e_arcsec > 0  # the scene's radius, to balance training over
        assert np.isfinite(render_system(s, LSST, rng).image).all()
    with pytest.raises(ValueError, match=r"unknown non-lens type 'cloud'"):
        pop.build_system(scene, "cloud", PHYSICAL, LSST, rng, objid="x", ra_deg=1.0, dec_deg=1.0)


def test_quasar_share_among_lenses_is_the_prior():
    kinds = [pop.draw_scene(PHYSICAL, LSST, object_rng("lsst", "physical", 5, i)).source_kind for i in range(150)]
    assert 0.03 <= kinds.count("quasar") / len(kinds) <= 0.2  # prior 0.1


def test_population_is_deterministic():
    a, b = simulate_one(LSST, PHYSICAL, 4, 7), simulate_one(LSST, PHYSICAL, 4, 7)
    assert np.array_equal(a.image, b.image) and a.system.kind == b.system.kind


def test_pairs_share_a_scene_and_are_read_as_the_contract_says(tmp_path):
    truth, _ = simulate_pairs_to_directory(LSST, PHYSICAL, n_pairs=2, seed=0, out_dir=tmp_path, progress=False)
    assert len(truth) == 4 and list(truth["label"]) == [1, 0, 1, 0]
    assert truth.groupby("pair_id")["label"].sum().tolist() == [1, 1]
    for pid, group in truth.groupby("pair_id"):
        cutouts = [read_cutout((tmp_path / f).read_bytes(), name=f, survey=LSST) for f in group["file"]]
        assert {c.primary["PAIRID"] for c in cutouts} == {pid}
        assert {c.primary["SIMFAM"] for c in cutouts} == {LENSING_ONLY}
        assert {c.primary["SIMROLE"] for c in cutouts} == {"pairs"}  # kept out of the splits by the file itself
        lens_row = group[group["label"] == 1].iloc[0]
        # both files carry their scene's Einstein radius: the lens's own theta_E
        assert [c.primary["SCENE_TE"] for c in cutouts] == [pytest.approx(lens_row["theta_e"], abs=1e-5)] * 2
        assert cutouts[0].ra == cutouts[1].ra and cutouts[0].dec == cutouts[1].dec


def test_pairs_need_a_physical_family(tmp_path):
    with pytest.raises(ValueError, match=r"lens/twin pairs need a physical family"):
        simulate_pairs_to_directory(LSST, load_family("baseline"), n_pairs=1, seed=0, out_dir=tmp_path)


def test_unknown_population_is_an_error(tmp_path):
    text = (pop.__file__.replace("population.py", "families/physical.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text(open(text).read().replace('population = "physical"', 'population = "galactic"'))
    with pytest.raises(ValueError, match=r"population 'galactic' is not one of \['cluster', 'physical', 'priors'\]"):
        load_family(bad)


def test_withheld_variance_and_zero_point_error_reach_the_file(tmp_path):
    from lens_assets.science.fits_contract import write_simulated_cutout

    c = simulate_one(LSST, PHYSICAL, 0, 3)
    obs = dict(c.system.observation, write_variance=False,
               zero_point_error_mag={b: 0.05 for b in LSST.band_names})
    c.system = replace(c.system, observation=obs)
    path = tmp_path / "x.fits"
    write_simulated_cutout(path, c, survey=LSST, family=PHYSICAL, seed=0)
    read = read_cutout(path.read_bytes(), name="x.fits", survey=LSST)
    assert all("var_derived" in read.band_flags[b] for b in LSST.band_names)
    # the file states MAGZP + 0.05: ingest's flux scale is 10^(0.4 * 0.05) times the true one
    from astropy.io import fits

    with fits.open(path) as hdul:
        assert hdul[f"IMAGE_{LSST.band_names[0]}"].header["MAGZP"] == pytest.approx(c.zero_points[0] + 0.05, abs=1e-5)


def test_small_cutouts_are_padded_back_at_ingest(tmp_path):
    from lens_assets.science.fits_contract import write_simulated_cutout

    c = simulate_one(DES, PHYSICAL, 0, 5)
    c.system = replace(c.system, observation=dict(c.system.observation, crop_px=48))
    path = tmp_path / "small.fits"
    write_simulated_cutout(path, c, survey=DES, family=PHYSICAL, seed=0)
    read = read_cutout(path.read_bytes(), name="small.fits", survey=DES)
    assert read.image.shape[-1] == 48  # the file's own size; the shards pad it to the 64 px grid
    assert 48 * DES.pixel_scale_arcsec >= DES.min_cutout_arcsec
    # cropped along one axis: the file is 48 x 64 px around the same centre, padded to square on reading
    c.system = replace(c.system, observation=dict(c.system.observation, crop_px=(48, 64)))
    write_simulated_cutout(path, c, survey=DES, family=PHYSICAL, seed=0)
    read = read_cutout(path.read_bytes(), name="small.fits", survey=DES)
    assert read.file_shape == (48, 64) and read.square_offset_px == (8, 0) and read.image.shape[-1] == 64
    assert all(f[-2:] == ["padded", "padded_square"] for f in read.band_flags.values())
    full = c.image[0]  # the rendered band, in the file's units (count/s)
    np.testing.assert_allclose(read.image[0, 8:56], full[8:56], rtol=1e-6, atol=1e-6 * np.abs(full).max())
    assert (read.image[:, :8] == 0).all() and (read.image[:, 56:] == 0).all()


def test_a_share_of_small_training_cutouts_is_cropped_along_one_axis(tmp_path):
    assert PHYSICAL.prior("observation", "small_cutout_non_square_fraction").sample(None) == 0.0  # the default
    text = PHYSICAL_PATH.read_text().replace("small_cutout_non_square_fraction = 0.0",
                                             "small_cutout_non_square_fraction = 0.5")
    (tmp_path / "half.toml").write_text(text)
    half = load_family(tmp_path / "half.toml")
    rng = np.random.default_rng(0)
    crops = [pop._observation(half, DES, rng)["crop_px"] for _ in range(4000)]
    small = [c for c in crops if c]
    non_square = [c for c in small if not isinstance(c, int)]
    floor = math.ceil(DES.min_cutout_arcsec / DES.pixel_scale_arcsec)
    # 10% small (binomial sd 0.005), half of those along one axis (sd 0.035 at ~400)
    assert len(small) / len(crops) == pytest.approx(0.1, abs=0.02)
    assert len(non_square) / len(small) == pytest.approx(0.5, abs=0.1)
    assert all(64 in c and floor <= min(c) < 64 for c in non_square)
    assert 0.35 < np.mean([c[0] < 64 for c in non_square]) < 0.65  # rows or columns, alike


def test_training_twins_are_paired_with_their_lenses():
    from lens_assets.science.simulation import systems_for

    q, p_lens, weights = pop.pair_layout(PHYSICAL)
    # lens fraction 0.5, twins 0.4 of the non-lens weights: pair blocks 2 * 0.5 * 0.4 = 0.4 of the blocks,
    # lenses in the other blocks (0.5 - 0.2) / 0.6 = 0.5
    assert q == pytest.approx(0.4) and p_lens == pytest.approx(0.5) and "twin" not in weights
    systems = systems_for(LSST, PHYSICAL, 2, range(40))
    twins = [i for i, s in enumerate(systems) if s.kind == "twin"]
    assert twins and all(i % 2 == 1 for i in twins)
    for i in twins:
        lens, twin = systems[i - 1], systems[i]
        assert lens.is_lens and lens.pair_id == twin.pair_id != ""
        assert (lens.ra_deg, lens.dec_deg) == (twin.ra_deg, twin.dec_deg)  # one sky group: one split
        assert lens.galaxy == twin.galaxy and lens.z_lens == twin.z_lens


def test_render_exposure_factor_renders_the_same_scenes_with_less_noise(tmp_path):
    text = open(pop.__file__.replace("population.py", "families/physical.toml")).read()
    assert text.count("render_exposure_factor = 1.0") == 1
    path = tmp_path / "deep.toml"
    path.write_text(text.replace("render_exposure_factor = 1.0", "render_exposure_factor = 100.0"))
    deep = load_family(path)
    assert pop.render_exposure_factor(PHYSICAL) == 1.0 and pop.render_exposure_factor(deep) == 100.0
    for index in range(2):
        a, b = simulate_one(LSST, PHYSICAL, 5, index), simulate_one(LSST, deep, 5, index)
        assert (a.system.kind, a.system.theta_e_arcsec) == (b.system.kind, b.system.theta_e_arcsec)
        assert b.system.exposure_scale == pytest.approx(100.0 * a.system.exposure_scale)
        np.testing.assert_array_equal(a.noiseless, b.noiseless)  # the same scene and light
        # per pixel, sky and source photon noise fall as 1 / exposure and read noise as 1 / exposure^2
        measured = a.variance > 0
        assert (a.variance[measured] / b.variance[measured] >= 100.0 * (1 - 1e-9)).all()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("render_exposure_factor = 1.0", "render_exposure_factor = 0.0"))
    with pytest.raises(ValueError, match=r"render_exposure_factor must be a positive number"):
        simulate_one(LSST, load_family(bad), 5, 0)


def test_group_scenes_add_the_group_halos_einstein_radius_to_a_massive_centrals(tmp_path):
    from astropy.cosmology import FlatLambdaCDM

    text = open(pop.__file__.replace("population.py", "families/physical.toml")).read()
    assert text.count("group_fraction = 0.0") == 1
    path = tmp_path / "groups.toml"
    path.write_text(text.replace("group_fraction = 0.0", "group_fraction = 1.0").replace(
        'name = "physical"', 'name = "physical_groups"'))
    groups = load_family(path)
    cosmo = FlatLambdaCDM(H0=70.0, Om0=0.3)
    for i in range(4):
        s = pop.draw_scene(groups, LSST, object_rng("lsst", "physical_groups", 0, i))
        assert 250.0 <= s.group_sigma_kms <= 500.0 and s.sigma_kms >= 220.0  # the group's prior; a massive central
        ratio = (_d_ls(cosmo, s.z_lens, s.z_source)
                 / cosmo.angular_diameter_distance(s.z_source)).value
        # concentric SIS deflections add: theta_E = theta_E(galaxy) + theta_E(group), both 4 pi (sigma/c)^2 D_ls/D_s
        want = pop.theta_e_sis_arcsec(s.sigma_kms, ratio) + pop.theta_e_sis_arcsec(s.group_sigma_kms, ratio)
        assert s.theta_e_arcsec == pytest.approx(want, rel=1e-3)
        assert s.kwargs_lens[0]["theta_E"] == s.theta_e_arcsec
    # the default draws no group: theta_E is the galaxy's own
    for i in range(3):
        s = pop.draw_scene(PHYSICAL, LSST, object_rng("lsst", "physical", 0, i))
        assert s.group_sigma_kms == 0.0
        assert s.theta_e_arcsec == pytest.approx(pop.theta_e_sis_arcsec(
            s.sigma_kms, (_d_ls(cosmo, s.z_lens, s.z_source)
                          / cosmo.angular_diameter_distance(s.z_source)).value), rel=1e-3)


def test_pair_layout_refuses_more_twins_than_lenses(tmp_path):
    text = open(pop.__file__.replace("population.py", "families/physical.toml")).read()
    bad = tmp_path / "many_twins.toml"
    bad.write_text(text.replace("lens_fraction = 0.5", "lens_fraction = 0.2").replace("twin = 0.40", "twin = 5.0"))
    with pytest.raises(ValueError, match=r"every twin needs its lens"):
        pop.pair_layout(load_family(bad))


def test_the_arcs_snr_counts_the_deflectors_photon_noise():
    from lens_assets.science.simulation import LightComponent, _sersic

    kwargs_lens = ({"theta_E": 1.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
                   {"gamma1": 0.0, "gamma2": 0.0, "ra_0": 0.0, "dec_0": 0.0})
    source = [LightComponent("SERSIC_ELLIPSE", _sersic((0.05, 0.0), n=1.0, r_eff=0.2, q=1.0, pa=0.0), 23.0, 0.0,
                             lensed=True)]

    def deflector(mag):
        return [LightComponent("SERSIC_ELLIPSE", _sersic((0.0, 0.0), n=4.0, r_eff=1.0, q=1.0, pa=0.0), mag, 2.0,
                               lensed=False)]

    check = dict(survey=DES, fwhm_arcsec=1.0)
    mu, snr = pop.lensed_source_check(kwargs_lens, source, **check)
    mu_faint, snr_faint = pop.lensed_source_check(kwargs_lens, source, foreground=deflector(40.0), **check)
    _, snr_bright = pop.lensed_source_check(kwargs_lens, source, foreground=deflector(17.0), **check)
    assert mu_faint == mu and snr_faint == pytest.approx(snr, rel=1e-9)  # no light, no noise
    assert snr_bright < 0.9 * snr  # a 17th-magnitude deflector's photons bury part of the arcs
    # the selection's shortcut: below a threshold the S/N without the deflector's noise (an upper bound) answers
    image, mu_steps = pop.lensed_image(kwargs_lens, source, survey=DES)
    bright = deflector(17.0)
    assert mu_steps == mu and pop.arc_snr(image, foreground=bright, **check) == snr_bright
    assert pop.arc_snr(image, foreground=bright, below=snr_bright / 2, **check) == snr_bright  # above: the full S/N
    bound = pop.arc_snr(image, foreground=bright, below=2 * snr, **check)
    assert bound == pytest.approx(snr, rel=1e-12) and bound > snr_bright  # below: the bound, still under it


@pytest.mark.parametrize("r_eff", [0.1, 0.3, 1.0])
def test_the_deflectors_light_keeps_its_flux_however_compact(r_eff):
    from lens_assets.science.simulation import LightComponent, _sersic

    zp = DES.band(DES.reference_band).magnitude_zero_point
    galaxy = LightComponent("SERSIC_ELLIPSE", _sersic((0.0, 0.0), n=4.0, r_eff=r_eff, q=1.0, pa=0.0), 20.0, 2.0,
                            lensed=False)
    stamp = dict(n=DES.cutout_size_px, pixel_scale=DES.pixel_scale_arcsec, zero_point=zp)
    image = pop.foreground_image([galaxy], **stamp)
    flux = 10 ** (-0.4 * (20.0 - zp))
    # within 3% of a rendering sampled 16 times per pixel and 64 times in the core (converged to 0.1%);
    # pixel centres alone give 54% of the flux at 0.1"
    fine = pop.foreground_image([galaxy], supersample=16, core_supersample=64, **stamp)
    assert 0.97 * fine.sum() < image.sum() <= fine.sum() <= flux
    centres = pop.foreground_image([galaxy], supersample=1, core_px=0, **stamp)
    assert r_eff > 0.5 or centres.sum() < 0.85 * fine.sum()  # what the sampling is for
    assert image.argmax() in {np.ravel_multi_index((i, j), image.shape) for i in (31, 32) for j in (31, 32)}
    assert pop.foreground_image([], n=8, pixel_scale=0.2, zero_point=zp).sum() == 0.0
