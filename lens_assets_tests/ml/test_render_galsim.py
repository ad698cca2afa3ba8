"""The GalSim/caustics held-out family (lens_assets/ml/render_galsim.py) against trusted references:
lenstronomy's deflections and noise model, hand-derived SIS magnifications, GalSim's own fluxes, and
the inbox FITS contract.

The renderer lives in the ML layer (caustics runs on torch, which the science layer never imports);
these tests sit here beside the other simulation tests, as the brief placed them.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from lens_assets.ml import render_galsim as rg
from lens_assets.science.fits_contract import TRUTH_KEYS, read_cutout
from lens_assets.science.surveys import get_survey

FAMILY_FILE = Path(rg.FAMILY_DIR) / "galsim.toml"
DEFLECTOR = {"theta_e": 1.3, "q": 0.62, "phi_rad": 0.7, "gamma1": 0.03, "gamma2": -0.02}


@pytest.fixture(scope="module")
def family():
    return rg.load_galsim_family("galsim")


def test_family_file_loads_with_its_identity(family):
    assert family.name == "galsim" and family.renderer == "galsim"
    assert family.sha256 == __import__("hashlib").sha256(FAMILY_FILE.read_bytes()).hexdigest()
    assert 0 < family.lens_fraction < 1 and family.description
    assert set(family.negative_weights) == set(rg.NEGATIVE_KINDS)
    assert math.isclose(math.exp(family.prior("deflector", "ln_theta_e_arcsec").mean), 1.2, rel_tol=1e-3)


def test_caustics_sie_and_shear_deflection_match_lenstronomy():
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    d = DEFLECTOR
    e1, e2 = phi_q2_ellipticity(d["phi_rad"], d["q"])
    g = np.linspace(-3.0, 3.0, 13)
    x, y = np.meshgrid(g, g + 0.037)
    kw = [{"theta_E": d["theta_e"], "e1": e1, "e2": e2, "center_x": 0.0, "center_y": 0.0},
          {"gamma1": d["gamma1"], "gamma2": d["gamma2"], "ra_0": 0.0, "dec_0": 0.0}]
    ax, ay = LensModel(["SIE", "SHEAR"]).alpha(x.ravel(), y.ravel(), kw)
    x_before = x.copy()
    bx, by = rg.trace_to_source(x, y, d)
    np.testing.assert_array_equal(x, x_before)  # the caller's array is left alone
    np.testing.assert_allclose(x - bx, ax.reshape(x.shape), atol=1e-3)
    np.testing.assert_allclose(y - by, ay.reshape(y.shape), atol=1e-3)
    assert np.abs(x - bx - ax.reshape(x.shape)).max() < 1e-6  # in fact the same function


SIS = {"theta_e": 1.2, "q": 0.99999, "phi_rad": 0.0, "gamma1": 0.0, "gamma2": 0.0}


def test_sis_point_images_and_magnifications_are_the_textbook_ones():
    # SIS, source at beta on the x axis: images at beta + theta_E and beta - theta_E,
    # |mu| = |theta| / (|theta| - theta_E)
    beta, te = 0.5, SIS["theta_e"]
    x, y, mu = rg.solve_lens_equation((beta, 0.0), SIS, window_arcsec=3.0)
    order = np.argsort(x)
    np.testing.assert_allclose(x[order], [beta - te, beta + te], atol=1e-5)
    np.testing.assert_allclose(y, 0.0, atol=1e-5)
    expect = [abs(beta - te) / (abs(beta - te) - te), (beta + te) / (beta + te - te)]
    np.testing.assert_allclose(mu[order], expect, rtol=1e-4)  # the inner image has negative parity


def _bare_scene(lights, *, deflector=SIS, lensing=True, fwhm=0.1, bands=("g", "r", "i", "z", "Y")):
    return rg.GalsimScene(objid="t", is_lens=lensing, kind="extended", theta_e_arcsec=deflector["theta_e"],
                          deflector=deflector, lensing=lensing, lights=tuple(lights), source_xy=(0.0, 0.0),
                          psf_profile="kolmogorov", psf_fwhm_arcsec={b: fwhm for b in bands}, moffat_beta=3.0,
                          wing_flux_fraction=0.0, wing_fwhm_scale=2.0, psf_shear=(0.0, 0.0), exposure_scale=1.0,
                          z_lens=0.4, z_source=1.5, ra_deg=10.0, dec_deg=-20.0,
                          galaxy={"n": 4.0, "r_eff": 1.0, "q": 1.0, "pa": 0.0})


def _fine_des():
    # DES bands and noise on a fine grid (0.05"/px, 2 sub-pixels): the sampling error of a 0.1" source is ~0.1%
    return dataclasses.replace(get_survey("des"), pixel_scale_arcsec=0.05, cutout_size_px=120, min_cutout_arcsec=6.0)


def test_sis_lensed_flux_is_magnification_times_source_flux():
    # 0.03"/px: the demagnified inner image (|mu| = 0.5) of a 0.04" source is still sampled
    survey = dataclasses.replace(get_survey("des"), pixel_scale_arcsec=0.03, cutout_size_px=160, min_cutout_arcsec=4.8)
    # far from the SIS caustic (beta = theta_E) and the core; small, so that the average of mu = 2 theta_E / |beta|
    # over the source differs from its value at the centre by ~<r^2> / (4 beta^2) ~ 0.1%
    beta, te = 0.8, SIS["theta_e"]
    src = rg.Light("sersic", beta, 0.0, mag_ref=22.0, color_beta=0.0, lensed=True, n=1.0, r_eff=0.04, q=1.0)
    cut = rg.render_galsim_scene(_bare_scene([src]), survey, None)
    r = survey.band_names.index("i")
    source_flux = rg._band_flux(src, survey, "i")
    mu_total = 2 * te / beta  # (beta + te) / beta + (te - beta) / beta
    assert cut.lensed[r].sum() == pytest.approx(mu_total * source_flux, rel=0.01)
    assert cut.magnifications[0] == pytest.approx(mu_total, rel=0.01)


def test_galsim_sersic_flux_equals_requested_flux():
    light = rg.Light("sersic", 0.0, 0.0, mag_ref=20.0, color_beta=2.0, lensed=False, n=4.0, r_eff=0.4, q=0.7,
                     beta_deg=30.0, trunc_r_eff=8.0)
    img = rg._galsim_object(light, 123.4).drawImage(nx=256, ny=256, scale=0.05, method="auto").array
    assert img.sum() == pytest.approx(123.4, rel=2e-3)
    survey = _fine_des()
    cut = rg.render_galsim_scene(_bare_scene([light], lensing=False), survey, None)
    for b, band in enumerate(survey.band_names):  # the lens light, PSF-convolved, in the cutout
        assert cut.unlensed[b].sum() == pytest.approx(rg._band_flux(light, survey, band), rel=0.01)


def test_noise_variance_is_lenstronomy_single_band():
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    kw = get_survey("des").kwargs_single_band("r", exposure_scale=1.7)
    image = np.array([[0.0, 1.0], [25.0, -3.0]])
    expect = SingleBand(**kw).estimate_noise(image.copy()) ** 2
    np.testing.assert_allclose(rg.noise_variance(image, kw), expect, rtol=1e-12)


def test_twin_has_the_lens_flux_and_another_shape(family):
    survey = get_survey("des")
    rng = np.random.default_rng(3)
    scene = rg.draw_galsim_scene(family, survey, rng, objid="x", force_kind="lens")
    lens = rg.render_galsim_scene(scene, survey, None)
    twin = rg.render_galsim_scene(scene, survey, None, lensing=False)
    assert twin.lensed.sum() == 0 and twin.flux_ratio == 0
    np.testing.assert_allclose(twin.noiseless.sum(axis=(1, 2)), lens.noiseless.sum(axis=(1, 2)), rtol=0.01)
    assert np.abs(twin.noiseless - lens.noiseless).max() > 0.01 * lens.lensed.max()


def test_flux_ratio_is_lensed_over_total_in_the_reference_band(family):
    survey = get_survey("hsc")
    for kind in ("lens", "companion"):
        scene = rg.draw_galsim_scene(family, survey, np.random.default_rng(5), objid="x", force_kind=kind)
        cut = rg.render_galsim_scene(scene, survey, np.random.default_rng(1))
        r = survey.band_names.index(survey.reference_band)
        assert cut.flux_ratio == pytest.approx(cut.lensed[r].sum() / cut.noiseless[r].sum())
        assert (cut.flux_ratio > 0) == (kind == "lens") and (cut.arc_snr > 0) == (kind == "lens")


def test_same_seed_same_bytes(tmp_path, family):
    survey = get_survey("des")
    kw = dict(n_cutouts=2, seed=11, progress=False, start_index=5)
    a, _ = rg.simulate_galsim_to_directory(survey, family, out_dir=tmp_path / "a", **kw)
    b, _ = rg.simulate_galsim_to_directory(survey, family, out_dir=tmp_path / "b", **kw)
    assert a.equals(b)
    for f in a["file"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert list(a["objid"]) == ["simg-des-galsim-s11-000005", "simg-des-galsim-s11-000006"]


@pytest.mark.parametrize("name", ["des", "hsc", "lsst", "euclid", "hst"])
def test_every_file_passes_read_cutout(tmp_path, family, name):
    from lens_assets.science.simulation import simulate_to_directory  # noqa: F401  (the columns it returns)

    survey = get_survey(name)
    truth, _ = rg.simulate_galsim_to_directory(survey, family, n_cutouts=2, seed=2, out_dir=tmp_path,
                                               progress=False, role="heldout")
    assert list(truth.columns) == ["objid", "file", "label", "kind", "flux_ratio", "theta_e", "arc_snr",
                                   "seeing_ref"]
    for row in truth.itertuples():
        cut = read_cutout((tmp_path / row.file).read_bytes(), name=row.file, survey=survey)
        assert cut.objid == row.objid and cut.primary["LABELSRC"] == "sim:galsim"
        assert cut.primary["SIMFAM"] == "galsim" and bool(cut.primary["LENS"]) == bool(row.label)
        assert cut.primary["SIMROLE"] == "heldout"
        assert cut.primary["FLUXRAT"] == pytest.approx(row.flux_ratio, abs=1e-6)
        # a lens is its own scene; a galsim non-lens has none
        assert cut.primary.get("SCENE_TE") == (pytest.approx(row.theta_e, abs=1e-5) if row.label else None)
        assert all(p is not None and p.shape[0] % 2 == 1 for p in cut.psf)
        assert not any("var_derived" in f for f in cut.band_flags.values())


def test_unlabeled_files_drop_the_truth(tmp_path, family):
    survey = get_survey("des")
    truth, _ = rg.simulate_galsim_to_directory(survey, family, n_cutouts=1, seed=2, out_dir=tmp_path,
                                               progress=False, labeled=False)
    cut = read_cutout((tmp_path / truth["file"][0]).read_bytes(), name="x", survey=survey)
    assert not set(cut.primary) & set(TRUTH_KEYS) and "SIMROLE" in TRUTH_KEYS
    with pytest.raises(ValueError, match=r"simulation role 'test' is not one of"):
        rg.simulate_galsim_to_directory(survey, family, n_cutouts=1, seed=2, out_dir=tmp_path / "x", role="test")


def _family_text(**replace):
    text = FAMILY_FILE.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("edit,match", [
    ({'renderer = "galsim"': 'renderer = "lenstronomy"'}, r"bad\.toml: renderer = 'lenstronomy'"),
    ({"shear = { dist": "sheer = { dist"},
     r"bad\.toml: \[deflector\] has unknown keys \['sheer'\] and lacks \['shear'\]"),
    ({'"kolmogorov", "moffat", "core_wings"]': '"kolmogorov", "airy", "core_wings"]'},
     r"bad\.toml \[psf\] profile: values \['airy'\] are not among"),
    ({"lens_fraction = 0.5": "lens_fraction = 1.5"},
     r"bad\.toml: lens_fraction must be a number in \[0, 1\], got 1\.5"),
    ({"twin = 0.35": "mirage = 0.35"}, r"bad\.toml: \[negatives\] has unknown kinds \['mirage'\]"),
    ({'max_offset = 0.9': 'max_offset = { dist = "gamma", k = 2 }'},
     r"bad\.toml \[source\] max_offset: unknown dist 'gamma'"),
])
def test_loader_errors_name_file_section_and_key(tmp_path, edit, match):
    path = tmp_path / "bad.toml"
    path.write_text(_family_text(**edit))
    with pytest.raises(ValueError, match=match):
        rg.load_galsim_family(path)


def test_loader_refuses_a_missing_file():
    with pytest.raises(ValueError, match=r"nosuch\.toml: no such GalSim family file"):
        rg.load_galsim_family("nosuch")
