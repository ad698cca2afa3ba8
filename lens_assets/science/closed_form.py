"""lenstronomy's SIE + shear ray shooting and Sérsic / Gaussian light, as closed forms on a grid, for the selection.

The galaxy population's selection (:func:`lens_assets.science.population.lensed_image`) ray-shoots a supersampled
stamp for every candidate scene, about eight times per scene kept, and that was most of a simulated cutout's
time. These functions give what lenstronomy's ``LensModel(["SIE", "SHEAR"]).ray_shooting`` and
``LightModel(["SERSIC_ELLIPSE"])`` / ``LightModel(["GAUSSIAN"])``'s ``surface_brightness`` give, to round-off, on
the same conventions:

* **SIE** is lenstronomy's NIE with its core ``s_scale = 1e-10`` (Keeton & Kochanek 1998, eq. 8 and after):
  ``theta_E`` product-averaged, converted to the major axis; ``q`` of exactly 1 is taken as ``0.99999999``.
  ``arctanh(z)`` is written ``log((1 + z) / (1 - z)) / 2`` (a quarter of numpy's ``arctanh``'s cost), or with
  ``log1p`` for a nearly round deflector, where the plain log would lose precision.
* **SHEAR** (``gamma1``, ``gamma2`` about ``ra_0``, ``dec_0``): ``(g1 x + g2 y, g2 x - g1 y)``.
* **SERSIC_ELLIPSE**: product-averaged radius ``R_sersic``, ``b_n = 1.9992 n - 0.3271``, ``amp`` the surface
  brightness at ``R_sersic``, radii floored at 1e-4; ``(R / R_sersic)^(1/n)`` as ``exp(log(R / R_sersic) / n)``.
  lenstronomy zeroes the light beyond 1000 ``R_sersic``; so does this.
* **GAUSSIAN**: ``amp`` the total flux; evaluated only where its exponential is not exactly 0.

The rotations and the shear act on the grid's two axes apart (an outer sum), so only the transcendental functions
touch every point. ``lens_assets_tests/science/test_closed_form.py`` checks each against lenstronomy.
"""

from __future__ import annotations

import math

import numpy as np

S_SCALE = 1e-10  # lenstronomy's SIE: an NIE with this core
MAX_R_FRAC = 1000.0  # lenstronomy's Sérsic window, in units of R_sersic
R_FLOOR = 1e-4  # lenstronomy's SersicUtil smoothing
EXP_UNDERFLOW = -746.0  # np.exp is exactly 0 at and below this (float64's smallest subnormal, 5e-324, is exp(-745.13))


def ray_shoot_sie_shear(xs: np.ndarray, ys: np.ndarray, kwargs_lens) -> tuple[np.ndarray, np.ndarray]:
    """Source-plane positions ``(beta_x, beta_y)``, each of shape ``(len(ys), len(xs))``, of the grid
    ``x = xs[j], y = ys[i]`` through an SIE and an external shear (``kwargs_lens``: lenstronomy's
    ``[{theta_E, e1, e2, center_x, center_y}, {gamma1, gamma2, ra_0, dec_0}]``)."""
    from lenstronomy.Util.param_util import ellipticity2phi_q

    sie, shear = kwargs_lens
    phi, q = (float(v) for v in ellipticity2phi_q(float(sie["e1"]), float(sie["e2"])))
    # NIE._theta_E_prod_average2major_axis, then b and s as NIE._param_conv
    b = sie["theta_E"] / math.sqrt((1.0 + q**2) / (2.0 * q)) * math.sqrt((1.0 + q**2) / 2.0)
    s = S_SCALE / math.sqrt(q)
    if q >= 1.0:
        q = 0.99999999
    xs = np.asarray(xs, dtype=float)
    ys = np.asarray(ys, dtype=float)
    cos, sin = math.cos(phi), math.sin(phi)
    dx = xs - sie.get("center_x", 0.0)
    dy = ys - sie.get("center_y", 0.0)
    xr = (dx * cos)[None, :] + (dy * sin)[:, None]  # major-axis frame
    yr = (-dx * sin)[None, :] + (dy * cos)[:, None]
    psi = np.sqrt(q * q * (s * s + xr * xr) + yr * yr)
    k = math.sqrt(1.0 - q * q)
    fx = (b / k) * np.arctan(k * xr / (psi + s))
    z = k * yr / (psi + q * q * s)  # |z| <= k < 1: k |yr| < psi
    # arctanh(z) = log((1 + z) / (1 - z)) / 2; the log's absolute error, about 1e-16, becomes b 1e-16 / k in fy, so
    # a nearly round deflector (small k) takes log1p (twice log's cost)
    fy = (b / (2.0 * k)) * (np.log((1.0 + z) / (1.0 - z)) if k > 0.1 else np.log1p(2.0 * z / (1.0 - z)))
    g1, g2 = float(shear["gamma1"]), float(shear["gamma2"])
    sx = xs - shear.get("ra_0", 0.0)
    sy = ys - shear.get("dec_0", 0.0)
    beta_x = (xs - g1 * sx)[None, :] - (g2 * sy)[:, None] - (fx * cos - fy * sin)
    beta_y = (ys + g1 * sy)[:, None] - (g2 * sx)[None, :] - (fx * sin + fy * cos)
    return beta_x, beta_y


def surface_brightness(x: np.ndarray, y: np.ndarray, profile: str, kwargs: dict) -> np.ndarray:
    """lenstronomy's ``LightModel([profile]).surface_brightness(x, y, [kwargs])`` for ``SERSIC_ELLIPSE`` and
    ``GAUSSIAN``, on arrays of any shape."""
    if profile == "GAUSSIAN":
        sigma = float(kwargs["sigma"])
        dx = x - kwargs.get("center_x", 0.0)
        dy = y - kwargs.get("center_y", 0.0)
        arg = np.asarray((dx * dx + dy * dy) / (-2.0 * sigma * sigma))
        # exp underflows to exactly 0 below -745.2: only the points above are evaluated (a clump's lensed light
        # covers a few per cent of the stamp), the same values as evaluating every point
        out = np.zeros(arg.shape)
        near = arg > EXP_UNDERFLOW
        out[near] = kwargs["amp"] / (2.0 * math.pi * sigma * sigma) * np.exp(arg[near])
        return out
    if profile != "SERSIC_ELLIPSE":
        raise ValueError(f"no closed form for light profile {profile!r}; the selection draws SERSIC_ELLIPSE and "
                         f"GAUSSIAN")
    from lenstronomy.Util.param_util import transform_e1e2_product_average

    n = float(kwargs["n_sersic"])
    u, v = transform_e1e2_product_average(x, y, float(kwargs["e1"]), float(kwargs["e2"]), kwargs.get("center_x", 0.0),
                                          kwargs.get("center_y", 0.0))  # the product-averaged elliptical frame
    r_frac = np.maximum(R_FLOOR, np.sqrt(u * u + v * v)) / max(R_FLOOR, max(0.0, float(kwargs["R_sersic"])))
    bn = max(1.9992 * n - 0.3271, 0.00001)
    out = kwargs["amp"] * np.exp(-bn * (np.exp(np.log(r_frac) / n) - 1.0))
    if r_frac.size and r_frac.max() > MAX_R_FRAC:
        out[r_frac > MAX_R_FRAC] = 0.0
    return out
