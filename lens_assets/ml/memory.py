"""The GPU batch size from a forward-only memory probe, measured before the trainer starts.

Two forward passes with autograd on (activations kept, no backward) under
autocast at small batches give the activation memory per sample (the slope) and
a batch-independent overhead (the intercept). Training needs about
``train_factor`` times the forward activations (backward and gradients) plus
fixed memory for the weights, their gradients and the two AdamW moments (about
four times the parameter bytes). The batch size is the largest power of two
that fits in a fraction of the free memory.
"""

from __future__ import annotations

import torch

__all__ = ["batch_from_probe", "probe_batch_size"]

PROBE_BATCHES = (8, 32)


def batch_from_probe(per_sample_bytes: float, fixed_bytes: float, free_bytes: float, *, fraction: float = 0.7,
                     train_factor: float = 3.0, max_batch: int = 1024, min_batch: int = 1) -> int:
    """Largest power of two ``b <= max_batch`` with ``fixed + b * per_sample * train_factor <= fraction * free``.

    At least ``min_batch``; a ``ValueError`` when even ``min_batch`` does not fit.
    """
    if per_sample_bytes <= 0:
        raise ValueError(f"per_sample_bytes must be positive, got {per_sample_bytes}")
    if fixed_bytes < 0 or free_bytes <= 0:
        raise ValueError(f"need fixed_bytes >= 0 and free_bytes > 0, got {fixed_bytes} and {free_bytes}")
    if not 0 < fraction <= 1 or train_factor <= 0:
        raise ValueError(f"need 0 < fraction <= 1 and train_factor > 0, got {fraction} and {train_factor}")
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got min_batch={min_batch}, max_batch={max_batch}")
    budget = fraction * free_bytes

    def fits(b: int) -> bool:
        return fixed_bytes + b * per_sample_bytes * train_factor <= budget

    if not fits(min_batch):
        need = fixed_bytes + min_batch * per_sample_bytes * train_factor
        raise ValueError(f"a batch of {min_batch} needs about {need / 2**20:.0f} MiB for training "
                         f"({fixed_bytes / 2**20:.0f} MiB fixed + {per_sample_bytes / 2**20:.2f} MiB per sample "
                         f"x {train_factor:g}) but only {budget / 2**20:.0f} MiB ({fraction:g} of "
                         f"{free_bytes / 2**20:.0f} MiB free) is available")
    b = 1 << (max_batch.bit_length() - 1)  # the largest power of two <= max_batch
    while b > 1 and not fits(b):
        b //= 2
    return max(b, min_batch)  # b fits: min_batch does, hence so does 1


def probe_batch_size(model, sample_shape, *, device, max_batch: int = 1024, fraction: float = 0.7,
                     dtype: torch.dtype = torch.bfloat16) -> dict:
    """Probe ``model`` (forward taking ``(image, variance)``) on a CUDA ``device`` for its training batch size.

    The model is moved to ``device`` for the probe and back afterwards, with its
    train/eval mode and buffers (e.g. batch-norm statistics) restored; the
    global RNG is not used. ``free_bytes`` is the device's free memory with the
    model not on it. Returns ``batch_size``, ``per_sample_bytes``,
    ``free_bytes`` and ``fixed_bytes``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the memory probe needs a CUDA device, got {str(device)!r}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # a weight average's frozen copies have no gradients or optimizer moments
    trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    gen = torch.Generator(device=device).manual_seed(0)
    peaks = []
    try:
        model.to(device)
        model.train()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        for b in PROBE_BATCHES:
            image = torch.randn((b, *sample_shape), device=device, generator=gen)
            variance = torch.ones_like(image)
            extra = ()
            if getattr(model, "needs_conditions", False):  # a FiLM member: FWHM and band flags per band
                extra = (torch.ones(b, sample_shape[0], device=device),
                         torch.zeros(b, sample_shape[0], dtype=torch.int32, device=device))
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.enable_grad(), torch.autocast(device_type="cuda", dtype=dtype,
                                                     enabled=dtype != torch.float32):
                out = model(image, variance, *extra)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)  # inputs + kept activations
            del out, image, variance
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name].to(b.device))
        model.to(home)
        model.train(was_training)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # a later peak reading is the training's own
    (b0, b1), (p0, p1) = PROBE_BATCHES, peaks
    per_sample = (p1 - p0) / (b1 - b0)
    if per_sample <= 0:  # cannot happen for a real network; fall back to the larger probe's average
        per_sample = max(p1, 1) / b1
    intercept = max(p0 - per_sample * b0, 0.0)  # workspaces and autocast weight copies, independent of batch
    free = torch.cuda.mem_get_info(device)[0]
    if home == device:  # the weights sit on the device now; they are counted in fixed_bytes instead
        free += param_bytes
    fixed = param_bytes + 3 * trained_bytes + intercept  # weights; the trained ones' gradients and AdamW moments
    batch = batch_from_probe(per_sample, fixed, free, fraction=fraction, max_batch=max_batch)
    return {"batch_size": int(batch), "per_sample_bytes": float(per_sample), "free_bytes": int(free),
            "fixed_bytes": float(fixed)}
