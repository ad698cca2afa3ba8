"""Track B of the cluster track (the MIL model over arc-segment stamps): its speed side by side, and its figures.

    .venv/bin/python benchmarks/bench_track_b.py --survey des --n-fields 600 --root /tmp/clusters

On simulated cluster fields under ``--root`` (made here with ``cluster_fields``, ``arc_segments`` and
``cluster_features`` unless the root already holds the features table, e.g. a ``bench_clusters.py`` root):

1. Bags: every field's stamps cut once (``build_bag_cache``), fields/s.
2. Scoring speed, side by side on the same bags and network: the batched MIL forward (the backbone on every real
   instance of a batch of fields at once, padding skipped) against scoring each instance one at a time (batch of
   one through the backbone, then the pooling per field), in instances/s, and the largest logit difference.
3. Training speed: one epoch in ``32-true`` against one in ``bf16-mixed`` (where the CPU has native bf16 or there is
   a GPU), instances/s over the training steps.
4. Figures: ``--epochs`` of training as the asset's job runs it (``lens_assets.ml.train_mil.run``), then the test
   and held-out AUROC of ``track_b`` beside ``track_a``'s on the same fields when the root has Track A's scores.

Results go to ``benchmarks/results/track_b.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report  # noqa: E402


def make_fields(survey: str, n_fields: int, n_heldout: int, root: str, field_arcsec: float, workers: int) -> float:
    """cluster_fields -> arc_segments -> cluster_features under ``root``; their wall time (s)."""
    import re
    import tempfile

    import dagster as dg

    from lens_assets.assets.clusters import arc_segments, cluster_features, cluster_fields
    from lens_assets.resources.storage import LocalStorage
    from lens_assets.science.families import FAMILY_DIR

    families = {}
    tmp = Path(tempfile.mkdtemp(prefix="track_b_families_"))
    for name in ("cluster", "cluster_heldout"):
        text = (FAMILY_DIR / f"{name}.toml").read_text()
        if field_arcsec:
            text = re.sub(r"(?m)^size_arcsec = .*$", f"size_arcsec = {field_arcsec}", text)
        (tmp / f"{name}.toml").write_text(text)
        families[name] = str(tmp / f"{name}.toml")
    config = {"ops": {"cluster_fields": {"config": {"n_fields": n_fields, "n_heldout": n_heldout, "workers": workers,
                                                    "family": families["cluster"],
                                                    "heldout_family": families["cluster_heldout"]}},
                      "arc_segments": {"config": {"workers": workers,
                                                  **({"field_size_arcsec": field_arcsec} if field_arcsec else {})}}}}
    t0 = time.perf_counter()
    dg.materialize([cluster_fields, arc_segments, cluster_features], partition_key=survey,
                   resources={"storage": LocalStorage(root=root)}, run_config=config,
                   instance=dg.DagsterInstance.ephemeral(), raise_on_error=True)
    return time.perf_counter() - t0


def scoring_speed(bags, *, backbone: str, precision: str, batch_size: int, device: str, repeats: int = 2) -> dict:
    """Batched MIL forward against one instance at a time, same untrained network (eval mode), same bags."""
    import numpy as np
    import torch

    from lens_assets.ml.mil import MILNet
    from lens_assets.ml.precision import bf16_autocast, resolve_precision

    torch.manual_seed(0)
    net = MILNet(backbone=backbone, in_chans=bags.in_chans, stamp_px=bags.stamp_px).eval().to(device)
    rows = np.arange(len(bags))
    n_inst = int(bags.counts.sum())

    def batched():
        out = []
        for s in range(0, len(rows), batch_size):
            a = bags.padded(rows[s:s + batch_size])
            z, _ = net(*(torch.from_numpy(a[k]).to(device) for k in ("stamps", "positions", "mask")))
            out.append(z.float().cpu())
        return torch.cat(out).numpy()

    def one_at_a_time():
        out = []
        for i in rows:
            sl = bags.instances(int(i))
            h = [net.embed_instances(torch.from_numpy(bags.stamps[j:j + 1]).to(device),
                                     torch.from_numpy(bags.positions[j:j + 1]).to(device))
                 for j in range(sl.start, sl.stop)]
            h = torch.cat(h)[None]
            z, _ = net.pool(h, torch.ones(h.shape[:2], dtype=torch.bool, device=device))
            out.append(z.float().cpu())
        return torch.cat(out).numpy()

    result = {"precision": resolve_precision(precision, gpu=device.startswith("cuda")), "n_instances": n_inst}
    with torch.inference_mode(), bf16_autocast(device, precision):
        for name, fn in (("batched", batched), ("one_at_a_time", one_at_a_time)):
            fn()  # warm-up: oneDNN/cuDNN create their kernels on each new shape once
            best = None
            for _ in range(repeats):  # the fastest of a few: the cores may be shared
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits = fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best or float("inf"), time.perf_counter() - t0)
            result[name] = {"seconds": best, "instances_per_s": n_inst / best, "logits": logits}
    diff = float(np.abs(result["batched"].pop("logits") - result["one_at_a_time"].pop("logits")).max())
    result["max_logit_difference"] = diff
    result["speedup"] = result["batched"]["instances_per_s"] / result["one_at_a_time"]["instances_per_s"]
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n-fields", type=int, default=40, help="fields of the training family (when made here)")
    ap.add_argument("--n-heldout", type=int, default=None, help="default n_fields // 4")
    ap.add_argument("--field-arcsec", type=float, default=0.0, help="field side when made here; 0: the family's")
    ap.add_argument("--root", default=None, help="data root (default: a new temporary folder); one that holds the "
                    "cluster features table (e.g. bench_clusters.py's) is reused")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--backbone", default="regnetx_002")
    ap.add_argument("--stamp-px", type=int, default=32)
    ap.add_argument("--max-instances", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16, help="fields per batch")
    ap.add_argument("--speed-epochs", type=int, default=2, help="epochs of each fp32 / bf16 timing run (the last "
                    "one is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = one per core of the CPU affinity "
                    "(on cores shared with other jobs fewer threads can be much faster)")
    ap.add_argument("--skip-training", action="store_true", help="bags and scoring speed only")
    args = ap.parse_args(argv)
    import numpy as np
    import pandas as pd
    import torch

    from lens_assets import layout
    from lens_assets.ml.mil import MILSettings, build_bag_cache, read_bag_cache, train_mil
    from lens_assets.ml.precision import cpu_bf16_supported
    from lens_assets.ml.train_mil import default_outputs, run
    from lens_assets.resources.storage import LocalStorage

    if args.root is None:
        import tempfile

        args.root = tempfile.mkdtemp(prefix="lens_track_b_")
    storage = LocalStorage(root=args.root)
    record: dict = {"args": vars(args)}
    rows = []
    features_path = storage.path(*layout.cluster_features_table(args.survey))
    if not features_path.exists():
        n_heldout = args.n_fields // 4 if args.n_heldout is None else args.n_heldout
        record["fields_seconds"] = make_fields(args.survey, args.n_fields, n_heldout, args.root, args.field_arcsec,
                                               args.workers)
        rows.append(("fields (simulated, segmented, features)", f"{args.n_fields} + {n_heldout} held-out in "
                                                                f"{record['fields_seconds']:.0f} s"))
    else:
        rows.append(("fields", f"reused from {features_path}"))
    features = pd.read_parquet(features_path)
    fields = pd.read_parquet(storage.path(*layout.cluster_fields_table(args.survey)))
    segments = pd.read_parquet(storage.path(*layout.cluster_segments_table(args.survey)))
    fields = fields[fields["objid"].isin(features.loc[features["split"] != "excluded", "objid"])]
    bags_path = storage.path(*layout.cluster_track_b_bags(args.survey))
    t0 = time.perf_counter()
    build_bag_cache(fields, segments, root=storage.root_path, survey=args.survey, out=bags_path,
                    stamp_px=args.stamp_px, max_instances=args.max_instances, workers=args.workers)
    bag_s = time.perf_counter() - t0
    bags = read_bag_cache(bags_path)
    record["bags"] = {"n_fields": len(bags), "n_instances": int(bags.counts.sum()), "seconds": bag_s,
                      "mb": bags_path.stat().st_size / 1e6}
    rows.append(("bags", f"{len(bags)} fields, {int(bags.counts.sum())} instances ({bags.counts.mean():.1f} per "
                         f"field), {args.stamp_px} px, cut at {len(bags) / bag_s:.1f} fields/s, "
                         f"{record['bags']['mb']:.0f} MB"))

    from lens_assets.ml.precision import available_cores

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    record["threads"] = threads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speed = scoring_speed(bags, backbone=args.backbone, precision="auto", batch_size=args.batch_size, device=device)
    record["scoring"] = speed
    rows.append((f"scoring {args.backbone} ({device}, {speed['precision']}, {threads} threads)",
                 f"batched {speed['batched']['instances_per_s']:.0f} inst/s vs one at a time "
                 f"{speed['one_at_a_time']['instances_per_s']:.0f} inst/s = {speed['speedup']:.1f}x "
                 f"(max logit diff {speed['max_logit_difference']:.1e})"))
    if not args.skip_training:
        precisions = ["32-true"] + (["bf16-mixed"] if device == "cuda" or cpu_bf16_supported() else [])
        record["training_speed"] = {}
        for precision in precisions:
            settings = MILSettings(backbone=args.backbone, epochs=args.speed_epochs, batch_size=args.batch_size,
                                   precision=precision, threads=threads, progress=False)
            s = train_mil(settings, bags=bags, table=features,
                          checkpoint_path=Path(args.root) / "bench_track_b" / f"speed-{precision}.ckpt")
            # the last epoch's rate: the first one holds the kernels' warm-up on every new batch shape
            record["training_speed"][precision] = s["train_instances_per_s_by_epoch"][-1]
        text = " vs ".join(f"{p} {v:.0f} inst/s" for p, v in record["training_speed"].items())
        if len(precisions) == 1:
            text += " (no native bf16 on this CPU: bf16 not timed)"
        else:
            text += f" = {record['training_speed']['bf16-mixed'] / record['training_speed']['32-true']:.2f}x"
        rows.append((f"training {args.backbone} ({device}, epoch {args.speed_epochs})", text))

        settings = MILSettings(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size,
                               threads=threads, progress=False)
        t0 = time.perf_counter()
        summary = run(bags_path, features_path, default_outputs(Path(args.root) / "bench_track_b" / "run"), settings)
        record["training"] = {k: v for k, v in summary.items() if k != "settings"}
        record["training"]["wall_seconds"] = time.perf_counter() - t0
        rows.append(("track_b training", f"{summary['epochs_run']} epochs, best val AUROC "
                                         f"{summary['best_val_auroc']:.3f}, {summary['train_instances_per_s']:.0f} "
                                         f"inst/s ({summary['precision']}), "
                                         f"{record['training']['wall_seconds']:.0f} s"))
        scores = pd.read_parquet(Path(args.root) / "bench_track_b" / "run" / "scores.parquet")
        a_path = storage.path(*layout.cluster_scores_table(args.survey))
        track_a = pd.read_parquet(a_path) if a_path.exists() else None
        from sklearn.metrics import roc_auc_score

        for name in sorted(scores["set"].unique(), key=lambda s: (s != "test", s)):
            part = scores[scores["set"] == name]
            y = part["label"].to_numpy(int)
            text = (f"AUROC {roc_auc_score(y, part['logit']):.3f}" if 0 < y.sum() < len(y)
                    else "AUROC n/a (one class)")
            text += f"  ({int(y.sum())} lenses / {int((y == 0).sum())} non-lenses)"
            if track_a is not None:
                a = track_a[(track_a["model"] == "track_a") & (track_a["set"] == name)]
                ya = a["label"].to_numpy(int)
                if len(a) and 0 < ya.sum() < len(ya):
                    text += f"   track_a on the same set: {roc_auc_score(ya, a['logit']):.3f}"
            rows.append((f"track_b {name}", text))
            record.setdefault("auroc", {})[name] = text
        record["n_scored"] = int(len(scores))
        record["logit_std"] = float(np.std(scores["logit"]))
    report("track_b", rows, record)
    return record


if __name__ == "__main__":
    main()
