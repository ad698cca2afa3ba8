"""What bf16 does to the network input, and what keeping the first convolution in float32 costs.

    .venv/bin/python benchmarks/bench_input_precision.py --root data          # after `make demo`
    .venv/bin/python benchmarks/bench_input_precision.py --root <a bench_ablation lever folder> --rows 2000

Under bf16 autocast (the default on a CPU with native bf16) the first convolution rounds its input,
``asinh(image / s)`` with ``s`` the cutout's noise, to 8 significant bits. For each pixel of the first ``--rows``
rows of ``<root>/shards/<survey>`` this compares that rounding error with the pixel's own noise in the same units
(``sqrt(var) / s / sqrt(1 + (image / s)^2)``), in annuli about the centre where arcs lie, for lenses and non-lenses;
and the same for the colour residual channel, whose deflector light is cancelled. Then it times training steps
(forward, backward, AdamW) and scoring forwards of the default member in bf16, bf16 with the float32 stem
(``float32_stem``, ``module.float32_first_conv``) and float32, interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report  # noqa: E402

ANNULI_ARCSEC = ((0.0, 0.5), (0.5, 2.0), (2.0, 4.0))


def rounding_over_noise(x, noise):
    """|bf16(x) - x| / noise per pixel (the tensors' shape)."""
    return (x.bfloat16().float() - x).abs() / noise.clamp_min(1e-12)


def input_figures(shard_dir: Path, rows: int, batch: int = 256) -> dict:
    """Percentiles and shares of the rounding error over the noise, per annulus and class, for the scaled bands
    and the colour residual."""
    import numpy as np
    import torch

    from lens_assets.ml.data import ShardDataset, collate
    from lens_assets.ml.module import colour_difference, colour_residual, median_measured_variance, scale_input
    from lens_assets.ml.train import residual_band_indices
    from lens_assets.science.surveys import get_survey

    ds = ShardDataset(shard_dir)
    layout = ds.layout()
    blue, red = residual_band_indices(layout["survey"], layout["bands"])
    scale = get_survey(layout["survey"]).pixel_scale_arcsec
    ratios = {(ch, cls, a): [] for ch in ("bands", "colour residual") for cls in ("lens", "non-lens")
              for a in ANNULI_ARCSEC}
    n = min(rows, len(ds))
    for start in range(0, n, batch):
        b = collate(ds.__getitems__(list(range(start, min(start + batch, n)))))
        image, var = b["image"].float(), b["variance"].float()
        h = image.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(h) - (h - 1) / 2, indexing="ij")
        r = torch.sqrt(xx**2 + yy**2) * scale
        s = torch.sqrt(median_measured_variance(var, 1).clamp_min(1e-20))[:, None, None, None]
        x = scale_input(image, var)
        noise = torch.sqrt(var.clamp_min(0)) / s / torch.sqrt(1 + (image / s) ** 2)
        q = rounding_over_noise(x, noise)
        # the colour residual, its noise in its own units
        diff, dvar = colour_difference(image, var, blue=blue, red=red)
        sd = torch.sqrt(median_measured_variance(dvar[:, None], 1).clamp_min(1e-20))[:, None, None]
        xr = colour_residual(image, var, blue=blue, red=red)[:, 0]
        qr = rounding_over_noise(xr, torch.sqrt(dvar.clamp_min(0)) / sd / torch.sqrt(1 + (diff / sd) ** 2))
        lens = b["label"] > 0.5
        for cls, m in (("lens", lens), ("non-lens", ~lens)):
            for a in ANNULI_ARCSEC:
                ring = (r >= a[0]) & (r < a[1])
                ratios[("bands", cls, a)].append(q[m][:, :, ring].flatten().numpy())
                ratios[("colour residual", cls, a)].append(qr[m][:, ring].flatten().numpy())
    out = {}
    for (ch, cls, a), parts in ratios.items():
        v = np.concatenate(parts) if parts else np.zeros(0)
        if v.size == 0:
            continue
        out[f"{ch} | {cls} | {a[0]}-{a[1]}\""] = {
            "pixels": int(v.size), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "share_above_0.3": float((v > 0.3).mean()),
            "share_above_1": float((v > 1.0).mean())}
    return {"survey": layout["survey"], "rows": n, "by_channel_class_annulus": out}


def rates(shard_dir: Path, backbone: str, batch: int, steps: int, rounds: int) -> dict:
    """Median training-step and forward img/s of bf16, bf16 + float32 stem and float32, interleaved rounds."""
    import torch

    from lens_assets.ml.data import ShardDataset, collate
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.train import residual_band_indices

    torch.set_num_threads(cores())
    ds = ShardDataset(shard_dir)
    layout = ds.layout()
    b = collate(ds.__getitems__(list(range(min(batch, len(ds))))))
    image, var, label = b["image"], b["variance"], b["label"].float()
    variants = {"bf16": ("bf16", False), "bf16 + float32 stem": ("bf16", True), "float32": ("fp32", False)}
    models, opts = {}, {}
    for name, (_, stem) in variants.items():
        torch.manual_seed(0)
        m = LensClassifier(backbone=backbone, in_chans=image.shape[1], img_size=image.shape[-1],
                           residual_bands=residual_band_indices(layout["survey"], layout["bands"]),
                           float32_stem=stem)
        models[name] = m.use_channels_last()
        opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def ctx(name):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=variants[name][0] == "bf16")

    def train_step(name):
        m = models[name].train()
        with ctx(name):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(image, var).float(), label)
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()

    def forward(name):
        m = models[name].eval()
        with torch.no_grad(), ctx(name):
            m(image, var)

    timings = {(kind, name): [] for kind in ("train", "score") for name in variants}
    for name in variants:  # warm-up: oneDNN picks its kernels at the first call of each shape
        train_step(name)
        forward(name)
    for _ in range(rounds):
        for name in variants:
            for kind, fn in (("train", train_step), ("score", forward)):
                t = time.perf_counter()
                for _ in range(steps):
                    fn(name)
                timings[(kind, name)].append(steps * len(image) / (time.perf_counter() - t))
    return {f"{kind} | {name}": statistics.median(v) for (kind, name), v in timings.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("data"), help="a run's data root (holds shards/<survey>)")
    p.add_argument("--survey", default="des")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--backbone", default="regnetx_002")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    shard_dir = a.root / "shards" / a.survey
    if not (shard_dir / "rows.parquet").exists():
        raise SystemExit(f"{shard_dir}: no PSF-matched shards (rows.parquet) there; run `make demo` (root data) "
                         "or pass --root of a run that made them")
    figures = input_figures(shard_dir, a.rows)
    speed = rates(shard_dir, a.backbone, a.batch, a.steps, a.rounds)
    rows = [("rounding / noise (channel | class | annulus)", "median  p90  p99  >0.3σ  >1σ")]
    for k, v in figures["by_channel_class_annulus"].items():
        rows.append((k, f"{v['median']:.3f}  {v['p90']:.2f}  {v['p99']:.2f}  {v['share_above_0.3']:.3f}  "
                        f"{v['share_above_1']:.3f}  ({v['pixels']} px)"))
    for kind in ("train", "score"):
        base = speed[f"{kind} | bf16"]
        for name in ("bf16", "bf16 + float32 stem", "float32"):
            v = speed[f"{kind} | {name}"]
            rows.append((f"{kind} img/s, {name}", f"{v:.0f}  ({v / base:.2f}x bf16)"))
    record = {"root": str(a.root), "backbone": a.backbone, "batch": a.batch, "steps": a.steps, "rounds": a.rounds,
              "input": figures, "img_per_s": speed}
    report("input_precision", rows, record)
    return record


if __name__ == "__main__":
    main()
