"""Dust extinction: the Cardelli, Clayton & Mathis (1989, ApJ 345, 245; CCM89) law and the reddening vector.

Lensing is achromatic, so the images of one background source share colours; a
foreground dust screen (the cluster galaxies, the BCG's dust lane) reddens each
image by its own E(B-V) along one direction in colour space, the reddening vector.

CCM89 gives ``A_lambda / A_V = a(x) + b(x) / R_V`` with ``x = 1 / lambda`` in
inverse microns, in three branches implemented here:

* infrared  0.3 <= x < 1.1 (909-3333 nm): ``a = 0.574 x^1.61``, ``b = -0.527 x^1.61``
* optical/NIR 1.1 <= x < 3.3 (303-909 nm): seventh-order polynomials in ``y = x - 1.82`` (CCM89 eq. 3a, 3b)
* ultraviolet 3.3 <= x <= 8 (125-303 nm): CCM89 eq. 4a, 4b with the far-UV curvature terms for x >= 5.9

Wavelengths outside 125-3333 nm are refused. ``R_V = A_V / E(B-V)`` is 3.1 for
the diffuse Milky Way interstellar medium.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ccm89_a_lambda_over_a_v", "reddening_vector", "CCM89_RANGE_NM"]

CCM89_RANGE_NM = (1000.0 / 8.0, 1000.0 / 0.3)  # (125 nm, 3333.3 nm): x = 8 and 0.3 inverse microns

# CCM89 eq. 3a, 3b: coefficients of y^1..y^7 (a has the constant 1)
_A_OPT = (1.0, 0.17699, -0.50447, -0.02427, 0.72085, 0.01979, -0.77530, 0.32999)
_B_OPT = (0.0, 1.41338, 2.28305, 1.07233, -5.38434, -0.62251, 5.30260, -2.09002)


def _check_r_v(r_v) -> float:
    r_v = float(r_v)
    if not (np.isfinite(r_v) and r_v > 0):
        raise ValueError(f"r_v must be a positive finite number (A_V / E(B-V)), got {r_v}")
    return r_v


def ccm89_a_lambda_over_a_v(wavelength_nm, *, r_v: float = 3.1) -> np.ndarray:
    """Extinction ``A_lambda / A_V`` at ``wavelength_nm`` (scalar or array, nm) by CCM89 for ``R_V = r_v``.

    Returns an array of the input's shape (0-d for a scalar). Raises ValueError
    for a wavelength outside 125-3333 nm (x outside 0.3-8 inverse microns), naming it.
    """
    r_v = _check_r_v(r_v)
    lam = np.asarray(wavelength_nm, dtype=float)
    lo, hi = CCM89_RANGE_NM
    bad = ~np.isfinite(lam) | (lam < lo) | (lam > hi)
    if bad.any():
        raise ValueError(f"wavelength_nm {lam[bad].ravel().tolist()} outside the CCM89 range "
                         f"{lo:g}-{hi:.1f} nm (x = 0.3-8 inverse microns)")
    x = 1000.0 / lam  # inverse microns
    a = np.empty_like(x)
    b = np.empty_like(x)

    ir = x < 1.1
    xp = x[ir] ** 1.61
    a[ir], b[ir] = 0.574 * xp, -0.527 * xp

    opt = (x >= 1.1) & (x < 3.3)
    y = x[opt] - 1.82
    # np.polyval wants the highest power first
    a[opt] = np.polyval(_A_OPT[::-1], y)
    b[opt] = np.polyval(_B_OPT[::-1], y)

    uv = x >= 3.3
    xu = x[uv]
    fa = np.where(xu >= 5.9, -0.04473 * (xu - 5.9) ** 2 - 0.009779 * (xu - 5.9) ** 3, 0.0)
    fb = np.where(xu >= 5.9, 0.2130 * (xu - 5.9) ** 2 + 0.1207 * (xu - 5.9) ** 3, 0.0)
    a[uv] = 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa
    b[uv] = -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb
    return a + b / r_v


def reddening_vector(wavelengths_nm, *, r_v: float = 3.1) -> np.ndarray:
    """Change of each adjacent colour ``m_b - m_{b+1}`` per unit E(B-V), shape (B-1,), mag/mag.

    ``R_b - R_{b+1}`` with ``R = A_lambda / E(B-V) = r_v * A_lambda / A_V`` (CCM89).
    ``wavelengths_nm`` are the bands' effective wavelengths, at least two, strictly
    increasing (blue to red), so every component is positive where CCM89 decreases.
    """
    lam = np.asarray(wavelengths_nm, dtype=float)
    if lam.ndim != 1 or lam.size < 2:
        raise ValueError(f"wavelengths_nm must list at least two bands, got shape {lam.shape}")
    if not np.all(np.diff(lam) > 0):
        raise ValueError(f"wavelengths_nm must be strictly increasing (bands blue to red), got {lam.tolist()}")
    r = _check_r_v(r_v) * ccm89_a_lambda_over_a_v(lam, r_v=r_v)
    return r[:-1] - r[1:]
