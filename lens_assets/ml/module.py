"""The lens classifier as plain Lightning: runs without Dagster (the asset launches it as a job).

Inputs are PSF-matched shards in nanomaggies. The network sees
``asinh(image / s)`` with one noise scale ``s`` per cutout (the median noise over
its bands), so colours are kept where the signal is faint and bright cores are
compressed, with no min-max scaling. Augmentations preserve photometry: 90°
rotations, flips, sub-pixel shifts (bilinear), and extra noise drawn from the
variance map; nothing alters colours. The loss is BCE weighted by
``label_confidence``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from .backbones import create_backbone, first_conv, widen_first_conv

__all__ = ["LensClassifier", "asinh", "scale_input", "median_measured_variance", "augment", "observing_conditions",
           "FiLM", "colour_residual", "radial_residual", "radial_median_model", "colour_difference", "Float32Conv2d",
           "float32_first_conv", "deflector_shape", "elliptical_median_model", "elliptical_residual"]


def median_measured_variance(variance: torch.Tensor, start_dim: int) -> torch.Tensor:
    """Median of ``variance`` over the dimensions from ``start_dim`` on, counting only pixels with variance > 0.

    Padding (outside a cutout's footprint) and a missing band carry variance 0:
    counted, they would pull the median towards 0 and blow up the scaled image.
    A slice with no measured pixel gives 0.
    """
    v = variance.to(torch.float32).flatten(start_dim)
    v = torch.where(v > 0, v, torch.full_like(v, float("nan")))
    return torch.nan_to_num(v.nanmedian(dim=-1).values, nan=0.0)


_ASINH_LOG_ABOVE = 2.0**60  # beyond it a^2 nears float32's range; there asinh(a) = log(2a) to the last bit
_ASINH_LINEAR_BELOW = 2.0**-30  # below it asinh(a) = a to the last bit (and subnormal a^2 would flush to 0)


def asinh(x: torch.Tensor) -> torch.Tensor:
    """``torch.asinh(x)`` with a relative error below 2^-23 (float32), as torch's own, about 2x faster per value on a
    CPU, where torch evaluates asinh one element at a time while the operations here are vectorized
    (``bench_scoring.py``'s "input scaling, asinh" row).

    ``asinh(a) = log1p(a + a^2 / (1 + sqrt(1 + a^2)))`` for ``a = |x|`` (no cancellation near 0), ``log(2a)`` for
    ``a > 2^60`` and ``a`` for ``a < 2^-30``, with the sign of ``x`` (-0.0, ±inf and NaN as torch gives them).
    ``x`` is not modified. Half-precision inputs are evaluated in float32; on a GPU (one fused kernel there), for
    an input that requires a gradient (the work here is in place) and for other dtypes, ``torch.asinh``.
    """
    if x.requires_grad or not x.is_floating_point() or x.device.type != "cpu":
        return torch.asinh(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        return asinh(x.float()).to(x.dtype)
    a = x.abs()
    y = a * a
    root = y.add(1.0).sqrt_().add_(1.0)
    y.div_(root).add_(a).log1p_()
    del root
    torch.where(a < _ASINH_LINEAR_BELOW, a, y, out=y)  # exact zeros (padding) and subnormals, without a branch
    big = a > _ASINH_LOG_ABOVE
    if bool(big.any()):  # never for noise-scaled pixels
        y[big] = torch.log(a[big]) + math.log(2.0)
    return y.copysign_(x)


def scale_input(image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``asinh(image / s)`` with ``s`` the cutout's median per-pixel noise over all bands (measured pixels only)."""
    s = torch.sqrt(median_measured_variance(variance, 1).clamp_min(1e-20)).to(image.dtype)
    return asinh(image / s[:, None, None, None])


def colour_residual(image: torch.Tensor, variance: torch.Tensor, *, blue: int, red: int,
                    half_box_px: int = 3) -> torch.Tensor:
    """The scaled band difference of RingFinder (Gavazzi et al. 2014, ApJ 785, 144), one channel per cutout.

    ``blue - alpha * red`` with ``alpha`` the blue/red flux ratio of the central
    ``(2 half_box_px + 1)``-pixel box, so the deflector's light cancels where its colour
    is uniform and what is bluer than it (arcs, lensed images; also blue companions
    and star-forming knots) remains. Returned as ``asinh(residual / s)``, ``s`` the
    median noise of the difference (``var_blue + alpha^2 var_red``, measured pixels
    only), shape (n, 1, H, W). ``alpha`` is clipped to [0, 10]; a centre with no red
    flux gives 0 (the blue band itself). PSF-matched inputs make the difference
    meaningful: both bands share one PSF.
    """
    diff, var = colour_difference(image, variance, blue=blue, red=red, half_box_px=half_box_px)
    s = torch.sqrt(median_measured_variance(var[:, None], 1).clamp_min(1e-20))
    return asinh(diff / s[:, None, None])[:, None].to(image.dtype)


def colour_difference(image: torch.Tensor, variance: torch.Tensor, *, blue: int, red: int,
                      half_box_px: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``blue - alpha * red`` and its variance, (n, H, W) each, float32: :func:`colour_residual` before scaling."""
    c, h = image.shape[-1] // 2, half_box_px
    centre = (slice(None), slice(c - h, c + h + 1), slice(c - h, c + h + 1))
    b, r = image[:, blue].float(), image[:, red].float()
    fb, fr = b[centre].sum(dim=(1, 2)), r[centre].sum(dim=(1, 2))
    alpha = torch.where(fr > 0, fb / fr.clamp_min(1e-30), torch.zeros_like(fr)).clamp(0.0, 10.0)[:, None, None]
    return b - alpha * r, variance[:, blue].float() + alpha**2 * variance[:, red].float()


def radial_median_model(image: torch.Tensor, *, n_angles: int = 65) -> torch.Tensor:
    """Each band's median over position angle at each radius about the stamp's centre, as an image.

    The stamp is sampled on a polar grid (radii every half pixel to the edge, ``n_angles`` angles, bilinear),
    the median over angle is taken per radius (an odd count: torch's median of an even count is the lower
    middle value), and the profile is interpolated back to every pixel's radius.
    A round deflector is reproduced; arcs, which cover a minority of the angles at their radius, are not
    (a complete ring is, and stays in the model). Shape as ``image``.
    """
    n = image.shape[0]
    return _median_on_ellipses(image, torch.ones(n, device=image.device), torch.zeros(n, device=image.device),
                               n_angles)


def _median_on_ellipses(image: torch.Tensor, q: torch.Tensor, theta: torch.Tensor, n_angles: int) -> torch.Tensor:
    """Each band's median over ``n_angles`` points of each ellipse about the centre (axis ratio ``q``, major axis
    at ``theta``, per cutout; semi-major axes every half pixel to the edge; bilinear), interpolated back to every
    pixel's elliptical radius. Circles (q = 1, theta = 0) are the radial model."""
    n, b, h, w = image.shape
    r_steps = h  # half-pixel steps out to the edge
    a = (torch.arange(r_steps, dtype=torch.float32, device=image.device) + 0.5) / 2
    t = torch.arange(n_angles, dtype=torch.float32, device=image.device) * (2 * math.pi / n_angles)
    u = (a[:, None] * torch.cos(t)[None])[None]  # (1, r, t) along the major axis
    v = (a[:, None] * torch.sin(t)[None])[None] * q[:, None, None]  # (n, r, t) along the minor axis
    ct, st = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    grid = torch.stack([(u * ct - v * st) / (w / 2), (u * st + v * ct) / (h / 2)], -1)
    polar = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    profile = polar.median(dim=-1).values  # (n, b, r_steps); an odd count: torch's median of an even one is low
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=image.device) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float32, device=image.device) - (w - 1) / 2, indexing="ij")
    major = xx * ct + yy * st  # (n, h, w)
    minor = (-xx * st + yy * ct) / q[:, None, None]
    pos = (2 * torch.sqrt(major**2 + minor**2) - 0.5).clamp(0, r_steps - 1)
    i0 = pos.floor().long().clamp(max=r_steps - 2)
    frac = (pos - i0)[:, None]
    idx = i0.reshape(n, 1, h * w).expand(n, b, h * w)
    lower = profile.gather(-1, idx).reshape(n, b, h, w)
    upper = profile.gather(-1, idx + 1).reshape(n, b, h, w)
    return (lower * (1 - frac) + upper * frac).to(image.dtype)


def radial_residual(image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Every band less its radial median profile (:func:`radial_median_model`), as ``asinh(residual / s)`` with
    the cutout's noise scale ``s`` of :func:`scale_input`: the deflector's round light removed so that faint
    arcs on a bright galaxy stand out. One channel per band, shape as ``image``."""
    return scale_input(image.float() - radial_median_model(image.float()), variance).to(image.dtype)


class Float32Conv2d(torch.nn.Conv2d):
    """A Conv2d that leaves autocast: float32 input, weights and output (:func:`float32_first_conv`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def float32_first_conv(model: torch.nn.Module) -> None:
    """Run ``model``'s first convolution in float32 under autocast, in place (same parameters, same state dict).

    Under bf16 autocast the network input is rounded to bf16 (8 significant bits) at the first convolution: a
    relative step of 2^-8 on ``asinh(image / noise)``, which near a bright deflector, where faint arcs lie, is as
    large as the pixel noise (``benchmarks/bench_input_precision.py``). In float32 the stem forms its filters'
    differences of neighbouring pixels first, and what it passes on is rounded relative to those. The arc
    branch of an ``arc_attention`` member has its own first convolution, which still rounds its input.
    """
    conv = first_conv(model)
    if type(conv) is not torch.nn.Conv2d:
        raise ValueError(f"{type(model).__name__}'s first convolution is a {type(conv).__name__}, not a Conv2d")
    conv.__class__ = Float32Conv2d


def deflector_shape(image: torch.Tensor, *, iterations: int = 6, sigma0_px: float = 3.0):
    """Axis ratio ``q`` (n,) and major-axis angle ``theta`` (n,, radians from +x towards +y) of the light about the
    stamp's centre: adaptive moments (an elliptical Gaussian window matched to the light's own second moments,
    iterated from a round one of ``sigma0_px``) of the band sum, negative pixels counted as 0. The window's
    size is kept within [0.5 px, a quarter of the stamp]; a cutout with no light in its window stays round."""
    n, _, h, w = image.shape
    light = image.float().sum(dim=1).clamp_min(0.0)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=image.device) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float32, device=image.device) - (w - 1) / 2, indexing="ij")
    cov = torch.eye(2, device=image.device).expand(n, 2, 2) * sigma0_px**2
    lo, hi = 0.25, (min(h, w) / 4) ** 2
    for _ in range(iterations):
        inv = torch.linalg.inv(cov)
        d2 = (inv[:, 0, 0, None, None] * xx**2 + 2 * inv[:, 0, 1, None, None] * xx * yy
              + inv[:, 1, 1, None, None] * yy**2)
        wl = light * torch.exp(-0.5 * d2)
        total = wl.sum(dim=(1, 2))
        has = total > 0
        norm = total.clamp_min(1e-30)
        mxx, myy, mxy = ((wl * t).sum(dim=(1, 2)) / norm for t in (xx * xx, yy * yy, xx * yy))
        # the light's own second moments are twice those of the product with a matched Gaussian window
        new = 2 * torch.stack([torch.stack([mxx, mxy], -1), torch.stack([mxy, myy], -1)], -2)
        evals, evecs = torch.linalg.eigh(new)
        new = evecs @ torch.diag_embed(evals.clamp(lo, hi)) @ evecs.transpose(-1, -2)
        cov = torch.where(has[:, None, None], new, cov)
    evals, evecs = torch.linalg.eigh(cov)  # ascending: the major axis is the second
    q = torch.sqrt(evals[:, 0] / evals[:, 1])
    theta = torch.atan2(evecs[:, 1, 1], evecs[:, 0, 1])
    return q, theta


def elliptical_median_model(image: torch.Tensor, *, n_angles: int = 65, min_q: float = 0.2) -> torch.Tensor:
    """Each band's median over eccentric angle on each ellipse about the stamp's centre, as an image.

    :func:`radial_median_model` on ellipses of the deflector's shape (:func:`deflector_shape`, axis ratio at
    least ``min_q``) instead of circles: semi-major axes every half pixel to the edge, ``n_angles`` points on
    each (bilinear), the median per ellipse, interpolated back to every pixel's elliptical radius. An elliptical
    deflector is reproduced, where circles leave a quadrupole residual that an arc-finder may take for arcs;
    arcs, which cover a minority of their ellipse, are not. With a round deflector it is the radial model.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):  # the shape's matmuls stay float32
        q, theta = deflector_shape(image.float())
        return _median_on_ellipses(image, q.clamp(min_q, 1.0), theta, n_angles)


def elliptical_residual(image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Every band less its elliptical median model (:func:`elliptical_median_model`), as ``asinh(residual / s)``
    with the cutout's noise scale ``s`` of :func:`scale_input`. One channel per band, shape as ``image``."""
    return scale_input(image.float() - elliptical_median_model(image.float()), variance).to(image.dtype)


def observing_conditions(variance: torch.Tensor, fwhm_before: torch.Tensor, band_flags: torch.Tensor) -> torch.Tensor:
    """Per-cutout conditions (n, 3 * bands): PSF FWHM before matching (arcsec), log10 of the median per-pixel
    noise (nanomaggies; from the variance map of the shard) and 1 for a present band, 0 for a missing one.

    A missing band (``band_flags`` bit 1) has its FWHM and noise set to 0, so only its flag speaks.
    """
    present = ((band_flags.to(torch.int64) & 1) == 0).to(torch.float32)
    noise = torch.sqrt(median_measured_variance(variance, 2).clamp_min(1e-12))
    log_noise = torch.log10(noise) * present
    return torch.cat([fwhm_before.to(torch.float32) * present, log_noise, present], dim=1)


class FiLM(torch.nn.Module):
    """Per-channel ``features * (1 + gamma(c)) + beta(c)`` from conditions ``c``; zero-initialized output layer."""

    def __init__(self, n_conditions: int, n_features: int, hidden: int = 64):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(n_conditions, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, 2 * n_features))
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.mlp(conditions.to(features.dtype)).chunk(2, dim=1)
        return features * (1 + gamma) + beta


class TangentialAttention(torch.nn.Module):
    """Arc-aware attention: self-attention along the tangential direction about the stamp's centre.

    The network input is resampled onto a polar grid about the centre (``n_radii`` radii out to the stamp's edge,
    ``n_angles`` angles; bilinear), where an arc about the deflector is a run along the angle axis at one radius. A
    small convolution (circular along the angle) embeds it; multi-head self-attention then runs over the angles of
    each radius separately (tokens are angles), with a learned bias per head for each angular separation, so each
    position sees the whole circle at its radius — an arc's extent, a counter-image opposite, a complete ring — and
    the branch is invariant to rotations about the centre by multiples of the angular step (so to 90° rotations;
    mirror images are left to the flips of training). Mean and max over angle, per radius, feed a linear layer that
    gives a logit added to the backbone's; it starts at zero, so a member starts as the plain one.
    """

    def __init__(self, in_chans: int, *, dim: int = 32, heads: int = 4, n_radii: int = 16, n_angles: int = 32):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        self.n_radii, self.n_angles, self.dim, self.heads = n_radii, n_angles, dim, heads
        self.embed = torch.nn.Conv2d(in_chans, dim, kernel_size=3, padding=0)
        # attention written out with matmuls: thousands of 32-token sequences, where the CPU's fused
        # scaled-dot-product kernel was 10x slower than two batched matmuls in the backward pass
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        # by angular separation in steps, 0 .. n_angles / 2, the same either way round
        self.separation_bias = torch.nn.Parameter(torch.zeros(heads, n_angles // 2 + 1))
        ij = torch.arange(n_angles)
        d = (ij[None, :] - ij[:, None]) % n_angles
        self.register_buffer("separation", torch.minimum(d, n_angles - d), persistent=False)
        self.head = torch.nn.Linear(2 * dim * n_radii, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def polar(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (n, c, h, w) on the polar grid: (n, c, n_radii, n_angles), radius along dim 2."""
        import math

        n, _, h, w = x.shape
        r = (torch.arange(self.n_radii, dtype=torch.float32, device=x.device) + 0.5) / self.n_radii  # of the edge
        t = torch.arange(self.n_angles, dtype=torch.float32, device=x.device) * (2 * math.pi / self.n_angles)
        grid = torch.stack([r[:, None] * torch.cos(t)[None], r[:, None] * torch.sin(t)[None]], -1)
        return F.grid_sample(x.float(), grid[None].expand(n, -1, -1, -1).to(x.device), mode="bilinear",
                             padding_mode="zeros", align_corners=False).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.polar(x.contiguous())
        p = F.pad(p, (1, 1, 0, 0), mode="circular")  # the angle wraps round
        p = F.pad(p, (0, 0, 1, 1), mode="replicate")
        e = F.gelu(self.embed(p))  # (n, dim, radii, angles)
        n = e.shape[0]
        tokens = e.permute(0, 2, 3, 1).reshape(n * self.n_radii, self.n_angles, self.dim)
        m, j = tokens.shape[:2]
        q, k, v = (t.reshape(m, j, self.heads, -1).transpose(1, 2) for t in self.qkv(tokens).chunk(3, dim=-1))
        bias = self.separation_bias[:, self.separation].to(q.dtype)  # (heads, angles, angles)
        w = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + bias, dim=-1)
        att = self.proj((w @ v).transpose(1, 2).reshape(m, j, self.dim))
        tokens = self.norm(tokens + att).reshape(n, self.n_radii, self.n_angles, self.dim)
        pooled = torch.cat([tokens.mean(dim=2), tokens.amax(dim=2)], dim=-1)  # (n, radii, 2 dim)
        return self.head(pooled.flatten(1)).squeeze(1)


LENS_PARAMETERS = ("theta_e_px", "e1", "e2", "gamma1", "gamma2", "source_x_px", "source_y_px", "source_sigma_px")


def lens_parameters(raw: torch.Tensor) -> torch.Tensor:
    """The physics head's raw outputs (n, 8) as an SIE + shear lens and a Gaussian source in pixel units
    (:data:`LENS_PARAMETERS`): theta_E above 0.5 px, |e1|, |e2| < 0.4 and |gamma1|, |gamma2| < 0.15, the source
    within theta_E of the centre on each axis, its Gaussian sigma above 0.3 px."""
    te = 0.5 + F.softplus(raw[:, 0] + 1.0)
    e1, e2 = 0.4 * torch.tanh(raw[:, 1]), 0.4 * torch.tanh(raw[:, 2])
    g1, g2 = 0.15 * torch.tanh(raw[:, 3]), 0.15 * torch.tanh(raw[:, 4])
    sx, sy = te * torch.tanh(raw[:, 5]), te * torch.tanh(raw[:, 6])
    sig = 0.3 + F.softplus(raw[:, 7])
    return torch.stack([te, e1, e2, g1, g2, sx, sy, sig], dim=1)


def lensed_template(params: torch.Tensor, size: int, psf_sigma_px: float) -> torch.Tensor:
    """Unit-amplitude lensed light (n, size, size) of :func:`lens_parameters`: a circular Gaussian source seen
    through the SIE + shear (caustics' deflections, ``ml/torch_render.ray_trace``) at pixel centres, convolved
    with a Gaussian PSF of ``psf_sigma_px`` (the shards' matched PSF). Differentiable in every parameter."""
    from .torch_render import ray_trace

    c = (size - 1) / 2.0
    ax = torch.arange(size, dtype=params.dtype, device=params.device) - c
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    zeros = torch.zeros_like(params[:, 0])
    lens = torch.stack([params[:, 0], params[:, 1], params[:, 2], zeros, zeros, params[:, 3], params[:, 4]], dim=1)
    bx, by = ray_trace(lens, xx, yy)
    sx, sy, sig = (params[:, i, None, None] for i in (5, 6, 7))
    src = torch.exp(-((bx - sx) ** 2 + (by - sy) ** 2) / (2 * sig**2))
    r = max(1, int(math.ceil(4 * psf_sigma_px)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=params.dtype, device=params.device) / psf_sigma_px) ** 2)
    k = k / k.sum()
    out = F.conv2d(src[:, None], k[None, None, :, None], padding=(r, 0))
    return F.conv2d(out, k[None, None, None, :], padding=(0, r))[:, 0]


def physics_consistency(image: torch.Tensor, variance: torch.Tensor, params: torch.Tensor,
                        psf_sigma_px: float) -> torch.Tensor:
    """Per-cutout reduced chi-square (n,) of the lens-light-subtracted cutout against the lensed light that
    ``params`` imply: each band's amplitude of :func:`lensed_template` is its inverse-variance least-squares
    fit (at least 0), the deflector's light the radial median model (:func:`radial_median_model`). In noise
    units: about 1 where the implied arcs account for what the deflector leaves."""
    resid = image.float() - radial_median_model(image.float())
    w = torch.where(variance > 0, 1.0 / variance.float().clamp_min(1e-20),
                    torch.zeros_like(variance, dtype=torch.float32))
    t = lensed_template(params.float(), image.shape[-1], psf_sigma_px)[:, None]  # (n, 1, H, W)
    amp = ((w * resid * t).sum(dim=(2, 3)) / (w * t * t).sum(dim=(2, 3)).clamp_min(1e-20)).clamp_min(0.0)
    chi2 = (w * (resid - amp[..., None, None] * t) ** 2).sum(dim=(1, 2, 3))
    return chi2 / (w > 0).sum(dim=(1, 2, 3)).clamp_min(1)


def augment(image: torch.Tensor, variance: torch.Tensor, *, generator: torch.Generator | None = None,
            max_shift_px: float = 0.5, max_extra_noise: float = 0.5, zoom_max: float = 1.0):
    """Photometry-preserving augmentation of a batch (same transform for every band of a cutout).

    A 90° turn and a flip, a sub-pixel shift, and extra noise from the variance. With ``zoom_max`` > 1 each
    cutout is also magnified about its centre by a factor drawn log-uniformly from [1, ``zoom_max``]: angles
    (the Einstein radius, the deflector's size, the PSF) grow by the factor, surface brightness is kept (a
    bilinear resampling), and the noise that the resampling smoothed away is added back from the variance, so
    each pixel's noise again matches its variance."""
    b = image.shape[0]
    dev = image.device
    if zoom_max < 1.0:
        raise ValueError(f"zoom_max must be >= 1, got {zoom_max}")
    k = int(torch.randint(0, 4, (1,), generator=generator))
    image, variance = torch.rot90(image, k, dims=(2, 3)), torch.rot90(variance, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        image, variance = image.flip(3), variance.flip(3)
    h, w = image.shape[-2:]
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1).to(dev) * max_shift_px
    zoom = (torch.exp(torch.rand(b, generator=generator) * math.log(zoom_max)).to(dev) if zoom_max > 1.0
            else torch.ones(b, device=dev))  # no draw at 1: the default's random stream is as it was
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom  # output coordinates map to input ones 1/zoom as far out
    theta[:, 0, 2] = shift[:, 0] * 2 / w
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    variance = F.grid_sample(variance, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if zoom_max > 1.0:  # white noise resampled bilinearly keeps sum(w^2) of its variance at each pixel
        image = image + _resampling_noise(grid, variance, generator)
    amp = (torch.rand(b, 1, 1, 1, generator=generator) * max_extra_noise).to(dev)
    noise = torch.randn(image.shape, generator=generator).to(dev)
    image = image + amp * noise * variance.clamp_min(0).sqrt()
    return image, variance * (1 + amp**2)


def _resampling_noise(grid: torch.Tensor, variance: torch.Tensor, generator) -> torch.Tensor:
    """Noise of variance ``variance * (1 - sum(w^2))`` per pixel, ``w`` the bilinear weights ``grid`` samples with
    (align_corners=False): what interpolating white noise took out of each pixel's variance."""
    h, w = variance.shape[-2:]
    x = ((grid[..., 0] + 1) * w - 1) / 2  # input pixel coordinates, (n, H, W)
    y = ((grid[..., 1] + 1) * h - 1) / 2
    fx, fy = x - torch.floor(x), y - torch.floor(y)
    kept = ((1 - fx) ** 2 + fx**2) * ((1 - fy) ** 2 + fy**2)
    noise = torch.randn(variance.shape, generator=generator).to(variance.device)
    return noise * (variance.clamp_min(0) * (1 - kept[:, None])).sqrt()


class LensClassifier(L.LightningModule):
    """A timm backbone with one logit: P(lens) = sigmoid(logit)."""

    def __init__(self, *, backbone: str = "resnet10t", in_chans: int = 5, img_size: int = 64, lr: float = 1e-3,
                 weight_decay: float = 0.05, max_epochs: int = 10, augment: bool = True, film: bool = False,
                 residual_bands: tuple[int, int] | None = None, radial_residual: bool = False,
                 head_dropout: float = 0.0, upsample: int = 1, arc_attention: bool = False,
                 physics_weight: float = 0.0, physics_warmup_epochs: int = 2, psf_fwhm_px: float = 4.0,
                 weights_path: str | None = None, zoom_max: float = 1.0, float32_stem: bool = False,
                 elliptical_residual: bool = False, ema_epochs: float = 0.0):
        super().__init__()
        if zoom_max < 1.0:
            raise ValueError(f"zoom_max must be >= 1, got {zoom_max}")
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}")
        if upsample not in (1, 2, 3, 4):
            raise ValueError(f"upsample must be 1, 2, 3 or 4, got {upsample}")
        if ema_epochs < 0:
            raise ValueError(f"ema_epochs must be >= 0 (0: no weight average), got {ema_epochs}")
        if radial_residual and elliptical_residual:
            raise ValueError("radial_residual and elliptical_residual are two models of the same deflector light: "
                             "choose one")
        if residual_bands is not None:
            blue, red = (int(i) for i in residual_bands)
            if not (0 <= blue < in_chans and 0 <= red < in_chans and blue != red):
                raise ValueError(f"residual_bands {tuple(residual_bands)} must be two different band indices "
                                 f"below in_chans={in_chans}")
            residual_bands = (blue, red)
        # weights_path only initializes a new run: a checkpoint holds the weights, and a scorer need not see the file
        self.save_hyperparameters(ignore=["weights_path"])
        # the colour residual (colour_residual) is one more input channel after the bands, the radial (or the
        # elliptical) residual one per band after that. Initial weights are weights for the bands: loaded as they
        # are, with zero-weight channels added after them for the residuals
        extra = (residual_bands is not None) + (in_chans if radial_residual or elliptical_residual else 0)
        widen = extra > 0 and bool(weights_path)
        self.net = create_backbone(backbone, in_chans=in_chans + (0 if widen else extra),
                                   img_size=img_size * upsample, num_classes=1, weights_path=weights_path or None)
        if widen:
            widen_first_conv(self.net, extra)
        if float32_stem:
            float32_first_conv(self.net)
        self.film = FiLM(3 * in_chans, self.net.get_classifier().in_features) if film else None
        self.arc = TangentialAttention(in_chans + extra) if arc_attention else None
        # the physics head regresses an SIE + shear lens and a source (lens_parameters) from the pooled features
        self.lens_head = (torch.nn.Linear(self.net.get_classifier().in_features, len(LENS_PARAMETERS))
                          if physics_weight > 0 else None)
        self.physics_failures = 0
        # an exponential moving average of the weights that classify (backbone, FiLM, arc branch), which validation
        # and scoring use (eval mode) while training steps the live weights; its own copies, in the state dict
        self.ema = None
        if ema_epochs > 0:
            import copy

            self.ema = copy.deepcopy(torch.nn.ModuleDict(self._classifying_modules()))
            self.ema.requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))
        self.memory_format = torch.contiguous_format  # channels_last is set by train() and the scorer
        self._val_scores: list = []
        self._val_labels: list = []

    def _classifying_modules(self) -> dict:
        """The live modules a logit is made of: the backbone, and FiLM and the arc branch where the member has them."""
        parts = {"net": self.net}
        if self.film is not None:
            parts["film"] = self.film
        if self.arc is not None:
            parts["arc"] = self.arc
        return parts

    def _scoring_modules(self):
        """(backbone, FiLM or None, arc branch or None) that make this forward's logit: the weight average's in eval
        mode (validation, scoring) when the member keeps one, the live ones otherwise."""
        parts = self.ema if self.ema is not None and not self.training else self._classifying_modules()
        return parts["net"], (parts["film"] if "film" in parts else None), (parts["arc"] if "arc" in parts else None)

    @torch.no_grad()
    def update_weight_average(self, steps_per_epoch: int) -> float:
        """One step of the weights' exponential moving average, with decay ``1 - 1 / (ema_epochs * steps_per_epoch)``
        (a memory of ``ema_epochs`` epochs), at most ``k / (k + 1)`` after ``k`` updates: until the memory is
        reached the average is the plain mean of the weights after every step so far (the first update copies
        them; the initial weights never count). Batch-norm statistics are averaged alike; counters are copied.
        Returns the decay used."""
        k = int(self.ema_updates)
        decay = min(1.0 - 1.0 / max(1.0, float(self.hparams.ema_epochs) * max(1, steps_per_epoch)), k / (k + 1))
        live = torch.nn.ModuleDict(self._classifying_modules()).state_dict()
        avg = self.ema.state_dict(keep_vars=True)
        floats = [n for n, t in avg.items() if t.is_floating_point()]
        torch._foreach_lerp_([avg[n].data for n in floats], [live[n].detach() for n in floats], 1.0 - decay)
        for n, t in avg.items():
            if not t.is_floating_point():
                t.data.copy_(live[n])
        self.ema_updates += 1
        return decay

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.update_weight_average(int(self.trainer.num_training_batches))

    @property
    def needs_conditions(self) -> bool:
        return self.film is not None

    @property
    def head_dropout(self) -> float:
        return float(self.hparams.get("head_dropout", 0.0))

    def use_channels_last(self) -> "LensClassifier":
        """channels_last weights and inputs, for convolutional backbones (a ViT is left as it is)."""
        from .backbones import get_spec

        if get_spec(self.hparams.backbone).channels_last:
            self.memory_format = torch.channels_last
            self.to(memory_format=torch.channels_last)
        return self

    def network_input(self, image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: the scaled bands, then the colour and radial residual channels if enabled,
        upsampled bilinearly ``upsample`` times (arcs a few pixels wide keep more of the backbone's feature map
        before its stride-32 downsampling)."""
        x = scale_input(image, variance)
        bands = self.hparams.get("residual_bands")
        if bands is not None:
            x = torch.cat([x, colour_residual(image, variance, blue=bands[0], red=bands[1])], dim=1)
        if self.hparams.get("radial_residual"):
            x = torch.cat([x, radial_residual(image, variance)], dim=1)
        if self.hparams.get("elliptical_residual"):
            x = torch.cat([x, elliptical_residual(image, variance)], dim=1)
        up = int(self.hparams.get("upsample", 1))
        if up > 1:
            x = F.interpolate(x, scale_factor=up, mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, image: torch.Tensor, variance: torch.Tensor, fwhm_before: torch.Tensor | None = None,
                band_flags: torch.Tensor | None = None) -> torch.Tensor:
        return self._outputs(image, variance, fwhm_before, band_flags, dropout=self.training)[0]

    def _outputs(self, image, variance, fwhm_before=None, band_flags=None, *, dropout: bool,
                 features: bool = False):
        """(logit, pooled features or None, arc-attention logit or 0) of a batch: the one path that the forward
        pass, MC dropout and the physics loss share. Without FiLM, head dropout or ``features`` the backbone's
        own head runs (timm's forward)."""
        x = self.network_input(image, variance)
        net, film, arc_branch = self._scoring_modules()
        arc = 0.0 if arc_branch is None else arc_branch(x)
        if film is None and not self.head_dropout and not features:
            return net(x).squeeze(1) + arc, None, arc
        pooled = self._pooled(x, variance, fwhm_before, band_flags)
        return self.classify(pooled, dropout=dropout) + arc, pooled, arc

    def _pooled(self, x, variance, fwhm_before, band_flags) -> torch.Tensor:
        """The backbone's pooled features of the network input ``x`` (FiLM-conditioned for a FiLM member)."""
        net, film, _ = self._scoring_modules()
        features = net.forward_head(net.forward_features(x), pre_logits=True)
        if film is None:
            return features
        if fwhm_before is None or band_flags is None:
            raise ValueError(f"a FiLM member ({self.hparams.backbone}) needs fwhm_before and band_flags with the "
                             "images (the shards' per-row PSF table)")
        return film(features, observing_conditions(variance, fwhm_before, band_flags))

    def classify(self, features: torch.Tensor, *, dropout: bool) -> torch.Tensor:
        """Logits of pooled ``features``; ``dropout`` drops features at ``head_dropout`` first (training, and
        the samples of :meth:`mc_dropout_logits`)."""
        if dropout and self.head_dropout:
            features = F.dropout(features, p=self.head_dropout, training=True)
        return self._scoring_modules()[0].get_classifier()(features).squeeze(1)

    def mc_dropout_logits(self, image: torch.Tensor, variance: torch.Tensor, fwhm_before=None, band_flags=None, *,
                          n_samples: int = 16, generator: torch.Generator | None = None):
        """The deterministic logit (n,) and ``n_samples`` Monte Carlo dropout logits (n_samples, n).

        MC dropout (Gal & Ghahramani 2016) over the head: the backbone runs once, in eval mode (batch norm
        with its running statistics), and its pooled features are dropped at the rate the member was trained
        with, ``n_samples`` times. The samples' spread is the member's epistemic uncertainty per cutout; a
        member trained without head dropout has none to give (an error says so).
        """
        if not self.head_dropout:
            raise ValueError(f"member {self.hparams.backbone} was trained without head dropout (head_dropout = 0): "
                             "MC dropout needs a member trained with it")
        deterministic, features, arc = self._outputs(image, variance, fwhm_before, band_flags, dropout=False,
                                                     features=True)
        keep = 1.0 - self.head_dropout
        draws = torch.rand((n_samples, *features.shape), generator=generator).to(features.device) < keep
        classifier = self._scoring_modules()[0].get_classifier()
        samples = classifier(features[None] * draws.to(features.dtype) / keep).squeeze(-1) + arc
        return deterministic, samples

    def _forward_batch(self, batch, image=None, variance=None):
        image = batch["image"] if image is None else image
        variance = batch["variance"] if variance is None else variance
        if self.film is None:
            return self(image, variance)
        return self(image, variance, batch["fwhm_before"], batch["band_flags"])

    def _loss(self, batch, logits):
        return F.binary_cross_entropy_with_logits(logits, batch["label"], weight=batch["label_confidence"])

    def physics_curriculum(self) -> float:
        """The physics term's weight this epoch: from 0 up to ``physics_weight`` over the warm-up epochs."""
        warm = max(1, int(self.hparams.get("physics_warmup_epochs", 2)))
        return float(self.hparams.get("physics_weight", 0.0)) * min(1.0, self.current_epoch / warm)

    def training_step(self, batch, batch_idx):
        image, variance = batch["image"], batch["variance"]
        if self.hparams.augment:
            image, variance = augment(image, variance, zoom_max=float(self.hparams.get("zoom_max", 1.0)))
        if self.lens_head is None:
            loss = self._loss(batch, self._forward_batch(batch, image, variance))
        else:
            loss = self._loss_with_physics(batch, image, variance)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(image))
        return loss

    def _loss_with_physics(self, batch, image, variance):
        """BCE plus the gated physics-consistency term: the batch mean of each cutout's :func:`physics_consistency`
        of the lens its features imply times its predicted lens probability (detached: the gate does not teach the
        classifier to avoid the term), times the curriculum weight (skipped while that is 0). A batch whose term is
        not finite is counted (``physics_failures``) and trains on BCE alone; it is never replaced by a constant."""
        logits, features, _ = self._outputs(image, variance, batch.get("fwhm_before"), batch.get("band_flags"),
                                            dropout=True, features=True)
        loss = self._loss(batch, logits)
        weight = self.physics_curriculum()
        n = len(image)
        self.log("physics_weight_now", weight, on_step=False, on_epoch=True, batch_size=n)
        if weight <= 0:  # the curriculum's first epochs: the term is neither computed nor trained on
            return loss
        params = lens_parameters(self.lens_head(features.float()))
        consistency = physics_consistency(image, variance, params, float(self.hparams.psf_fwhm_px) / 2.3548)
        gate = torch.sigmoid(logits.detach().float())
        term = (gate * consistency).mean()  # a confident non-lens adds next to nothing
        self.log("physics_gate_mean", gate.mean(), on_step=False, on_epoch=True, batch_size=n)
        if not torch.isfinite(term):
            self.physics_failures += 1
            self.log("physics_failures", float(self.physics_failures), on_step=False, on_epoch=True, batch_size=n,
                     reduce_fx="max")
            return loss
        self.log("physics_consistency", term, on_step=False, on_epoch=True, batch_size=n)
        self.log("physics_failures", float(self.physics_failures), on_step=False, on_epoch=True, batch_size=n,
                 reduce_fx="max")
        return loss + weight * term

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["physics_failures"] = int(self.physics_failures)  # a run's total survives a resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.physics_failures = int(checkpoint.get("physics_failures", 0))

    def validation_step(self, batch, batch_idx):
        logits = self._forward_batch(batch)
        self.log("val_loss", self._loss(batch, logits), prog_bar=True, batch_size=len(logits))
        self._val_scores.append(logits.detach().float().cpu())
        self._val_labels.append(batch["label"].detach().cpu())

    def on_validation_epoch_end(self):
        from sklearn.metrics import roc_auc_score

        if not self._val_scores:
            return
        s, y = torch.cat(self._val_scores).numpy(), torch.cat(self._val_labels).numpy()
        self._val_scores.clear()
        self._val_labels.clear()
        auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else 0.5
        self.log("val_auroc", auroc, prog_bar=True)

    def configure_optimizers(self):
        # the weight average's copies are not trained (requires_grad False): not the optimizer's
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        # cosine decay to 0 over this run's epochs. A LambdaLR keeps only its epoch in a checkpoint (not the
        # length, as CosineAnnealingLR does), so a run resumed with more epochs decays over the new length
        # instead of climbing back up the cosine after the first start's end
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_train_start(self):
        for config in self.trainer.lr_scheduler_configs:  # restored from a checkpoint when resuming
            self.apply_schedule(config.scheduler)

    @staticmethod
    def apply_schedule(sched) -> None:
        """Set the optimizer's learning rates to the schedule's at its current epoch: a resumed run restores the
        optimizer with the rate of its first start's schedule, which a longer run must not keep for an epoch."""
        for group, lr in zip(sched.optimizer.param_groups, [f(sched.last_epoch) * b for f, b in
                                                             zip(sched.lr_lambdas, sched.base_lrs)]):
            group["lr"] = lr

    def lr_factor(self, epoch: int) -> float:
        """Learning rate over its initial value after ``epoch`` epochs: 0.5 (1 + cos(pi epoch / max_epochs))."""
        import math

        total = max(1, self.hparams.max_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, total) / total))
