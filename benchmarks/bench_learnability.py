"""Can the member learn lenses against a few non-lens types alone? A specialist trained on nothing else.

    .venv/bin/python benchmarks/bench_learnability.py --root data --kinds ring,spiral --epochs 16

Takes the data root of a ``survey_pipeline`` run (shards, ``dataset_splits``, the catalog's ``sim_kind``), keeps
every lens and the non-lenses of ``--kinds`` in a copy of the splits table, trains one member on it
(``lens_assets.ml.train``, the project's training loop and settings) and scores the test split's lenses against
those types. Beside it, the same member trained on the whole population and scored on the same test rows (the
run's own ``ensemble_logits``) says what the full mixture gave those pairs. A specialist near 0.5 means that, with
that many training examples of those types, the member cannot tell them from lenses at all: neither the other
types nor the mixture's weights are in the way. Timing: the specialist's training images/s and wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import report  # noqa: E402


def _auroc_by_kind(test, score: str) -> dict:
    from lens_assets.science.metrics import auroc_by_kind

    return {k: v["auroc"] for k, v in
            auroc_by_kind(test["label"].to_numpy(), test[score].to_numpy(), test["sim_kind"].to_numpy()).items()}


def _rounded(by_kind: dict) -> dict:
    return {k: round(v, 3) for k, v in by_kind.items()}


def main(argv=None) -> dict:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from lens_assets.layout import catalog_table, ensemble_scores, shards_dir, splits_table
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import load_members, member_logits
    from lens_assets.ml.train import TrainSettings, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="data root of a survey_pipeline run")
    ap.add_argument("--survey", default="des")
    ap.add_argument("--kinds", default="ring,spiral", help="non-lens types kept (comma-separated sim_kind values)")
    ap.add_argument("--backbone", default="regnetx_002")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root, kinds = Path(args.root), [k for k in args.kinds.split(",") if k]
    splits = pd.read_parquet(root / Path(*splits_table(args.survey)))
    catalog = pd.read_parquet(root / Path(*catalog_table(args.survey)), columns=["objid", "sim_kind"])
    table = splits.merge(catalog, on="objid", how="left", validate="one_to_one")
    unknown = sorted(set(kinds) - set(table.loc[table["label"] == 0, "sim_kind"]))
    if unknown:
        raise SystemExit(f"no non-lens of kind {unknown} in {root}; its kinds are "
                         f"{sorted(table.loc[table['label'] == 0, 'sim_kind'].dropna().unique())}")
    keep = (table["label"] == 1) | table["sim_kind"].isin(kinds)
    counts = table[keep].groupby(["split", "label"]).size()
    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(tmp) / "splits.parquet"
        table.loc[keep, splits.columns].to_parquet(kept)
        settings = TrainSettings(backbone=args.backbone, epochs=args.epochs, lr=2e-3, seed=args.seed,
                                 patience=args.epochs, progress=False)
        t0 = time.perf_counter()
        summary = train(root / Path(*shards_dir(args.survey)), kept, Path(tmp) / "member", settings)
        wall = time.perf_counter() - t0
        test = table[keep & (table["split"] == "test")].reset_index(drop=True)
        members = load_members([summary["best_checkpoint"]], device="cpu")
        test["specialist"] = member_logits(members, ShardDataset(root / Path(*shards_dir(args.survey)),
                                                                 test["objid"].tolist()))[:, 0]
    full = pd.read_parquet(root / Path(*ensemble_scores(args.survey)), columns=["objid", "logit"])
    test = test.merge(full, on="objid", how="left", validate="one_to_one")
    spec, mixed = roc_auc_score(test["label"], test["specialist"]), roc_auc_score(test["label"], test["logit"])
    rows = [("training rows", f"{int(counts.get(('train', 1), 0))} lenses, {int(counts.get(('train', 0), 0))} "
                              f"non-lenses of {kinds}; {args.epochs} epochs in {wall:.0f} s "
                              f"({summary.get('train_img_per_s', float('nan')):.0f} img/s)"),
            ("test", f"{int((test['label'] == 1).sum())} lenses, {int((test['label'] == 0).sum())} non-lenses"),
            ("specialist AUROC", f"{spec:.3f} {_rounded(_auroc_by_kind(test, 'specialist'))}"),
            ("whole-population member", f"{mixed:.3f} {_rounded(_auroc_by_kind(test, 'logit'))}"),
            ("specialist / whole", f"{spec / mixed:.2f}x the AUROC on the same test rows")]
    record = {"root": str(root), "kinds": kinds, "specialist_auroc": spec, "whole_population_auroc": mixed,
              "wall_s": wall, "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
              "by_kind_specialist": _auroc_by_kind(test, "specialist"), "by_kind_whole": _auroc_by_kind(test, "logit")}
    report(f"learnability_{args.survey}", rows, record)
    return record


if __name__ == "__main__":
    main()
