"""Simulated cluster fields: the Einstein radius, the selection, lenses against their twins, the FITS round trip."""

import math
from dataclasses import replace

import numpy as np
import pytest

from lens_assets.science.clusters import fields as cf
from lens_assets.science.families import Prior, load_family
from lens_assets.science.simulation import render_system, simulate_one
from lens_assets.science.surveys import get_survey


@pytest.fixture(scope="module")
def small():
    """The cluster family on a 24-arcsec DES field (fast), and one selected scene with its lens and twin."""
    fam = load_family("cluster")
    fam = replace(fam, sections={**fam.sections, "field": {"size_arcsec": Prior("constant", {"value": 24.0}, "test")},
                                 "selection": {**fam.sections["selection"],
                                               "min_theta_e_arcsec": Prior("constant", {"value": 3.0}, "test")}})
    survey = get_survey("des")
    rng = np.random.default_rng(5)
    scene = cf.draw_cluster_scene(fam, survey, rng)
    fsurvey = cf._field_survey(fam, survey)
    lens = render_system(cf.build_cluster_system(scene, "lens", fam, survey, np.random.default_rng(1), objid="a"),
                         fsurvey, np.random.default_rng(2))
    twin = render_system(cf.build_cluster_system(scene, "twin", fam, survey, np.random.default_rng(1), objid="b"),
                         fsurvey, np.random.default_rng(2))
    return fam, survey, scene, lens, twin


def test_einstein_radius_of_a_singular_isothermal_sphere_is_its_theta_e():
    # an SIS has kappa = theta_E / (2 r): the mean convergence within r is theta_E / r, 1 at r = theta_E
    from lenstronomy.LensModel.lens_model import LensModel

    for theta_e in (3.0, 7.5):
        got = cf.einstein_radius_arcsec(LensModel(["SIS"]), [{"theta_E": theta_e, "center_x": 0.0, "center_y": 0.0}],
                                        max_radius_arcsec=12.0, step_arcsec=0.05)
        assert got == pytest.approx(theta_e, rel=0.02)
    # a lens too weak to be critical anywhere has none
    weak = cf.einstein_radius_arcsec(LensModel(["SIS"]), [{"theta_E": 0.01, "center_x": 0.0, "center_y": 0.0}],
                                     max_radius_arcsec=5.0, step_arcsec=0.25)
    assert weak == 0.0
    # no pixel centre within the radius: no crossing either
    assert cf.einstein_radius_arcsec(LensModel(["SIS"]), [{"theta_E": 1.0, "center_x": 0.0, "center_y": 0.0}],
                                     max_radius_arcsec=0.1, step_arcsec=0.25) == 0.0


def test_einstein_radius_of_a_cluster_matches_the_whole_square_grid(small):
    """Evaluating the convergence inside the circle only gives the radius the whole square grid gives (the
    mean within each distinct radius, its first drop through 1 beyond the cusp, computed here by hand: pixels
    at one radius enter together, in no order)."""
    from lenstronomy.LensModel.lens_model import LensModel

    scene = small[2]
    lens_model, kwargs = LensModel(list(scene.lens_model_list)), scene.kwargs_lens
    r_max, step = 2.0 * scene.theta_e_arcsec, 0.25
    m = 2 * math.ceil(r_max / step)
    axis = (np.arange(m) - (m - 1) / 2) * step
    xx, yy = np.meshgrid(axis, axis)
    kappa = lens_model.kappa(xx.ravel(), yy.ravel(), list(kwargs))
    r = np.hypot(xx, yy).ravel()
    rs = np.unique(r[r <= r_max])  # the distinct radii, and the mean convergence within each
    mean = np.array([kappa[r <= radius].mean() for radius in rs])
    i = next(j for j in range(1, len(rs)) if mean[j] < 1 <= mean[j - 1] and rs[j] > 2 * step)
    want = rs[i - 1] + (mean[i - 1] - 1) / (mean[i - 1] - mean[i]) * (rs[i] - rs[i - 1])
    got = cf.einstein_radius_arcsec(lens_model, kwargs, max_radius_arcsec=r_max, step_arcsec=step)
    assert scene.theta_e_arcsec > 0 and got == pytest.approx(want, rel=1e-9)


def test_einstein_radius_within_a_radius_is_the_whole_discs_bit_for_bit_or_nan_when_beyond():
    """The selection's candidates (the cluster family on DES, drawn as draw_cluster_scene draws them): evaluated only
    out to the selection's largest radius, a radius found is the
    whole disc's exactly; NaN only where the whole disc gives 0 (sub-critical) or a radius beyond it. At the
    boundary, on an SIS: a radius just inside ``within_arcsec`` (the pixel radius before the crossing) is found,
    one pixel radius further out is not."""
    fam, survey = load_family("cluster"), get_survey("des")
    half = cf.field_size_px(fam, survey) * survey.pixel_scale_arcsec / 2
    max_theta = fam.draw("selection", "max_theta_e_over_field", np.random.default_rng(0)) * 2 * half
    rng = np.random.default_rng(3)
    found = beyond = subcritical = 0
    for _ in range(60):
        candidate = None
        while candidate is None:
            candidate = cf._candidate(fam, survey, rng, half)
        _, _, _, names, kwargs = candidate
        convergence = cf.ClusterConvergence(names)
        whole = cf.einstein_radius_arcsec(convergence, kwargs, max_radius_arcsec=1.2 * max_theta)
        within = cf.einstein_radius_arcsec(convergence, kwargs, max_radius_arcsec=1.2 * max_theta,
                                           within_arcsec=max_theta)
        if math.isnan(within):
            assert whole == 0.0 or whole > max_theta, whole
            subcritical += whole == 0.0
            beyond += whole > max_theta
        else:
            assert within == whole  # bit for bit
            found += 1
    assert found >= 3 and subcritical >= 3  # both branches met (beyond max_theta is rare)
    # the whole disc inside within_arcsec: nothing to cut, the radius as before (0 for a weak lens, not NaN)
    from lenstronomy.LensModel.lens_model import LensModel

    weak = [{"theta_E": 0.01, "center_x": 0.0, "center_y": 0.0}]
    assert cf.einstein_radius_arcsec(LensModel(["SIS"]), weak, max_radius_arcsec=5.0, within_arcsec=6.0) == 0.0
    assert math.isnan(cf.einstein_radius_arcsec(LensModel(["SIS"]), weak, max_radius_arcsec=5.0, within_arcsec=2.0))
    sis = [{"theta_E": 1.5, "center_x": 0.0, "center_y": 0.0}]
    whole = cf.einstein_radius_arcsec(LensModel(["SIS"]), sis, max_radius_arcsec=5.0)
    rs, _, _, last = cf._circle_grid(5.0, 0.25)
    radii = rs[last]
    i = int(np.searchsorted(radii, whole, side="right"))  # the crossing lies between radii[i - 1] and radii[i]
    assert radii[i - 1] <= whole <= radii[i]
    for within in (radii[i - 1], whole, 2.0):
        assert cf.einstein_radius_arcsec(LensModel(["SIS"]), sis, max_radius_arcsec=5.0, within_arcsec=within) == whole
    assert math.isnan(cf.einstein_radius_arcsec(LensModel(["SIS"]), sis, max_radius_arcsec=5.0,
                                                within_arcsec=float(np.nextafter(radii[i - 1], -np.inf))))
    big = [{"theta_E": 3.0, "center_x": 0.0, "center_y": 0.0}]  # beyond within_arcsec: NaN, not 0
    assert cf.einstein_radius_arcsec(LensModel(["SIS"]), big, max_radius_arcsec=5.0) > 2.0
    assert math.isnan(cf.einstein_radius_arcsec(LensModel(["SIS"]), big, max_radius_arcsec=5.0, within_arcsec=2.0))


def test_cluster_convergence_is_lenstronomys_kappa(small):
    """The closed forms (elliptical NFW as lenstronomy's cored steep ellipsoids, SIS) and the lenstronomy path
    for the rest (the BCG's SIE) give lenstronomy's convergence: on a drawn cluster, on a rotated and offset halo
    alone, and on an SIS's own centre (0 there, as lenstronomy has it)."""
    from lenstronomy.LensModel.lens_model import LensModel

    scene = small[2]
    rng = np.random.default_rng(11)
    x, y = rng.uniform(-15.0, 15.0, size=(2, 4000))
    member = scene.kwargs_lens[2]
    x[0], y[0] = member["center_x"], member["center_y"]
    cases = [(scene.lens_model_list, list(scene.kwargs_lens)),
             (("NFW_ELLIPSE_CSE",), [{"Rs": 7.0, "alpha_Rs": 2.5, "e1": 0.2, "e2": -0.15, "center_x": 1.3,
                                      "center_y": -0.7}]),
             (("SIS", "SIE"), [{"theta_E": 1.1, "center_x": x[1], "center_y": y[1]},
                               {"theta_E": 2.0, "e1": 0.1, "e2": 0.05, "center_x": 0.0, "center_y": 0.0}])]
    for names, kwargs in cases:
        want = LensModel(list(names)).kappa(x, y, kwargs)
        got = cf.ClusterConvergence(names).kappa(x, y, kwargs)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert cf.ClusterConvergence(("SIS",)).kappa(np.array([0.5]), np.array([0.5]),
                                                 [{"theta_E": 1.0, "center_x": 0.5, "center_y": 0.5}])[0] == 0.0
    # any shape comes back in its shape, point by point: a 44 x 44 grid (as many columns as the halo has
    # ellipsoids) and a scalar
    names, kwargs = cases[0]
    grid = np.meshgrid(np.linspace(-9.0, 9.0, 44), np.linspace(-8.0, 8.0, 44))
    got = cf.ClusterConvergence(names).kappa(*grid, kwargs)
    assert got.shape == (44, 44)
    np.testing.assert_allclose(got, LensModel(list(names)).kappa(*grid, kwargs), rtol=1e-12, atol=0)
    one = cf.ClusterConvergence(names).kappa(3.0, -2.0, kwargs)
    assert np.shape(one) == () and one == pytest.approx(LensModel(list(names)).kappa(np.array([3.0]), np.array([-2.0]),
                                                                                   kwargs)[0], rel=1e-12)
    with pytest.raises(ValueError, match="1 kwargs for 2 lens profiles"):
        cf.ClusterConvergence(("SIS", "SIE")).kappa(x, y, [{"theta_E": 1.0}])


def test_field_size_is_the_familys_side_on_the_survey_grid_even():
    fam = load_family("cluster")
    assert cf.field_size_px(fam, get_survey("hsc")) == 238  # 40" / 0.168"/px = 238.1
    assert cf.field_size_px(fam, get_survey("des")) == 152  # 152.1
    assert cf.field_size_px(fam, get_survey("sdss")) % 2 == 0


def test_the_selection_figures_are_the_reference_bands_from_lenstronomy(small):
    # the selection's arc S/N and magnifications came from render_field's cache; lenstronomy's ImageModel
    # (render_system) on the same probe (the cluster and the sources, no contaminants) gives the same figures
    fam, survey, scene, *_ = small
    fsurvey = cf._field_survey(fam, survey)
    ref = replace(fsurvey, bands=(fsurvey.band(fsurvey.reference_band),))
    probe = cf._system(scene, objid="p", is_lens=True, kind="probe", components=[*scene.cluster_light, *scene.sources],
                       size_px=fsurvey.cutout_size_px, sky={"ra_deg": 0.0, "dec_deg": 0.0})
    cut = render_system(probe, ref, np.random.default_rng(0))
    assert cut.arc_snr == pytest.approx(scene.arc_snr, rel=1e-9)
    from lens_assets.science.simulation import band_flux

    intrinsic = [band_flux(c.mag_ref, c.color_beta, ref, ref.band_names[0]) for c in scene.sources]
    psf_loss = 1.0 - cut.psf[0].sum()  # ~0: a normalized kernel
    assert np.dot(scene.magnifications, intrinsic) == pytest.approx(cut.lensed[0].sum(), rel=0.01 + abs(psf_loss))
    # the selection, measured on lenstronomy's images: the total magnification, the arcs' S/N, theta_E in the field
    sel = {k: p.sample(None) for k, p in fam.sections["selection"].items()}
    assert cut.lensed[0].sum() / sum(intrinsic) >= sel["min_magnification"]
    assert cut.arc_snr >= sel["min_arc_snr"]
    assert sel["min_theta_e_arcsec"] <= scene.theta_e_arcsec <= sel["max_theta_e_over_field"] * 24.0
    assert scene.z_source > scene.z_cluster
    # each source's own magnification: that source alone through the lens, lensed flux / intrinsic flux
    for c, mu, f in zip(scene.sources, scene.magnifications, intrinsic):
        alone = replace(probe, components=(c,))
        lensed = render_system(alone, ref, np.random.default_rng(0)).lensed[0].sum()
        # the convolved image loses a little light at the field's edges (some images fall mostly outside it)
        assert mu == pytest.approx(lensed / f, rel=0.02, abs=0.05)
    assert np.ptp(scene.magnifications) > 0.05 * np.mean(scene.magnifications)  # not one mean for every source


def test_halo_normalization_returns_m200_and_c200():
    # lenstronomy's angle <-> physical conversion both ways: the halo drawn is the M200, c200 of the priors
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo

    fam = load_family("cluster")
    cl = cf._cluster(fam, get_survey("des"), np.random.default_rng(0), 20.0)
    names, kwargs = cf._lens_kwargs(cl, 2.0)
    assert names[0] == "NFW_ELLIPSE_CSE"
    lc = LensCosmo(z_lens=cl["z"], z_source=2.0, cosmo=cl["cosmo"])
    _, _, c, _, m200 = lc.nfw_angle2physical(kwargs[0]["Rs"], kwargs[0]["alpha_Rs"])
    assert (m200, c) == (pytest.approx(cl["halo"]["m200"], rel=1e-6), pytest.approx(cl["halo"]["c"], rel=1e-6))


def test_member_masses_follow_faber_jackson():
    # L ~ sigma^4: 200 km/s at M_200; ten times the light (2.5 mag brighter) is 10^(1/4) times the dispersion
    assert cf.member_sigma_kms(-21.4, -21.4) == pytest.approx(200.0)
    assert cf.member_sigma_kms(-23.9, -21.4) == pytest.approx(200.0 * 10 ** 0.25)
    fam = load_family("cluster")
    cl = cf._cluster(fam, get_survey("des"), np.random.default_rng(1), 20.0)
    # members 1-4.5 mag fainter than a BCG of M ~ -23.6: sigma ~ 80-230 km/s, Einstein radii of a few tenths
    sigmas = np.array([m[2] for m in cl["members"]])
    assert ((sigmas > 60) & (sigmas < 260)).all()
    _, kwargs = cf._lens_kwargs(cl, 2.0)
    member_theta = np.array([k["theta_E"] for k in kwargs[2:]])
    assert ((member_theta > 0.02) & (member_theta < 2.0)).all()


def test_a_group_is_compact_about_its_centre():
    from lens_assets.science.families import Prior

    fam = load_family("cluster")
    g = {**fam.sections["group"], "radius_arcsec": Prior("constant", {"value": 1.0}, "t"),
         "n_members": Prior("constant", {"value": 40}, "t")}
    fam = replace(fam, sections={**fam.sections, "group": g})
    members = cf._sources(fam, np.random.default_rng(0), 12.0, True)
    xy = np.array([(c.shape["center_x"], c.shape["center_y"]) for c in members])
    # scattered by 1 arcsec about one centre whatever the Einstein radius (12 arcsec here)
    assert np.std(xy - xy.mean(axis=0), axis=0) == pytest.approx([1.0, 1.0], abs=0.3)
    assert len({c.color_beta for c in members}) == 40 and np.std([c.color_beta for c in members]) < 0.1


def test_the_twin_is_the_same_field_without_deflection(small):
    _, survey, scene, lens, twin = small
    # the cluster's light and the contaminants are the same in both: the twin adds only the unlensed sources
    assert (twin.unlensed - lens.unlensed).min() > -1e-9 * lens.unlensed.max()
    assert lens.lensed.sum() > 0 and twin.lensed.sum() == 0  # the twin's sources are unlensed light
    assert twin.system.theta_e_arcsec == 0.0 and twin.system.z_source == -1.0 and twin.system.kwargs_lens == ()
    assert twin.arc_snr == 0.0 and lens.arc_snr > 0
    # each source as bright as its own arcs: the twin's extra light equals the lens's lensed light in every band
    extra = twin.unlensed.sum(axis=(1, 2)) - lens.unlensed.sum(axis=(1, 2))
    np.testing.assert_allclose(extra, lens.lensed.sum(axis=(1, 2)), rtol=0.02)


def test_fields_are_deterministic_and_every_non_lens_type_renders(small):
    fam, survey, *_ = small
    a, _ = cf.cluster_field(fam, survey, 3, 0)
    b, _ = cf.cluster_field(fam, survey, 3, 0)
    np.testing.assert_array_equal(a.image, b.image)
    rng = np.random.default_rng(0)
    scene = small[2]
    for role in ("interloper", "edge_on_spiral", "tidal", "radial_streak"):
        s = cf.build_cluster_system(scene, role, fam, survey, rng, objid=role)
        assert not s.is_lens and s.kind == role
        # the mimic adds unlensed structure beyond the cluster, the contaminants and the unlensed sources
        assert len(s.components) > len(scene.cluster_light) + len(scene.contaminants) + len(scene.sources)
    with pytest.raises(ValueError, match="unknown cluster role 'ring'; valid are 'lens' and"):
        cf.build_cluster_system(scene, "ring", fam, survey, rng, objid="x")


def test_a_cluster_field_file_reads_back_through_the_inbox_contract(small, tmp_path):
    from lens_assets.science.fits_contract import read_cutout

    fam, survey, scene, lens, _ = small
    data = cf.cluster_field_bytes(lens, scene, survey=survey, family=fam, seed=0)
    fsurvey = cf._field_survey(fam, survey)
    c = read_cutout(data, name="f.fits", survey=fsurvey)
    n = lens.image.shape[-1]
    assert c.image.shape == (survey.n_bands, n, n)
    assert c.primary["OBJTYPE"] == cf.OBJTYPE_CLUSTER
    assert c.primary["BCGXPIX"] == c.primary["BCGYPIX"] == pytest.approx((n - 1) / 2 + 1)
    assert c.primary["NARCS"] == len(scene.sources) and c.primary["NSRC"] == len(scene.sources)
    assert 15.0 < c.primary["ARCSB"] < 35.0
    np.testing.assert_allclose(c.image, lens.image.astype(np.float32), rtol=1e-6)
    unlabeled = read_cutout(cf.cluster_field_bytes(lens, scene, survey=survey, family=fam, seed=0, labeled=False),
                            name="u.fits", survey=fsurvey)
    assert unlabeled.primary.get("OBJTYPE") == cf.OBJTYPE_CLUSTER and "NARCS" not in unlabeled.primary


def test_galaxy_simulation_refuses_a_cluster_family():
    with pytest.raises(ValueError, match="draws cluster fields"):
        simulate_one(get_survey("des"), load_family("cluster"), 0, 0)
    with pytest.raises(ValueError, match="is not 'cluster'"):
        cf.cluster_field(load_family("physical"), get_survey("des"), 0, 0)


def test_simulate_cluster_fields_writes_one_file_per_field(small, tmp_path):
    fam, survey, *_ = small
    truth = cf.simulate_cluster_fields(survey, fam, n_fields=3, seed=1, out_dir=tmp_path)
    assert len(truth) == 3 and sorted(p.name for p in tmp_path.glob("*.fits")) == sorted(truth["file"])
    lenses = truth[truth["label"] == 1]
    assert (lenses["theta_e"] > 0).all() and (truth.loc[truth["label"] == 0, "theta_e"] == 0).all()
    assert math.isfinite(truth["seconds"].sum())


def test_render_field_draws_what_render_system_draws(small):
    # the rays shot once and the unit images shared by the bands give lenstronomy's ImageModel images per band
    fam, survey, scene, *_ = small
    fsurvey = cf._field_survey(fam, survey)
    for role in ("lens", "tidal"):
        system = cf.build_cluster_system(scene, role, fam, survey, np.random.default_rng(3), objid=role)
        want = render_system(system, fsurvey, np.random.default_rng(4))
        cache: dict = {}
        for _ in range(2):  # the second render takes every unit image from the cache
            got = cf.render_field(system, fsurvey, np.random.default_rng(4), cache=cache)
            for a, b in ((got.lensed, want.lensed), (got.unlensed, want.unlensed)):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * want.unlensed.max())
            np.testing.assert_allclose(got.image, want.image, rtol=0, atol=1e-9 * want.unlensed.max())
        assert len(cache) > len(system.components)  # the grid, the traced rays (lens) and one image per component
    star = replace(system, points=(object(),))
    with pytest.raises(ValueError, match="has point sources"):
        cf.render_field(star, fsurvey, np.random.default_rng(0))
