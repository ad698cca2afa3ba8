"""PSF measurement and homogenization (numpy/scipy/photutils only).

* :func:`psf_kernel` draws pixel-integrated Gaussian or Moffat PSF images.
* :func:`measure_fwhm_px` measures a PSF image's FWHM.
* :func:`matching_kernels` makes photutils matching kernels (``make_kernel``'s
  Fourier ratio with a window) for a whole batch of source PSFs at once.
* :func:`match_psf` convolves one image to a target PSF (docs/design.md, style example 1);
  :func:`homogenize` does it for (objects, bands) batches with variance propagation.

All convolutions are linear (zero-padded FFT): nothing wraps around the edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

__all__ = ["psf_kernel", "measure_fwhm_px", "gaussian_sigma_kernel", "matching_kernels", "fft_convolve",
           "match_psf", "homogenize", "HomogenizedBatch", "default_window", "target_fwhm_arcsec",
           "FWHM_PER_SIGMA"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_PIXEL_FWHM2 = FWHM_PER_SIGMA**2 / 12.0  # a 1-px box has variance 1/12
FFT_CHUNK = 64  # planes per batched FFT


PSF_PROFILES = ("gaussian", "moffat", "core_wings")
CORE_WINGS_FRACTION = 0.15  # share of the light in the wings of a core_wings PSF
CORE_WINGS_SCALE = 2.0  # wings FWHM / core FWHM


def _default_size(profile: str, fwhm_px: float, max_size: int | None) -> int:
    """``psf_kernel``'s default side: 3 FWHM (Gaussian) or 5 FWHM (Moffat) each side, at least 11, odd, at most
    ``max_size``."""
    half = math.ceil((3.0 if profile == "gaussian" else 5.0) * fwhm_px)
    size = max(11, 2 * half + 1)
    if max_size is not None:
        size = min(size, max_size if max_size % 2 else max_size - 1)
    return size


def _moffat_pixels(fwhm_px: float, beta: float, size: int, oversample: int) -> np.ndarray:
    """A Moffat profile summed over ``oversample`` x ``oversample`` samples in each pixel of a ``size`` (odd) square
    centred on its middle pixel, unnormalized. The image is symmetric under both flips, so the samples of one
    quadrant of pixels (the middle row and column included) are drawn and mirrored: a quarter of the transcendental
    work, the same sums to round-off."""
    half = size // 2
    sub = (np.arange((half + 1) * oversample) + 0.5) / oversample - half - 0.5  # pixels 0..half, samples in order
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    a = sub * sub / (alpha * alpha)
    fine = np.exp(np.log1p(a[:, None] + a[None, :]) * -beta)  # (1 + r^2 / alpha^2)^-beta
    quad = fine.reshape(half + 1, oversample, half + 1, oversample).sum(axis=(1, 3))
    rows = np.concatenate([quad, quad[-2::-1]], axis=0)
    return np.concatenate([rows, rows[:, -2::-1]], axis=1)


def psf_kernel(profile: str, fwhm_px: float, *, moffat_beta: float = 3.0, size: int | None = None,
               max_size: int | None = None, oversample: int = 3) -> np.ndarray:
    """A normalized, pixel-integrated Gaussian, Moffat or core-plus-wings PSF image of odd size.

    The default size covers 3 FWHM (Gaussian) or 5 FWHM (Moffat) on each side,
    at least 11 px and at most ``max_size``. Gaussian pixels are integrated
    exactly (erf); Moffat pixels on an ``oversample`` x ``oversample`` grid.
    ``core_wings`` is a Gaussian core of ``fwhm_px`` holding ``1 - CORE_WINGS_FRACTION``
    of the light plus Moffat wings (``moffat_beta``) of ``CORE_WINGS_SCALE`` times that FWHM.
    """
    if profile not in PSF_PROFILES:
        raise ValueError(f"psf profile {profile!r} is not one of {list(PSF_PROFILES)}")
    if fwhm_px <= 0:
        raise ValueError(f"psf FWHM must be positive, got {fwhm_px} px")
    if size is None:  # core_wings: as large as its Moffat wings' image
        size = (_default_size("moffat", CORE_WINGS_SCALE * fwhm_px, max_size) if profile == "core_wings"
                else _default_size(profile, fwhm_px, max_size))
    if size % 2 == 0 or size < 1:
        raise ValueError(f"psf size must be odd and positive, got {size}")
    if profile == "core_wings":
        core = psf_kernel("gaussian", fwhm_px, size=size)
        wings = psf_kernel("moffat", CORE_WINGS_SCALE * fwhm_px, moffat_beta=moffat_beta, size=size,
                           oversample=oversample)
        kernel = (1.0 - CORE_WINGS_FRACTION) * core + CORE_WINGS_FRACTION * wings
        return kernel / kernel.sum()
    half = size // 2
    if profile == "gaussian":  # separable: exact pixel integrals from erf
        from scipy.special import erf

        sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        edges = (np.arange(size + 1) - half - 0.5) / (math.sqrt(2.0) * sigma)
        line = np.diff(erf(edges))
        kernel = np.outer(line, line)
    else:
        kernel = _moffat_pixels(fwhm_px, moffat_beta, size, oversample)
    return kernel / kernel.sum()


def measure_fwhm_px(psf: np.ndarray, *, upsample: int = 8) -> float:
    """FWHM in pixels of a centred, pixel-integrated PSF image.

    The image is upsampled with a cubic spline; the area ``A`` at or above half
    the peak gives ``FWHM = 2 sqrt(A / pi)`` (exact for any circular profile),
    and the pixel response is removed in quadrature (exact for a Gaussian core:
    a 1-px box adds variance 1/12). Within 1% for Gaussians of 2-6 px FWHM and
    2% for Moffat profiles of 3 px or more.
    """
    psf = np.asarray(psf, dtype=float)
    if psf.ndim != 2 or not np.isfinite(psf).all() or psf.max() <= 0:
        raise ValueError(f"PSF image must be a finite 2-D array with a positive peak; got shape {psf.shape}")
    fine = ndimage.zoom(_core(psf), upsample, order=3, grid_mode=True, mode="grid-constant")
    area_px = np.count_nonzero(fine >= 0.5 * fine.max()) / upsample**2
    observed2 = 4.0 * area_px / math.pi
    return math.sqrt(max(observed2 - _PIXEL_FWHM2, 0.0))


_CORE_LEVEL = 0.1  # of the peak: every pixel at or above it is kept by _core, with _CORE_MARGIN_PX around them
_CORE_MARGIN_PX = 4


def _core(psf: np.ndarray) -> np.ndarray:
    """The part of ``psf`` that decides its half-maximum area: the bounding box of the pixels at or above a tenth
    of the peak, widened by 4 px on each side (within the image). Outside it every pixel is below a tenth of the
    peak and 4 px or more from any above it, so the cubic spline there stays far below half the peak; and the
    spline's response to the cut falls by about 0.27 per pixel, so for a PSF smooth beyond its core (a model, a
    star's stamp with its noise) the FWHM is the whole image's (tests hold it to 1e-3; smooth models agree
    exactly). Sharp structure beyond the box moves it more: a checkerboard of a tenth of the peak in the wings,
    by 4e-3, still far inside the method's 1-2%. For the shards' check (``matched_psf_fwhm``) it zooms a square
    of about 20 px instead of the matched PSF's 2 * kernel + 1."""
    keep = psf >= _CORE_LEVEL * psf.max()
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    m = _CORE_MARGIN_PX
    return psf[max(rows[0] - m, 0):rows[-1] + m + 1, max(cols[0] - m, 0):cols[-1] + m + 1]


def target_fwhm_arcsec(bands_fwhm_arcsec: Sequence[float], seeing_scatter: float, *, percentile: float = 90.0) -> float:
    """Default target: the broadest band's nominal FWHM at a high percentile of a lognormal seeing scatter."""
    from scipy.stats import norm

    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    return float(max(bands_fwhm_arcsec) * math.exp(norm.ppf(percentile / 100.0) * seeing_scatter))


def gaussian_sigma_kernel(source_sigma_px: float, target_sigma_px: float) -> float:
    """Sigma of the Gaussian that takes a Gaussian PSF of ``source_sigma_px`` to ``target_sigma_px``."""
    if target_sigma_px < source_sigma_px:
        raise ValueError(f"target sigma {target_sigma_px} px is narrower than the source {source_sigma_px} px")
    return math.sqrt(target_sigma_px**2 - source_sigma_px**2)


def _sampled_gaussian(sigma_px: float, size: int) -> np.ndarray:
    """A point-sampled, normalized Gaussian kernel (sigma 0 gives a delta)."""
    half = size // 2
    if sigma_px <= 1e-6:
        k = np.zeros((size, size))
        k[half, half] = 1.0
        return k
    x = np.arange(size) - half
    line = np.exp(-0.5 * (x / sigma_px) ** 2)
    k = np.outer(line, line)
    return k / k.sum()


def default_window(target_fwhm_px: float):
    """photutils ``SplitCosineBellWindow`` that is flat wherever a Gaussian target still has power.

    The taper starts where the target's transfer function falls to 1e-3
    (frequency ``0.59 / sigma`` cycles/px, a fraction ``1.18 / sigma`` of
    Nyquist), so the matched PSF keeps the target's width (within 1% in the
    tests) while frequencies the target does not have, where noise in a PSF
    model would be amplified, are cut. Targets narrower than ~2.4 px need no
    window (None).
    """
    from photutils.psf_matching import SplitCosineBellWindow

    beta = 1.183 * FWHM_PER_SIGMA / target_fwhm_px
    if beta >= 0.95:
        return None
    return SplitCosineBellWindow(alpha=min(0.3, 1.0 - beta), beta=beta)


def _resolve_window(window, target_fwhm_px: float):
    if isinstance(window, str):
        if window != "auto":
            raise ValueError(f"window {window!r} is not 'auto', None or a photutils window")
        return default_window(target_fwhm_px)
    if window is not None and not callable(window):
        raise ValueError(f"window {window!r} is not 'auto', None or a photutils window")
    return window


def matching_kernels(source_psfs: np.ndarray, target_psf: np.ndarray, *, window: Callable | None = None,
                     regularization: float = 1e-4) -> np.ndarray:
    """Matching kernels for a stack of source PSFs (n, K, K) to one target (K, K).

    The same computation as ``photutils.psf_matching.make_kernel`` (regularized
    Fourier ratio, window applied with DC at the centre, real part, normalized
    to unit sum), vectorized over the stack; the window is evaluated once.
    """
    src = np.asarray(source_psfs, dtype=float)
    tgt = np.asarray(target_psf, dtype=float)
    if src.ndim != 3 or src.shape[1:] != tgt.shape or tgt.shape[0] != tgt.shape[1] or tgt.shape[0] % 2 == 0:
        raise ValueError(f"source PSFs must be (n, K, K) and the target (K, K) with K odd; got {src.shape} and "
                         f"{tgt.shape}")
    src = src / src.sum(axis=(1, 2), keepdims=True)
    tgt = tgt / tgt.sum()
    k = tgt.shape[0]
    # real FFTs: for real PSFs and a point-symmetric window the ratio is Hermitian, so the half plane
    # carries all of it and irfft2 returns what photutils' real(ifft2(...)) does
    s_otf = sfft.rfft2(src)
    t_otf = sfft.rfft2(tgt)
    amp = np.abs(s_otf)
    # photutils thresholds against the maximum over the full plane, which the half plane contains
    mask = amp > regularization * amp.max(axis=(1, 2), keepdims=True)
    ratio = np.zeros_like(s_otf)
    np.divide(np.broadcast_to(t_otf, s_otf.shape), s_otf, out=ratio, where=mask)
    if window is not None:
        w = np.fft.ifftshift(np.asarray(window(tgt.shape), dtype=float))  # DC-centred window to FFT layout
        ratio *= w[:, :k // 2 + 1]
    kernels = np.fft.fftshift(sfft.irfft2(ratio, s=(k, k)), axes=(1, 2))
    sums = kernels.sum(axis=(1, 2), keepdims=True)
    if (sums < 1e-30).any():
        raise ValueError("a matching kernel sums to zero: the regularization threshold is too high")
    return kernels / sums


def fft_convolve(planes: np.ndarray, kernels: np.ndarray, *, workers: int = 1,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Convolve (n, H, W) planes with centred (n, K, K) kernels; same-size output, zeros outside (no wrap-around).

    The FFT grid only needs ``H + K // 2`` (not ``H + K - 1``): the same-size
    output reads input within ``K // 2`` of itself, so a shorter zero pad keeps
    every wrapped term on zeros. Single precision stays single.
    """
    planes = np.asarray(planes)
    kernels = np.asarray(kernels)
    dtype = np.float32 if planes.dtype == np.float32 else np.float64
    n, h, w = planes.shape
    k = kernels.shape[-1]
    m = k // 2
    ph, pw = sfft.next_fast_len(h + m, real=True), sfft.next_fast_len(w + m, real=True)
    if out is None:
        out = np.empty((n, h, w), dtype=dtype)
    for i in range(0, n, FFT_CHUNK):  # chunks whose transforms stay in cache: ~2x faster than one big batch
        sl = slice(i, i + FFT_CHUNK)
        fp = sfft.rfft2(planes[sl].astype(dtype, copy=False), s=(ph, pw), workers=workers)
        fp *= sfft.rfft2(kernels[sl].astype(dtype, copy=False), s=(ph, pw), workers=workers)
        out[sl] = sfft.irfft2(fp, s=(ph, pw), workers=workers)[:, m:m + h, m:m + w]
    return out


def match_psf(image: np.ndarray, source_psf: np.ndarray, target_psf: np.ndarray, *,
              window: Callable | str | None = "auto") -> np.ndarray:
    """``image`` (2-D) with PSF ``source_psf`` convolved to ``target_psf`` (same odd square shape).

    ``window``: "auto" (:func:`default_window` for the target's measured FWHM),
    None (no window) or a photutils window. Returns a new array.
    """
    window = _resolve_window(window, measure_fwhm_px(target_psf) if window == "auto" else 0.0)
    kernel = matching_kernels(np.asarray(source_psf)[None], target_psf, window=window)
    return fft_convolve(np.asarray(image)[None], kernel)[0]


@dataclass
class HomogenizedBatch:
    """PSF-matched images and what was done to each (object, band)."""

    image: np.ndarray  # (n, B, H, W) float32
    variance: np.ndarray  # (n, B, H, W) float32
    fwhm_before: np.ndarray  # (n, B) arcsec
    fwhm_after: np.ndarray  # (n, B) arcsec
    matched: np.ndarray  # (n, B) bool: convolved to the target
    residual: np.ndarray  # (n, B) arcsec: fwhm_before - target where the PSF was already broader, else 0
    kernel_source: np.ndarray  # (n, B) 'psf_image' | 'gaussian' | 'none'


def _place_psf(out: np.ndarray, psf: np.ndarray) -> None:
    """Write ``psf`` centred into ``out`` (odd square), cropping or zero-padding, normalized."""
    k, size = psf.shape[0], out.shape[0]
    if k >= size:
        c = (k - size) // 2
        out[...] = psf[c:c + size, c:c + size]
    else:
        p = (size - k) // 2
        out[p:p + k, p:p + k] = psf
    out /= out.sum()


def homogenize(images: np.ndarray, variances: np.ndarray, psfs: Sequence[Sequence[np.ndarray | None]],
               fwhm_arcsec: np.ndarray, present: np.ndarray, *, pixel_scale_arcsec: float,
               target_fwhm: float, kernel_size: int, window: Callable | str | None = "auto",
               workers: int = 1) -> HomogenizedBatch:
    """Match every present (object, band) to a Gaussian PSF of ``target_fwhm`` arcsec.

    Kernels come from the PSF image with photutils' matching (``matching_kernels``)
    when one is given, else analytically from the FWHM (Gaussian source). A band
    whose PSF is already at least as broad as the target is left as it is and
    reported with its residual. Variance is propagated as variance (x) kernel^2.
    """
    images = np.asarray(images)
    n, nb, h, w = images.shape
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    target_px = target_fwhm / pixel_scale_arcsec
    target = psf_kernel("gaussian", target_px, size=kernel_size)
    win = _resolve_window(window, target_px)
    fwhm = np.asarray(fwhm_arcsec, dtype=float)
    present = np.asarray(present, dtype=bool)
    step = max(1, 5 * FFT_CHUNK // nb)  # objects per chunk, so the working arrays stay in cache
    out = HomogenizedBatch(image=np.empty(images.shape, np.float32), variance=np.empty(images.shape, np.float32),
                           fwhm_before=fwhm, fwhm_after=np.empty((n, nb)), matched=np.empty((n, nb), bool),
                           residual=np.empty((n, nb)), kernel_source=np.empty((n, nb), dtype=object))
    for i in range(0, n, step):
        part = _homogenize_chunk(images[i:i + step], variances[i:i + step], psfs[i:i + step], fwhm[i:i + step],
                                 present[i:i + step], pixel_scale_arcsec=pixel_scale_arcsec, target_fwhm=target_fwhm,
                                 target=target, window=win, workers=workers, out_image=out.image[i:i + step],
                                 out_variance=out.variance[i:i + step])
        for f in ("fwhm_after", "matched", "residual", "kernel_source"):
            getattr(out, f)[i:i + step] = getattr(part, f)
    return out


def _homogenize_chunk(images, variances, psfs, fwhm, present, *, pixel_scale_arcsec, target_fwhm, target, window,
                      workers, out_image, out_variance) -> HomogenizedBatch:
    images = np.asarray(images)
    n, nb, h, w = images.shape
    kernel_size = target.shape[0]
    matched = present & (fwhm < target_fwhm)
    kernels = np.zeros((n, nb, kernel_size, kernel_size), np.float32)  # convolution runs in single precision
    kernels[:, :, kernel_size // 2, kernel_size // 2] = 1.0
    source = np.full((n, nb), "none", dtype=object)
    target_px = target_fwhm / pixel_scale_arcsec
    from_image = [(i, b) for i in range(n) for b in range(nb) if matched[i, b] and psfs[i][b] is not None]
    if from_image:
        stack = np.zeros((len(from_image), kernel_size, kernel_size))
        for j, (i, b) in enumerate(from_image):
            _place_psf(stack[j], psfs[i][b])
        made = matching_kernels(stack, target, window=window)
        for (i, b), kern in zip(from_image, made):
            kernels[i, b] = kern
            source[i, b] = "psf_image"
    sigma_t = target_px / FWHM_PER_SIGMA
    for i in range(n):
        for b in range(nb):
            if matched[i, b] and psfs[i][b] is None:
                sigma_k = gaussian_sigma_kernel(fwhm[i, b] / pixel_scale_arcsec / FWHM_PER_SIGMA, sigma_t)
                kernels[i, b] = _sampled_gaussian(sigma_k, kernel_size)
                source[i, b] = "gaussian"
    variances = np.asarray(variances)
    out_image[~matched] = images[~matched]
    out_variance[~matched] = variances[~matched]
    flat_m = matched.reshape(-1)
    if flat_m.all():  # the usual case: convolve straight into the output, no gathers
        flat_k = kernels.reshape(-1, kernel_size, kernel_size)
        fft_convolve(images.reshape(-1, h, w), flat_k, workers=workers, out=out_image.reshape(-1, h, w))
        fft_convolve(variances.reshape(-1, h, w), flat_k**2, workers=workers, out=out_variance.reshape(-1, h, w))
    elif flat_m.any():
        idx = np.nonzero(flat_m)[0]
        flat_k = kernels.reshape(-1, kernel_size, kernel_size)[idx]
        out_image.reshape(-1, h, w)[idx] = fft_convolve(images.reshape(-1, h, w)[idx], flat_k, workers=workers)
        out_variance.reshape(-1, h, w)[idx] = fft_convolve(variances.reshape(-1, h, w)[idx], flat_k**2,
                                                           workers=workers)
    # variance (x) kernel^2 is non-negative; the FFT leaves round-off of either sign where the variance is 0
    # (padding, masked pixels): clip it so a matched variance never goes negative
    np.maximum(out_variance, 0.0, out=out_variance)
    after = np.where(matched, target_fwhm, fwhm)
    residual = np.where(present & ~matched, fwhm - target_fwhm, 0.0)
    return HomogenizedBatch(image=out_image, variance=out_variance, fwhm_before=fwhm, fwhm_after=after,
                            matched=matched, residual=residual, kernel_source=source)
