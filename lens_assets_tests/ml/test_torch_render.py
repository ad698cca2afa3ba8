"""The torch renderer against lenstronomy: each convention alone, then whole simulated cutouts."""

import math
import os
import shutil

import numpy as np
import pytest
import torch

from lens_assets.ml.torch_render import (RenderBatch, _convolve_grouped, pack_systems, ray_trace, render,
                                         sersic_total_flux, solve_images, subpixel_grid)
from lens_assets.science.families import load_family
from lens_assets.science.simulation import (LightComponent, PointComponent, System, _lensed_points, _sersic,
                                            lenstronomy_band_setup, render_system, simulate_one)
from lens_assets.science.surveys import get_survey

DES = get_survey("des")


def _system(survey, *, kwargs_lens=(), components=(), points=(), observation=None, profile="moffat"):
    return System(objid="t", is_lens=bool(kwargs_lens), kind="extended" if kwargs_lens else "plain",
                  theta_e_arcsec=kwargs_lens[0]["theta_E"] if kwargs_lens else 0.0, kwargs_lens=tuple(kwargs_lens),
                  components=tuple(components), points=tuple(points), psf_profile=profile,
                  psf_fwhm_arcsec={b.name: b.seeing_fwhm_arcsec * (1 + 0.1 * i) for i, b in enumerate(survey.bands)},
                  moffat_beta=2.5, exposure_scale=1.0, z_lens=0.5, z_source=2.0, ra_deg=0.0, dec_deg=0.0,
                  observation=observation or {})


def _sie(theta_e=1.2, q=0.7, phi=0.6, gamma=0.05, gamma_angle=1.1):
    from lenstronomy.Util.param_util import phi_q2_ellipticity, shear_polar2cartesian

    e1, e2 = phi_q2_ellipticity(phi, q)
    g1, g2 = shear_polar2cartesian(gamma_angle, gamma)
    return ({"theta_E": theta_e, "e1": float(e1), "e2": float(e2), "center_x": 0.05, "center_y": -0.03},
            {"gamma1": float(g1), "gamma2": float(g2), "ra_0": 0.0, "dec_0": 0.0})


def _torch(system, survey=DES, **kw):
    return render(pack_systems([system], survey), noise=False, **kw)


def _assert_close_to_lenstronomy(system, survey=DES, *, rel=1e-6):
    cutout = render_system(system, survey, np.random.default_rng(0))
    out = _torch(system, survey)
    peak = np.abs(cutout.noiseless).max(axis=(1, 2), keepdims=True)
    for name in ("lensed", "unlensed"):
        diff = np.abs(getattr(out, name)[0].numpy() - getattr(cutout, name)) / peak
        assert diff.max() <= rel, f"{name}: max |torch - lenstronomy| = {diff.max():.2e} of the peak"
    return cutout, out


def test_grid_puts_ra_left_and_dec_up_as_lenstronomy():
    """An off-centre Gaussian lands on the same pixels (RA grows to the left, Dec upwards)."""
    g = LightComponent("GAUSSIAN", {"sigma": 0.3, "center_x": 1.5, "center_y": -0.8}, 20.0, 0.0, lensed=False)
    cutout, out = _assert_close_to_lenstronomy(_system(DES, components=[g]))
    y, x = np.unravel_index(np.argmax(cutout.unlensed[2]), cutout.unlensed[2].shape)
    assert x < 31.5 and y < 31.5  # +RA is left, -Dec is down (low rows)
    ra, dec = lenstronomy_band_setup(_system(DES, components=[g]), DES, "i")["image_model"].Data.map_pix2coord(x, y)
    assert (ra, dec) == pytest.approx((1.5, -0.8), abs=DES.pixel_scale_arcsec)
    xs, ys = subpixel_grid(4, 0.5, 2)
    assert xs[0, 0] > xs[0, -1] and ys[0, 0] < ys[-1, 0]
    assert float(xs.mean()) == pytest.approx(0.0, abs=1e-12) and float(ys.mean()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("q,phi,gamma", [(1.0, 0.0, 0.0), (0.6, 0.3, 0.0), (0.8, 2.0, 0.08), (0.45, 1.2, 0.03)])
def test_sie_and_shear_ray_tracing_is_lenstronomys(q, phi, gamma):
    """caustics' Rein is lenstronomy's product-averaged theta_E; the angle and shear conventions agree."""
    from lenstronomy.LensModel.lens_model import LensModel

    kl = _sie(theta_e=1.3, q=q, phi=phi, gamma=gamma)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-4, 4, 500), rng.uniform(-4, 4, 500)
    bx, by = LensModel(["SIE", "SHEAR"]).ray_shooting(x, y, list(kl))
    row = torch.tensor([[kl[0]["theta_E"], kl[0]["e1"], kl[0]["e2"], kl[0]["center_x"], kl[0]["center_y"],
                         kl[1]["gamma1"], kl[1]["gamma2"]]], dtype=torch.float64)
    tx, ty = ray_trace(row, torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(tx[0].numpy(), bx, atol=1e-6)
    np.testing.assert_allclose(ty[0].numpy(), by, atol=1e-6)


@pytest.mark.parametrize("n,r,q,pa", [(4.0, 1.1, 0.6, 30.0), (1.0, 0.3, 0.9, 100.0), (0.6, 0.15, 0.4, 170.0)])
def test_sersic_profile_and_total_flux_are_lenstronomys(n, r, q, pa):
    from lens_assets.science.simulation import _unit_flux

    c = LightComponent("SERSIC_ELLIPSE", _sersic((0.3, -0.2), n=n, r_eff=r, q=q, pa=pa), 19.0, 1.5, lensed=False)
    assert float(sersic_total_flux(torch.tensor(n, dtype=torch.float64), torch.tensor(r, dtype=torch.float64))) \
        == pytest.approx(_unit_flux(c), rel=1e-10)
    _assert_close_to_lenstronomy(_system(DES, components=[c]), rel=1e-8)


def test_lensed_source_is_lenstronomys_on_a_fine_grid():
    src = LightComponent("SERSIC_ELLIPSE", _sersic((0.1, 0.05), n=1.0, r_eff=0.12, q=0.7, pa=40.0), 22.0, 0.3,
                         lensed=True)
    knot = LightComponent("GAUSSIAN", {"sigma": 0.04, "center_x": 0.15, "center_y": 0.0}, 24.0, 0.0, lensed=True)
    hst = get_survey("hst")
    _assert_close_to_lenstronomy(_system(hst, kwargs_lens=_sie(), components=[src, knot]), hst, rel=1e-6)


def test_points_are_lenstronomys_bilinear_psf_shift():
    """A star at a sub-pixel position and a lensed quasar's images: lenstronomy shifts the PSF image
    bilinearly, the torch renderer splits the delta bilinearly; they differ only at the kernel's edge."""
    kl = _sie()
    qso = _lensed_points(kl, (0.2, 0.1), 21.0, 0.0, DES)
    star = PointComponent((-2.37,), (3.11,), (1.0,), 19.0, 1.0, lensed=False)
    cutout, out = _assert_close_to_lenstronomy(_system(DES, kwargs_lens=kl, points=[qso, star]), rel=1e-3)
    assert out.lensed[0].sum() > 0 and out.unlensed[0].sum() > 0  # routed by each point's own flag
    edge = PointComponent((8.3,), (0.0,), (1.0,), 17.0, 1.0, lensed=False)  # centre beyond the stamp's edge
    _assert_close_to_lenstronomy(_system(DES, points=[edge]), rel=1e-3)


@pytest.mark.parametrize("dx,dy", [(0.3, -0.2), (-0.27, 0.0), (1.6, -2.4), (0.0, 1.0)])
def test_shifted_convolution_is_fftconvolve_then_scipys_order_one_constant_shift(dx, dy):
    """The misregistration rides on the PSF's spectrum: the same as convolving, then ``ndimage.shift``."""
    from scipy.ndimage import shift
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.normal(size=(1, 2, 1, 20, 20)))
    psf = torch.from_numpy(rng.uniform(size=(1, 1, 7, 7)))
    out = _convolve_grouped(img, psf, 20, 0, torch.tensor([[[dx, dy]]], dtype=torch.float64))
    for p in range(2):
        ref = shift(fftconvolve(img[0, p, 0].numpy(), psf[0, 0].numpy(), mode="same"), (dy, dx), order=1,
                    mode="constant")
        np.testing.assert_allclose(out[0, p, 0].numpy(), ref, atol=1e-12)


def test_grouped_convolution_is_scipys_fftconvolve_same():
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(2)
    img = torch.from_numpy(rng.normal(size=(3, 1, 2, 30, 30)))
    psf = torch.zeros(3, 2, 21, 21, dtype=torch.float64)
    for b, half in enumerate((10, 4, 7)):  # objects of different supports share one padded size
        psf[b, :, 10 - half:11 + half, 10 - half:11 + half] = torch.from_numpy(rng.uniform(size=(2, 2 * half + 1,
                                                                                                 2 * half + 1)))
    out = _convolve_grouped(img, psf, 30, 0)
    for b in range(3):
        for k in range(2):
            np.testing.assert_allclose(out[b, 0, k].numpy(), fftconvolve(img[b, 0, k].numpy(), psf[b, k].numpy(),
                                                                         mode="same"), atol=1e-10)


# (20, 0, 13) and (20, 5, 33) need 26 and 41, one above the fast sizes 25 and 40 that a rule one pixel short would
# use; in the last two the kernel is larger than the FFT (k > S: its last rows dropped), and the last one is even
@pytest.mark.parametrize("n,pad,k,shift", [(20, 0, 13, None), (20, 5, 33, None), (16, 9, 41, (1.6, -2.4)),
                                            (20, 3, 25, (-0.3, 0.29)), (32, 16, 31, (0.0, -1.0)),
                                            (8, 0, 41, (3.7, -2.2)), (6, 2, 40, (-1.5, 0.5))])
def test_circular_convolution_leaves_the_stamp_as_the_linear_one(n, pad, k, shift):
    """The FFTs are only as large as the stamp needs (``_circular_size``): with a margin of points (``pad``),
    kernels larger than the stamp and shifts beyond a pixel, the stamp equals scipy's linear convolution of the
    whole canvas, cropped, then ``ndimage.shift``."""
    from scipy.ndimage import shift as nd_shift
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(3)
    m = n + 2 * pad
    img = torch.from_numpy(rng.normal(size=(1, 1, 1, m, m)))
    psf = torch.from_numpy(rng.uniform(size=(1, 1, k, k)))
    s = None if shift is None else torch.tensor([[shift]], dtype=torch.float64)
    out = _convolve_grouped(img, psf, n, pad, s)
    o = pad + k // 2
    ref = fftconvolve(img[0, 0, 0].numpy(), psf[0, 0].numpy(), mode="full")[o:o + n, o:o + n]
    if shift is not None:
        ref = nd_shift(ref, (shift[1], shift[0]), order=1, mode="constant")
    np.testing.assert_allclose(out[0, 0, 0].numpy(), ref, atol=1e-10)


def test_variance_and_noise_follow_lenstronomys_noise_model():
    from lenstronomy.SimulationAPI.observation_api import SingleBand

    from lens_assets.science.simulation import _noise_kwargs

    system = simulate_one(DES, load_family("physical"), 4, 0).system
    out = render(pack_systems([system], DES), generator=torch.Generator().manual_seed(0))
    for i, band in enumerate(DES.band_names):
        expected = SingleBand(**_noise_kwargs(DES, band, system)).estimate_noise(out.noiseless[0, i].numpy()) ** 2
        np.testing.assert_allclose(out.variance[0, i].numpy(), expected, rtol=1e-10)
    if not system.observation.get("gradient_sigma"):
        z = ((out.image - out.noiseless) / out.variance.sqrt()).flatten()
        assert abs(float(z.mean())) < 0.03 and float(z.std()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("survey_name,family,seed", [("des", "physical", 3), ("des", "heldout", 5),
                                                     ("hst", "physical", 2), ("sdss", "baseline", 1)])
def test_simulated_cutouts_match_lenstronomy_in_one_batch(survey_name, family, seed):
    """Whole cutouts of each family, rendered together in one padded batch: every pixel of the noiseless
    lensed and unlensed light within 1% of the band's peak (the issue's bound; seen: <= 5e-4), and the truth."""
    survey = get_survey(survey_name)
    cutouts = [simulate_one(survey, load_family(family), seed, i) for i in range(8)]
    out = render(pack_systems([c.system for c in cutouts], survey), noise=False)
    for j, c in enumerate(cutouts):
        peak = np.abs(c.noiseless).max(axis=(1, 2), keepdims=True)
        for name in ("lensed", "unlensed"):
            assert (np.abs(getattr(out, name)[j].numpy() - getattr(c, name)) / peak).max() < 1e-2
        assert float(out.flux_ratio[j]) == pytest.approx(c.flux_ratio, rel=1e-3, abs=1e-6)
        assert float(out.arc_snr[j]) == pytest.approx(c.arc_snr, rel=1e-3)
    assert {c.system.is_lens for c in cutouts} == {True, False}


def test_a_batch_renders_each_object_as_alone_and_float32_stays_close(monkeypatch):
    import lens_assets.ml.torch_render as tr

    monkeypatch.setattr(tr, "CHUNK", 2)  # several chunks per component slot and for the ray tracing
    cutouts = [simulate_one(DES, load_family("physical"), 8, i) for i in range(6)]
    assert sum(c.system.kwargs_lens is not None and c.flux_ratio > 0 for c in cutouts) >= 3  # lenses to trace
    batch = pack_systems([c.system for c in cutouts], DES)
    together = render(batch, noise=False)
    non_lenses = [j for j, c in enumerate(cutouts) if c.flux_ratio == 0]
    assert non_lenses  # a batch of non-lenses alone traces nothing and draws the same light
    only = render(pack_systems([cutouts[j].system for j in non_lenses], DES), noise=False)
    np.testing.assert_allclose(only.unlensed.numpy(), together.unlensed[non_lenses].numpy(), rtol=1e-9, atol=1e-12)
    assert float(only.lensed.abs().max()) == 0.0
    for j, c in enumerate(cutouts):
        alone = render(pack_systems([c.system], DES), noise=False)
        np.testing.assert_allclose(together.unlensed[j].numpy(), alone.unlensed[0].numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(together.lensed[j].numpy(), alone.lensed[0].numpy(), rtol=1e-9, atol=1e-12)
    f32 = render(batch.to(dtype=torch.float32), noise=False)
    peak = together.noiseless.abs().amax(dim=(-2, -1), keepdim=True)
    assert float(((f32.noiseless.double() - together.noiseless).abs() / peak).max()) < 1e-4
    image_only = render(batch, truth=False, noise=False)
    np.testing.assert_allclose(image_only.image.numpy(), together.image.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(image_only.variance.numpy(), together.variance.numpy(), rtol=1e-9)
    assert image_only.lensed is None and image_only.arc_snr is None
    with pytest.raises(ValueError, match="truth=False"):
        image_only.noiseless


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
                    reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_kernels_draw_what_the_eager_ones_do(monkeypatch):
    """``compiled=True`` runs the sub-pixel light and the ray tracing as ``torch.compile``d kernels: the same
    arithmetic fused, so in float64 the same pixels to rounding; chunks of two sizes (compiled dynamic in the batch
    size), lensed sources, quasar images and misregistration included."""
    import lens_assets.ml.torch_render as tr

    monkeypatch.setattr(tr, "CHUNK", 4)  # chunks of 4 and 2 objects
    systems = [simulate_one(DES, load_family("physical"), 8, i).system for i in range(6)]
    batch = pack_systems(systems, DES)
    eager, compiled = render(batch, noise=False), render(batch, noise=False, compiled=True)
    assert float(eager.lensed.abs().amax()) > 0 and bool((batch.shift_px != 0).any())
    peak = eager.noiseless.abs().amax(dim=(-2, -1), keepdim=True)
    for name in ("lensed", "unlensed", "variance"):
        a, b = getattr(eager, name), getattr(compiled, name)
        assert float(((a - b).abs() / (peak if name != "variance" else a.abs().amax())).max()) < 1e-12, name


def test_gradients_flow_to_the_lens_parameters():
    """The rendering is differentiable: d(light)/d(theta_E) from autograd matches a finite difference."""
    src = LightComponent("SERSIC_ELLIPSE", _sersic((0.1, 0.05), n=1.0, r_eff=0.2, q=0.7, pa=40.0), 21.0, 0.3,
                         lensed=True)
    from dataclasses import replace

    batch = pack_systems([_system(DES, kwargs_lens=_sie(), components=[src])], DES)
    shift = torch.tensor([[[0.3, -0.2], [0.0, 0.0], [-0.25, 0.1], [0.1, 0.3], [0.0, -0.15]]], dtype=torch.float64)
    batch = replace(batch, shift_px=shift)  # the misregistration rides on the PSF's spectrum: gradients through it
    weights = torch.from_numpy(np.random.default_rng(3).normal(size=(1, DES.n_bands, 64, 64)))

    def loss(lens, shift_px=shift):
        return (render(replace(batch, lens=lens, shift_px=shift_px), noise=False).lensed * weights).sum()

    lens = batch.lens.clone().requires_grad_(True)
    sh = shift.clone().requires_grad_(True)
    grad, grad_shift = torch.autograd.grad(loss(lens, sh), (lens, sh))
    h = 1e-5
    up, down = batch.lens.clone(), batch.lens.clone()
    up[0, 0] += h
    down[0, 0] -= h
    numeric = (loss(up) - loss(down)) / (2 * h)
    assert float(grad[0, 0]) == pytest.approx(float(numeric), rel=1e-4)
    assert torch.isfinite(grad).all() and float(grad[0, 0].abs()) > 0
    s_up, s_down = shift.clone(), shift.clone()  # band 0's x shift
    s_up[0, 0, 0] += h
    s_down[0, 0, 0] -= h
    numeric = (loss(batch.lens, s_up) - loss(batch.lens, s_down)) / (2 * h)
    assert float(grad_shift[0, 0, 0]) == pytest.approx(float(numeric), rel=1e-4) and float(numeric) != 0


def test_a_round_lens_has_finite_gradients():
    """|e| and its angle have no derivative at e = 0: a round lens must not turn every gradient into NaN."""
    lens = torch.tensor([[1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    x, y = subpixel_grid(16, 0.2, 1)
    bx, by = ray_trace(lens, x, y)
    (bx.sum() + by.sum()).backward()
    assert torch.isfinite(lens.grad).all()
    # and the deflection is the SIS's: theta_E along the radius
    r = torch.sqrt(x**2 + y**2)
    torch.testing.assert_close(torch.sqrt((x - bx[0]) ** 2 + (y - by[0]) ** 2), torch.full_like(r, 1.2), rtol=1e-6,
                               atol=1e-6)


def test_image_positions_and_magnifications_are_lenstronomys():
    """solve_images against the lenstronomy solver of the simulation: the same number of images, positions
    within 0.05 px (seen: 1e-9 px) and magnifications, for doubles and quads of SIE + shear lenses."""
    from lenstronomy.Util.param_util import phi_q2_ellipticity, shear_polar2cartesian

    rng = np.random.default_rng(1)
    rows, sources, ref = [], [], []
    for _ in range(40):
        te, q, phi = rng.uniform(0.5, 2.5), rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)
        e1, e2 = phi_q2_ellipticity(phi, q)
        g1, g2 = shear_polar2cartesian(rng.uniform(0, math.pi), rng.uniform(0, 0.1))
        kl = ({"theta_E": te, "e1": e1, "e2": e2, "center_x": 0.0, "center_y": 0.0},
              {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0})
        b, a = rng.uniform(0, 0.8) * te, rng.uniform(0, 2 * math.pi)
        sources.append((b * math.cos(a), b * math.sin(a)))
        ref.append(_lensed_points(kl, sources[-1], 20.0, 0.0, DES))
        rows.append([te, e1, e2, 0.0, 0.0, g1, g2])
    xy, ok, mu = solve_images(torch.tensor(rows, dtype=torch.float64), torch.tensor(sources, dtype=torch.float64))
    counts = []
    for i, p in enumerate(ref):
        pts, mags = xy[i][ok[i]].numpy(), mu[i][ok[i]].abs().numpy()
        assert len(pts) == len(p.ra)
        counts.append(len(pts))
        for x, y, m in zip(p.ra, p.dec, p.magnification):
            d = np.hypot(pts[:, 0] - x, pts[:, 1] - y)
            assert d.min() / DES.pixel_scale_arcsec < 0.05
            assert mags[d.argmin()] == pytest.approx(m, rel=1e-3)
    assert {2, 4} <= set(counts)  # doubles and quads both tested


def test_pack_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="at least one"):
        pack_systems([], DES)
    bad = LightComponent("HERNQUIST", {"Rs": 1.0, "center_x": 0.0, "center_y": 0.0}, 20.0, 0.0, lensed=False)
    with pytest.raises(ValueError, match="t: .*HERNQUIST"):
        pack_systems([_system(DES, components=[bad])], DES)
    kl = _sie()
    moved = (kl[0], dict(kl[1], ra_0=0.5))
    with pytest.raises(ValueError, match="ra_0"):
        pack_systems([_system(DES, kwargs_lens=moved)], DES)
    assert isinstance(pack_systems([_system(DES)], DES), RenderBatch)
    with pytest.raises(ValueError, match="2 rows of PSF images for 1 systems"):
        pack_systems([_system(DES)], DES, psfs=[(), ()])


def test_pack_takes_the_psf_images_it_is_given():
    """``render_systems`` draws each system's PSF images once and hands them to ``pack_systems``: the batch holds
    those images, centred, exactly as it holds the ones it draws itself."""
    from lens_assets.science.simulation import band_psf

    systems = [_system(DES), _system(DES, profile="gaussian")]
    mine = pack_systems(systems, DES)
    drawn = [tuple(band_psf(s, DES, b) for b in DES.band_names) for s in systems]
    assert not torch.equal(mine.psf[0], mine.psf[1])  # two PSFs, so a row mixed up would show
    assert torch.equal(pack_systems(systems, DES, psfs=drawn).psf, mine.psf)
    other = [tuple(np.pad(np.ones((3, 3)) / 9.0, 1) for _ in DES.band_names)]  # a 5x5 box, unlike band_psf's
    packed = pack_systems(systems[:1], DES, psfs=other).psf
    box = torch.full((3, 3), 1 / 9.0, dtype=packed.dtype)
    assert packed.shape[-1] == 5 and torch.allclose(packed[0, 0, 1:4, 1:4], box)
    with pytest.raises(ValueError, match="1 PSF images for the survey's 5 bands"):
        pack_systems(systems[:1], DES, psfs=[other[0][:1]])
