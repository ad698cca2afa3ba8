"""Training and scoring throughput per ensemble member, against the bare model on the same batches.

    python benchmarks/bench_training.py [--rows 2048] [--members regnetx_002,resnet10t] [--cache-epochs 3]

Per member, on this machine (GPU when torch sees one, else CPU):

1. Bare training step: forward + backward + AdamW on one preloaded batch of 64
   (no data loading, no augmentation, no Lightning): the ceiling.
1b. Precision: the bare step in float32 and under bf16 autocast (channels_last for CNNs, as ``train()`` runs them),
   alternating for ``--precision-rounds`` rounds: the medians and their ratio, beside what ``precision: auto``
   chooses on this machine (bf16 where the CPU has native bf16, AVX512-BF16 or AMX).
1c. Input scaling: the bare step at ``precision: auto`` with the input scaled by ``module.asinh`` and by
   ``torch.asinh``, alternating (medians).
2. ``train()`` for one epoch (Lightning, shard loader, photometry-preserving
   augmentation, validation, checkpoints): img/s and its ratio to the bare step.
3. Data loader headroom: loader samples/s (0 and 2 workers) over the training img/s.
3b. ``train()`` for ``--cache-epochs`` epochs with the row cache (``cache_gb``, auto) and without (0), alternating
   for ``--cache-rounds`` rounds: the median img/s of each and their ratio (every epoch after the first copies
   its rows from memory instead of decompressing them).
4. Scoring: ``member_logits`` over every row (reading shards, asinh scaling,
   batches of 256) against the raw ``model.net`` forward on the same rows
   already in memory as one preloaded tensor per batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, input_asinh, report  # noqa: E402
from bench_shards import SURVEY, loader_rates, replicated_shards  # noqa: E402

from lens_assets.science.families import load_family  # noqa: E402
from lens_assets.science.ingest import find_fits, ingest_files  # noqa: E402
from lens_assets.science.simulation import simulate_to_directory  # noqa: E402


def bare_step_rate(model, batch: int, device: str, steps: int = 6, bf16: bool = False) -> float:
    """Images/s of forward + backward + AdamW on one preloaded batch (one untimed step first); ``bf16``: the forward
    under bf16 autocast, as training's ``bf16-mixed`` runs it."""
    import torch

    from lens_assets.ml.precision import bf16_autocast

    x = torch.randn(batch, SURVEY.n_bands, SURVEY.cutout_size_px, SURVEY.cutout_size_px, device=device)
    y = torch.rand(batch, device=device)
    v = torch.ones_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with bf16_autocast(device, "bf16-mixed" if bf16 else "32-true"):
            logits = model(x, v)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t)


def precision_rates(model, device: str, rounds: int) -> dict:
    """The bare step in float32 and under bf16 autocast, alternating ``rounds`` times (medians), in the memory
    format ``train()`` gives the member; what ``precision: auto`` resolves to here."""
    import copy

    import torch

    from lens_assets.ml.precision import resolve_precision

    model = copy.deepcopy(model).use_channels_last()
    rates = {False: [], True: []}
    for _ in range(rounds):
        for bf16 in rates:
            rates[bf16].append(bare_step_rate(model, 64, device, bf16=bf16))
    fp32, bf16 = statistics.median(rates[False]), statistics.median(rates[True])
    return {"fp32_step_img_per_s": fp32, "bf16_step_img_per_s": bf16, "bf16_vs_fp32": bf16 / fp32,
            "memory_format": "channels_last" if model.memory_format == torch.channels_last else "contiguous",
            "auto_precision": resolve_precision("auto", gpu=device.startswith("cuda"))}


def asinh_rates(model, device: str, rounds: int) -> dict:
    """The bare step at the precision ``auto`` resolves to, with the member's input scaled by ``module.asinh`` and
    by ``torch.asinh``, alternating ``rounds`` times (medians)."""
    import copy

    import torch

    from lens_assets.ml.module import asinh
    from lens_assets.ml.precision import resolve_precision

    model = copy.deepcopy(model).use_channels_last()
    bf16 = resolve_precision("auto", gpu=device.startswith("cuda")) == "bf16-mixed"
    ways, rates = {"vectorized": asinh, "torch": torch.asinh}, {"vectorized": [], "torch": []}
    for r in range(rounds):
        for name in (("vectorized", "torch") if r % 2 == 0 else ("torch", "vectorized")):
            with input_asinh(ways[name]):
                rates[name].append(bare_step_rate(model, 64, device, bf16=bf16))
    fast, plain = statistics.median(rates["vectorized"]), statistics.median(rates["torch"])
    return {"asinh_step_img_per_s": fast, "torch_asinh_step_img_per_s": plain, "asinh_speedup": fast / plain}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def scoring_rates(checkpoint: Path, shard_dir: Path, device: str, batch: int = 256) -> dict:
    """``member_logits`` img/s against the raw network forward on the same rows, preloaded."""
    import torch

    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.module import scale_input
    from lens_assets.ml.score import load_member, member_logits

    model = load_member(checkpoint, device=device)
    ds = ShardDataset(shard_dir)
    member_logits([model], ds, batch_size=batch, device=device)  # warm-up
    t = time.perf_counter()
    ours = member_logits([model], ds, batch_size=batch, device=device)
    ours_s = time.perf_counter() - t
    batches = [ds.__getitems__(list(range(i, min(i + batch, len(ds))))) for i in range(0, len(ds), batch)]
    inputs = [scale_input(torch.from_numpy(b["image"]), torch.from_numpy(b["variance"])).to(device)
              for b in batches]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    with torch.inference_mode(), autocast:
        model.net(inputs[0])
        _sync(device)
        t = time.perf_counter()
        raw = [model.net(x).float().cpu() for x in inputs]
        _sync(device)
        raw_s = time.perf_counter() - t
    raw = torch.cat(raw).squeeze(1).numpy()
    return {"score_img_per_s": len(ds) / ours_s, "raw_forward_img_per_s": len(ds) / raw_s,
            "ratio": raw_s / ours_s, "max_abs_logit_diff": float(abs(raw - ours[:, 0]).max())}


def main(argv=None) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from lens_assets.ml.backbones import create_backbone
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.score import default_device
    from lens_assets.ml.train import TrainSettings, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="training rows (cycling over --files simulated files)")
    ap.add_argument("--files", type=int, default=512)
    ap.add_argument("--members", default="regnetx_002")
    ap.add_argument("--cache-epochs", type=int, default=3, help="epochs of each run with and without the row cache")
    ap.add_argument("--cache-rounds", type=int, default=2, help="alternating runs with and without it (median)")
    ap.add_argument("--precision-rounds", type=int, default=5,
                    help="alternating float32 / bf16 bare-step rounds (median)")
    args = ap.parse_args(argv)
    device = default_device()
    torch.set_num_threads(cores())
    out = {"device": device, "rows": args.rows, "members": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        simulate_to_directory(SURVEY, load_family("baseline"), n_cutouts=args.files, seed=7,
                              out_dir=root / "raw" / SURVEY.name / "sim-7", workers=0, progress=False)
        res = ingest_files(find_fits(root / "raw" / SURVEY.name), SURVEY, root=root, workers=0, progress=False)
        res.catalog.to_parquet(root / "catalog.parquet")
        shard_dir = replicated_shards(root, args.rows)
        rows = pd.read_parquet(shard_dir / "rows.parquet", columns=["objid", "label"])
        rng = np.random.default_rng(0)
        rows["split"] = np.where(rng.uniform(size=len(rows)) < 0.9, "train", "val")
        rows["sky_group"] = np.arange(len(rows))
        rows["val_role"] = np.where(rows["split"] == "val", "stop", "")  # every val row selects the checkpoint
        rows.to_parquet(root / "splits.parquet")
        n_train = int((rows["split"] == "train").sum())
        loader = loader_rates(shard_dir)
        for name in args.members.split(","):
            model = LensClassifier(backbone=name, in_chans=SURVEY.n_bands, img_size=SURVEY.cutout_size_px).to(device)
            bare = bare_step_rate(model, 64, device)
            precision = precision_rates(model, device, args.precision_rounds)
            precision.update(asinh_rates(model, device, args.precision_rounds))
            s = train(shard_dir, root / "splits.parquet", root / "runs" / name,
                      TrainSettings(backbone=name, epochs=1, batch_size=64, progress=False))
            rec = {"bare_step_img_per_s": bare, "train_img_per_s": s["train_img_per_s"],
                   "train_vs_bare": s["train_img_per_s"] / bare,
                   "loader_headroom": max(loader.values()) / s["train_img_per_s"],
                   "params": sum(p.numel() for p in create_backbone(name, in_chans=SURVEY.n_bands,
                                                                    img_size=SURVEY.cutout_size_px).parameters()),
                   **precision, **scoring_rates(Path(s["best_checkpoint"]), shard_dir, device)}
            runs = {0.0: [], -1.0: []}
            for r in range(args.cache_rounds):
                for gb in runs:  # without, then with: alternating, so the machine's load falls on both alike
                    runs[gb].append(train(shard_dir, root / "splits.parquet", root / "runs" / f"{name}-{gb}-{r}",
                                          TrainSettings(backbone=name, epochs=args.cache_epochs, batch_size=64,
                                                        progress=False, cache_gb=gb)))
            rec["train_img_per_s_no_cache"] = statistics.median(x["train_img_per_s"] for x in runs[0.0])
            rec["train_img_per_s_cache"] = statistics.median(x["train_img_per_s"] for x in runs[-1.0])
            rec["cache_speedup"] = rec["train_img_per_s_cache"] / rec["train_img_per_s_no_cache"]
            rec["cached_rows"] = runs[-1.0][0]["cached_rows"]
            out["members"][name] = rec
    out["loader_img_per_s"] = loader
    rows_out = [("device", f"{device} ({cores()} cores), DES 5x64x64, {args.rows} rows ({n_train} train)"),
                ("data loader", f"{loader[0]:.0f} img/s (0 workers), {loader[2]:.0f} img/s (2 workers)")]
    for name, r in out["members"].items():
        rows_out += [
            (f"{name} bare step", f"{r['bare_step_img_per_s']:.0f} img/s (fwd+bwd+AdamW, batch 64, "
                                  f"{r['params'] / 1e6:.2f} M params)"),
            (f"{name} precision", f"bf16 autocast {r['bf16_step_img_per_s']:.0f} img/s, float32 "
                                  f"{r['fp32_step_img_per_s']:.0f} -> {r['bf16_vs_fp32']:.2f}x (bare step, "
                                  f"{r['memory_format']}, medians of {args.precision_rounds} alternating rounds); "
                                  f"precision auto: {r['auto_precision']}"),
            (f"{name} input scaling", f"{r['asinh_step_img_per_s']:.0f} img/s with module.asinh, "
                                      f"{r['torch_asinh_step_img_per_s']:.0f} with torch.asinh -> "
                                      f"{r['asinh_speedup']:.2f}x (bare step at precision auto, medians of "
                                      f"{args.precision_rounds} alternating rounds)"),
            (f"{name} train()", f"{r['train_img_per_s']:.0f} img/s = {r['train_vs_bare']:.2f}x bare "
                                "(Lightning + loader + augmentation + validation)"),
            (f"{name} loader headroom", f"{r['loader_headroom']:.1f}x its training rate (target >= 5x)"),
            (f"{name} row cache", f"{r['train_img_per_s_cache']:.0f} img/s with, {r['train_img_per_s_no_cache']:.0f} "
                                  f"without -> {r['cache_speedup']:.2f}x over {args.cache_epochs} epochs "
                                  f"({r['cached_rows']} rows cached; medians of {args.cache_rounds} alternating runs)"),
            (f"{name} scoring", f"{r['score_img_per_s']:.0f} img/s vs raw forward {r['raw_forward_img_per_s']:.0f} "
                                f"img/s -> {r['ratio']:.2f}x (max |logit diff| {r['max_abs_logit_diff']:.1e})"),
        ]
    report("training", rows_out, out)
    return out


if __name__ == "__main__":
    main()
