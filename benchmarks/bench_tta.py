"""Test-time averaging over the square's symmetries: does scoring each cutout in several orientations help?

    .venv/bin/python benchmarks/bench_tta.py --root <a run's data root>     # e.g. a bench_ablation lever's folder

Lensing does not care how a cutout is turned, and training sees every turn and flip (``module.augment``), but a CNN is
not exactly invariant: averaging its logits over turned copies of each cutout is the cheapest ensemble there is. This
scores the rows of a finished run (``scores/<survey>/ensemble_logits.parquet``: the test split, each held-out family
and the lens/twin pairs) with its first member in 1, 2 (a half turn), 4 (the four turns) and 8 (turns and flips)
orientations, all in one pass over the same batches, and prints each set's AUROC beside the forward rate of each
choice (the cost: a k-view score runs the member k times). The member is the ensemble's first (``ensemble.json``,
its checkpoint checked against its sha256); a FiLM member gets its observing conditions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report  # noqa: E402

VIEWS = {1: [(0, False)], 2: [(0, False), (2, False)], 4: [(k, False) for k in range(4)],
         8: [(k, f) for k in range(4) for f in (False, True)]}


def main(argv=None) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    from lens_assets import layout
    from lens_assets.ml.data import ShardDataset
    from lens_assets.ml.score import default_device, load_member, logits_of_batch
    from lens_assets.model_registry import read_ensemble
    from lens_assets.resources.storage import LocalStorage

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="data root of a run that has scored its rows (score_calibrator)")
    ap.add_argument("--survey", default="des")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    root = Path(args.root)
    storage = LocalStorage(root=str(root))
    scores_path = storage.path(*layout.ensemble_scores(args.survey))
    if not scores_path.exists():
        raise SystemExit(f"{scores_path} does not exist: materialize score_calibrator in {root} first")
    scores = pd.read_parquet(scores_path)
    first = read_ensemble(storage, args.survey)["members"][0]  # checkpoint checked by sha256
    member = first["name"]
    device = default_device()
    model = load_member(first["path"], device=device)
    dataset = ShardDataset(storage.path(*layout.shards_dir(args.survey)), objids=scores["objid"].tolist())
    views = VIEWS[8]
    logits = np.zeros((len(scores), len(views)), np.float32)
    seconds = np.zeros(len(views))
    for start in range(0, len(scores), args.batch):
        batch = dataset.__getitems__(list(range(start, min(start + args.batch, len(scores)))))
        image, variance = torch.as_tensor(batch["image"]), torch.as_tensor(batch["variance"])
        conditions = {k: torch.as_tensor(batch[k]) for k in ("fwhm_before", "band_flags")}  # for a FiLM member
        for j, (k, flip) in enumerate(views):
            im, var = torch.rot90(image, k, (2, 3)), torch.rot90(variance, k, (2, 3))
            if flip:
                im, var = im.flip(3), var.flip(3)
            t0 = time.perf_counter()
            logits[start:start + len(im), j] = logits_of_batch([model], im, var, device=device, **conditions)[:, 0]
            seconds[j] += time.perf_counter() - t0
    one_view_rate = len(scores) / statistics.median(seconds)
    held = scores["split"] == "heldout"
    sets = {"test": scores["split"] == "test",
            **{f: held & (scores["sim_family"] == f) for f in sorted(set(scores.loc[held, "sim_family"]))},
            "lensing_only": scores["split"] == "lensing_only"}
    record = {"root": str(root), "member": member, "n_rows": len(scores), "one_view_per_s": one_view_rate,
              "auroc": {}}
    rows = [("rows", f"{len(scores)} ({member}, {cores()} cores)"),
            ("forward, one orientation", f"{one_view_rate:.0f} cutouts/s (k orientations: 1/k of it)")]
    index = {v: i for i, v in enumerate(views)}
    for name, mask in sets.items():
        y = scores.loc[mask, "label"].to_numpy()
        if len(set(y)) < 2:
            continue
        got = {k: float(roc_auc_score(y, logits[mask.to_numpy()][:, [index[v] for v in vs]].mean(axis=1)))
               for k, vs in VIEWS.items()}
        record["auroc"][name] = got
        rows.append((f"AUROC {name} ({len(y)})", ", ".join(f"{k} view{'s' * (k > 1)} {v:.3f}" for k, v in got.items())))
    stored = scores[f"logit_{member}"].to_numpy()  # this member's own logits, as score_calibrator wrote them
    record["max_abs_diff_vs_stored"] = float(np.abs(logits[:, 0] - stored).max())
    rows.append((f"one view against the stored logit_{member}", f"max |diff| {record['max_abs_diff_vs_stored']:.1e}"))
    report("tta", rows, record)
    return record


if __name__ == "__main__":
    main()
