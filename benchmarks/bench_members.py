"""Candidate ensemble members on the same data and the same CPU budget: which one earns the second seat.

    python benchmarks/bench_members.py [--minutes 3] [--candidates resnet10t,convnext_atto,...] [--n 1500]

One small DES dataset is built with the pipeline's own functions: ``--n``
cutouts of the ``baseline`` family and ``--n-heldout`` of the ``heldout`` family
(other source morphologies, PSF profile, colours, noise) are simulated,
ingested, PSF-matched into shards and split (``make_splits``, which keeps the
held-out family out of train/val/test). Each candidate then trains with
``train()`` in bf16 (where the CPU has it) for about ``--minutes`` of wall clock
on every core of this process: the epoch count is set from a measured
training rate so the cosine schedule ends near the budget, and Lightning's
``max_time`` stops it at the budget in any case. Reported per candidate:

- training img/s (``train()``: loader, augmentation, validation included) and
  scoring img/s (``member_logits`` over the held-out family, bf16),
- best validation AUROC, and the AUROC on the held-out family with the best
  checkpoint,
- held-out AUROC above chance per CPU-minute: ``(heldout_auroc - 0.5) /
  (train seconds x cores / 60)``, the criterion for the default second member.

The cores are shared, so every figure of one run is taken under the same load;
results go to benchmarks/results/members.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report  # noqa: E402

DEFAULT_CANDIDATES = "resnet10t,regnetx_002,mobilenetv3_small_100,efficientvit_b0"


def build_dataset(root: Path, *, n: int, n_heldout: int, seed: int = 11):
    """Shards and splits of ``n`` baseline + ``n_heldout`` held-out-family DES cutouts under ``root``."""
    from lens_assets.science.families import load_family
    from lens_assets.science.ingest import find_fits, ingest_files
    from lens_assets.science.shards import build_shards, shard_settings
    from lens_assets.science.simulation import simulate_to_directory
    from lens_assets.science.splits import make_splits
    from lens_assets.science.surveys import get_survey

    survey = get_survey("des")
    for family, count, role in (("baseline", n, "train"), ("heldout", n_heldout, "heldout")):
        simulate_to_directory(survey, load_family(family), n_cutouts=count, seed=seed,
                              out_dir=root / "raw" / "des" / f"sim-{family}-{seed}", workers=cores(),
                              progress=False, role=role)
    catalog = ingest_files(find_fits(root / "raw" / "des"), survey, root=root, workers=cores(),
                           progress=False).catalog
    build_shards(catalog, survey, root=root, out_dir=root / "shards", settings=shard_settings(survey),
                 workers=cores(), progress=False)
    splits = make_splits(catalog, reference_band="r", seed=0, min_groups_per_stratum=3).table
    splits.to_parquet(root / "splits.parquet")
    heldout = catalog.loc[catalog["sim_family"] == "heldout", "objid"].tolist()
    return root / "shards", root / "splits.parquet", heldout, splits


def train_rate(name: str, shard_dir: Path, batch: int = 64, steps: int = 4) -> float:
    """img/s of bf16 (where supported) training steps of ``name`` on real batches: sets the epoch count."""
    import torch

    from lens_assets.ml.data import ShardDataset, collate
    from lens_assets.ml.module import LensClassifier
    from lens_assets.ml.precision import bf16_autocast

    ds = ShardDataset(shard_dir)
    b = collate(ds.__getitems__(list(range(min(batch, len(ds))))))
    model = LensClassifier(backbone=name, in_chans=b["image"].shape[1], img_size=b["image"].shape[-1])
    model.use_channels_last()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with bf16_autocast("cpu"):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b["image"], b["variance"]),
                                                                        b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(b["image"]) / (time.perf_counter() - t)


def evaluate(checkpoint: str, shard_dir: Path, objids: list) -> tuple[float, float]:
    """(AUROC, scoring img/s) of a member checkpoint on ``objids``."""
    from sklearn.metrics import roc_auc_score

    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import load_member, member_logits

    member = load_member(checkpoint, device="cpu")
    ds = ShardDataset(shard_dir, objids=objids)
    member_logits([member], ShardDataset(shard_dir, objids=objids[:64]), device="cpu")  # warm-up
    t = time.perf_counter()
    z = member_logits([member], ds, device="cpu")[:, 0]
    seconds = time.perf_counter() - t
    y = ds.__getitems__(list(range(len(ds))))["label"]
    return float(roc_auc_score(y, z)), len(ds) / seconds


def main(argv=None) -> dict:
    import torch

    from lens_assets.ml.backbones import count_parameters, create_backbone
    from lens_assets.ml.precision import available_cores, resolve_precision
    from lens_assets.ml.train import TrainSettings, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    ap.add_argument("--minutes", type=float, default=1.0, help="training wall clock per candidate")
    ap.add_argument("--n", type=int, default=1500, help="baseline-family cutouts")
    ap.add_argument("--n-heldout", type=int, default=400, help="held-out-family cutouts")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(available_cores())
    out = {"minutes": args.minutes, "cores": cores(), "precision": resolve_precision("auto", gpu=False),
           "candidates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        shard_dir, splits_path, heldout, splits = build_dataset(root, n=args.n, n_heldout=args.n_heldout)
        out["dataset_seconds"] = time.perf_counter() - t
        n_train = int((splits["split"] == "train").sum())
        out.update({"n_train": n_train, "n_val": int((splits["split"] == "val").sum()), "n_heldout": len(heldout)})
        print(f"dataset: {n_train} train, {out['n_val']} val, {len(heldout)} held-out in "
              f"{out['dataset_seconds']:.0f} s",
              flush=True)
        for name in args.candidates.split(","):
            rate = train_rate(name, shard_dir, args.batch_size)
            # 0.5: validation, loader, augmentation, checkpoints
            epochs = max(1, int(args.minutes * 60 * rate * 0.5 / n_train))
            settings = TrainSettings(backbone=name, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                                     patience=epochs, progress=False, max_minutes=args.minutes)
            s = train(shard_dir, splits_path, root / "runs" / name, settings)
            heldout_auroc, score_rate = evaluate(s["best_checkpoint"], shard_dir, heldout)
            cpu_minutes = s["seconds"] * s["threads"] / 60
            rec = {"params_m": count_parameters(create_backbone(name, in_chans=5, img_size=64)) / 1e6,
                   "step_img_per_s": rate, "epochs_planned": epochs, "epochs_run": s["epochs_run"],
                   "train_img_per_s": s["train_img_per_s"], "score_img_per_s": score_rate,
                   "val_auroc": s["best_val_auroc"], "heldout_auroc": heldout_auroc,
                   "train_seconds": s["seconds"], "cpu_minutes": cpu_minutes,
                   "heldout_auroc_gain_per_cpu_minute": (heldout_auroc - 0.5) / cpu_minutes,
                   "precision": s["precision"], "channels_last": s["channels_last"]}
            out["candidates"][name] = rec
            print(f"{name}: {rec}", flush=True)
    c = out["candidates"]
    ref = c.get("resnet10t")
    rows = [("setup", f"DES 5x64x64, {out['n_train']} train / {out['n_val']} val / {out['n_heldout']} held-out "
                      f"family, {args.minutes:g} min per candidate, {out['precision']}, {out['cores']} cores")]
    rows.append(("candidate", "params  train img/s  score img/s  epochs  val AUROC  heldout AUROC  "
                              "(heldout-0.5)/CPU-min  train/score vs resnet10t"))
    for name, r in sorted(c.items(), key=lambda kv: -kv[1]["heldout_auroc_gain_per_cpu_minute"]):
        vs = (f"{r['train_img_per_s'] / ref['train_img_per_s']:.2f}x / "
              f"{r['score_img_per_s'] / ref['score_img_per_s']:.2f}x"
              if ref else "-")
        rows.append((name, f"{r['params_m']:5.2f}M  {r['train_img_per_s']:11.0f}  {r['score_img_per_s']:11.0f}  "
                           f"{r['epochs_run']:6d}  {r['val_auroc']:9.3f}  {r['heldout_auroc']:13.3f}  "
                           f"{r['heldout_auroc_gain_per_cpu_minute']:21.3f}  {vs}"))
    others = {k: v for k, v in c.items() if k != "resnet10t"}
    if others:
        best = max(others, key=lambda k: others[k]["heldout_auroc_gain_per_cpu_minute"])
        out["chosen_second_member"] = best
        rows.append(("second member", f"{best} (highest held-out AUROC gain per CPU-minute besides resnet10t)"))
    report("members", rows, out)
    return out


if __name__ == "__main__":
    main()
