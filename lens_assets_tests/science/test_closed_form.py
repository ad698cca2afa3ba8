"""The selection's closed-form SIE + shear ray shooting and Sérsic / Gaussian light, against lenstronomy."""

import numpy as np
import pytest
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel

from lens_assets.science import population as pop
from lens_assets.science.closed_form import ray_shoot_sie_shear, surface_brightness
from lens_assets.science.families import load_family
from lens_assets.science.simulation import _unit_flux
from lens_assets.science.surveys import get_survey

XS = np.linspace(-5.0, 5.0, 41)
YS = np.linspace(-4.0, 6.0, 37)  # not square, so rows and columns cannot be swapped unnoticed
X, Y = np.meshgrid(XS, YS)

LENSES = [  # (SIE, SHEAR)
    ({"theta_E": 1.3, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},  # round: q = 1 taken as 1 - 1e-8
     {"gamma1": 0.0, "gamma2": 0.0, "ra_0": 0.0, "dec_0": 0.0}),
    ({"theta_E": 0.7, "e1": 0.21, "e2": -0.13, "center_x": 0.3, "center_y": -0.45},
     {"gamma1": 0.04, "gamma2": -0.07, "ra_0": 0.2, "dec_0": 0.1}),
    ({"theta_E": 2.4, "e1": -0.35, "e2": 0.4, "center_x": -1.1, "center_y": 0.6},  # q = 0.31
     {"gamma1": -0.12, "gamma2": 0.03, "ra_0": -0.5, "dec_0": 1.5}),
    ({"theta_E": 1.0, "e1": 0.0, "e2": 0.003, "center_x": 0.0, "center_y": 0.0},  # nearly round: log1p's branch
     {"gamma1": 0.02, "gamma2": 0.0, "ra_0": 0.0, "dec_0": 0.0}),
    ({"theta_E": 0.9, "e1": 0.8, "e2": -0.7, "center_x": 0.1, "center_y": 0.0},  # |e| > 0.9999: capped as there
     {"gamma1": 0.0, "gamma2": 0.05, "ra_0": 0.0, "dec_0": 0.0}),
]


@pytest.mark.parametrize("kwargs_lens", LENSES)
def test_ray_shooting_is_lenstronomys_sie_and_shear(kwargs_lens):
    bx, by = ray_shoot_sie_shear(XS, YS, kwargs_lens)
    ref_x, ref_y = LensModel(["SIE", "SHEAR"]).ray_shooting(X.ravel(), Y.ravel(), list(kwargs_lens))
    assert bx.shape == by.shape == X.shape
    scale = kwargs_lens[0]["theta_E"]
    # the deflection to round-off of theta_E (a swapped axis, sign or rotation is off by order theta_E)
    assert np.abs(bx - ref_x.reshape(X.shape)).max() < 1e-12 * scale
    assert np.abs(by - ref_y.reshape(X.shape)).max() < 1e-12 * scale


def test_the_shear_alone_and_the_sie_alone_each_agree():
    """Each of the two profiles against lenstronomy apart: a shear-only lens (theta_E ~ 0) and an SIE alone."""
    sie, shear = LENSES[2]
    for kwargs in (({**sie, "theta_E": 1e-300}, shear), (sie, {**shear, "gamma1": 0.0, "gamma2": 0.0})):
        bx, by = ray_shoot_sie_shear(XS, YS, kwargs)
        ref_x, ref_y = LensModel(["SIE", "SHEAR"]).ray_shooting(X.ravel(), Y.ravel(), list(kwargs))
        assert np.allclose(bx, ref_x.reshape(X.shape), rtol=0, atol=1e-12)
        assert np.allclose(by, ref_y.reshape(X.shape), rtol=0, atol=1e-12)


SERSICS = [
    {"amp": 3.0, "R_sersic": 0.4, "n_sersic": 1.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
    {"amp": 0.7, "R_sersic": 0.05, "n_sersic": 4.0, "e1": 0.2, "e2": -0.3, "center_x": 0.13, "center_y": -0.2},
    {"amp": 12.0, "R_sersic": 1.5, "n_sersic": 0.6, "e1": -0.1, "e2": 0.05, "center_x": -2.0, "center_y": 1.0},
    {"amp": 1.0, "R_sersic": 0.003, "n_sersic": 2.5, "e1": 0.0, "e2": 0.1, "center_x": 0.0, "center_y": 0.0},
    {"amp": 1.0, "R_sersic": 5e-5, "n_sersic": 1.0, "e1": 0.1, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},  # floor
    # max(0, .)
    {"amp": 1.0, "R_sersic": -0.1, "n_sersic": 1.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
]


@pytest.mark.parametrize("kwargs", SERSICS)
def test_sersic_is_lenstronomys(kwargs):
    """Product-averaged radius, b_n, the 1e-4 floor at the centre (the grid holds (0, 0)) and, for the smallest
    radius, the zero beyond 1000 R_sersic."""
    x = np.concatenate([X.ravel(), [0.0, kwargs["center_x"]]])
    y = np.concatenate([Y.ravel(), [0.0, kwargs["center_y"]]])
    ours = surface_brightness(x, y, "SERSIC_ELLIPSE", kwargs)
    ref = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(x, y, [kwargs])
    assert np.allclose(ours, ref, rtol=1e-12, atol=0)
    if kwargs["R_sersic"] < 0.005:
        assert (ref == 0).any() and ((ours == 0) == (ref == 0)).all()
    if kwargs["R_sersic"] > 1e-4:
        assert ours.max() > kwargs["amp"]  # brighter than at R_sersic somewhere: not a constant


def test_gaussian_is_lenstronomys_and_other_profiles_are_refused():
    kwargs = {"amp": 5.0, "sigma": 0.08, "center_x": 0.3, "center_y": -0.1}
    fine = np.linspace(-1, 1, 201)
    gx, gy = np.meshgrid(fine, fine)
    ours = surface_brightness(gx, gy, "GAUSSIAN", kwargs)
    ref = LightModel(["GAUSSIAN"]).surface_brightness(gx.ravel(), gy.ravel(), [kwargs]).reshape(gx.shape)
    assert np.allclose(ours, ref, rtol=1e-12, atol=1e-300)
    assert ours.sum() * 0.01**2 == pytest.approx(5.0, rel=1e-6)  # amp is the total flux
    # far out the exponential underflows to exactly 0 and is not evaluated: the same zeros and values as lenstronomy
    wide = np.linspace(-12, 12, 301)
    wx, wy = np.meshgrid(wide, wide)
    far = surface_brightness(wx, wy, "GAUSSIAN", kwargs)
    ref = LightModel(["GAUSSIAN"]).surface_brightness(wx.ravel(), wy.ravel(), [kwargs]).reshape(wx.shape)
    assert 0.9 < (ref == 0).mean() < 1.0 and np.array_equal(far == 0, ref == 0)
    assert np.allclose(far, ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="HERNQUIST"):
        surface_brightness(gx, gy, "HERNQUIST", {"amp": 1.0})


@pytest.mark.parametrize("survey", ["des", "hst"])
def test_the_selections_lensed_image_is_lenstronomys_on_drawn_scenes(survey):
    """Every candidate the selection ray-shoots while drawing scenes, clumpy sources included, against the same
    image from lenstronomy: the population drawn is the one lenstronomy's selection draws (unless a value within
    round-off of a selection threshold fell the other way)."""
    spec = get_survey(survey)
    seen = []
    real = pop.lensed_image

    def recorded(kwargs_lens, components, **kw):
        seen.append((kwargs_lens, components))
        return real(kwargs_lens, components, **kw)

    rng = np.random.default_rng(5)
    pop.lensed_image = recorded
    try:
        for _ in range(4):
            pop.draw_scene(load_family("physical"), spec, rng)
    finally:
        pop.lensed_image = real
    assert len(seen) >= 4 and any(len(comps) > 1 for _, comps in seen)
    for kwargs_lens, comps in seen:
        image, mu = pop.lensed_image(kwargs_lens, comps, survey=spec)
        ref, mu_ref = pop.lensed_image(kwargs_lens, comps, survey=spec, backend="lenstronomy")
        assert np.abs(image - ref).max() <= 1e-12 * ref.max()
        assert mu == pytest.approx(mu_ref, rel=1e-12) and mu >= 1.0 and np.isfinite(image).all()
    with pytest.raises(ValueError, match="backends are"):
        pop.lensed_image(*seen[0], survey=spec, backend="galsim")


def test_the_lenstronomy_backend_is_lenstronomy_itself():
    """The reference the closed forms are held to is the packages' own ray shooting and light, summed and binned."""
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    from lens_assets.science.simulation import LightComponent, _sersic

    spec = get_survey("sdss")
    comp = LightComponent("SERSIC_ELLIPSE", _sersic((0.2, -0.1), n=1.5, r_eff=0.3, q=0.6, pa=30.0), 22.0, 0.0,
                          lensed=True)
    image, mu = pop.lensed_image(LENSES[1], [comp], survey=spec, supersample=3, backend="lenstronomy")
    n, pix = spec.cutout_size_px, spec.pixel_scale_arcsec
    coords = (np.arange(3 * n) + 0.5) / 3 * pix - n * pix / 2
    x, y = np.meshgrid(coords, coords)
    bx, by = LensModel(["SIE", "SHEAR"]).ray_shooting(x.ravel(), y.ravel(), list(LENSES[1]))
    flux = 10 ** (-0.4 * (22.0 - spec.band(spec.reference_band).magnitude_zero_point))
    sb = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(bx, by, [dict(comp.shape, amp=flux / _unit_flux(comp))])
    ref = sb.reshape(n, 3, n, 3).sum(axis=(1, 3)) * (pix / 3) ** 2
    assert np.array_equal(image, ref) and mu == pytest.approx(ref.sum() / flux, rel=1e-14)
    closed, _ = pop.lensed_image(LENSES[1], [comp], survey=spec, supersample=3)
    assert np.abs(closed - ref).max() <= 1e-12 * ref.max()
