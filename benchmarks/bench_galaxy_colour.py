"""Colour consistency at galaxy scale as a lens feature: its AUROC alone and fused with the finder, and its cost.

    .venv/bin/python benchmarks/bench_galaxy_colour.py                      # runs the demo-sized graph first
    .venv/bin/python benchmarks/bench_galaxy_colour.py --root data          # on a materialized survey_pipeline

Takes the data root of a ``survey_pipeline`` run (shards, splits and ``scores/<survey>/ensemble_logits.parquet``
from ``score_calibrator``; without ``--root`` it runs the graph at the demo's sizes in a temporary folder, as
``bench_ablation.py`` does) and computes :func:`lens_assets.science.galaxy_colour.arc_colour_consistency` for every
validation, test, held-out and lens/twin-pair cutout. Side by side, per set: the finder's AUROC, the colour
feature's AUROC on the cutouts where it is defined (and that share, lenses and non-lenses apart), and the AUROC,
TPR10 and FNR(flux ratio < 0.1) of the finder and of a logistic regression on (finder logit, colour
consistency, defined or not) fitted on the validation split's ``calibrate`` half, the rows the fusion of
``score_calibrator`` is fitted on (its other half is the ``val_stop`` row). Timing: the feature's cutouts/s and
the ensemble's forward pass on the same 256 cutouts in memory, each on one core, as a ratio; and the feature's rate
over all rows on every core, shard reads included. The training population is unchanged, so its shortcut AUROC is
the run's own (``shortcut_audit``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import cores, report  # noqa: E402

FEATURES = ("logit", "colour_consistency_filled", "colour_defined")


def _colour_chunk(args):
    """Worker: the colour table of one chunk of shard rows (read here, so only indices cross processes)."""
    shard_path, indices, kwargs = args
    import h5py
    import numpy as np

    from lens_assets.science.galaxy_colour import arc_colour_table

    with h5py.File(shard_path, "r") as f:
        order = np.argsort(indices)
        idx = np.asarray(indices)[order]
        images, variances = f["images"][idx], f["variance"][idx]
    table = arc_colour_table(images, variances, **kwargs)
    table.index = np.asarray(indices)[order]
    return table


def colour_features(rows, shard_dir: Path, survey, target_fwhm_arcsec: float, *, chunk: int = 64):
    """Colour table of ``rows`` (objid, shard, index), in their order, computed on every core."""
    import pandas as pd

    from lens_assets.science.parallel import parallel_map

    from lens_assets.science.galaxy_colour import survey_colour_kwargs

    kwargs = survey_colour_kwargs(survey, target_fwhm_arcsec)
    tasks = []
    for shard, g in rows.groupby("shard", sort=False):
        idx = g["index"].to_numpy()
        tasks += [(str(shard_dir / shard), idx[i:i + chunk].tolist(), kwargs) for i in range(0, len(idx), chunk)]
    parts = parallel_map(_colour_chunk, tasks, workers=0, progress=True, desc="colour consistency", unit="chunk")
    by_shard = {}
    for (path, _, _), part in zip(tasks, parts):
        by_shard.setdefault(Path(path).name, []).append(part)
    out = []
    for shard, g in rows.groupby("shard", sort=False):
        table = pd.concat(by_shard[shard])
        out.append(table.loc[g["index"].to_numpy()].set_axis(g.index))
    return pd.concat(out).loc[rows.index]


def per_core_rates(root: Path, survey, rows, shard_dir: Path, target_fwhm_arcsec: float, n: int = 256) -> dict:
    """cutouts/s of the colour feature and of the ensemble's forward pass on the same ``n`` cutouts of ``rows``,
    held in memory, each on one core (one torch thread; batches of 128 after a warm-up batch)."""
    import json

    import h5py
    import numpy as np
    import torch

    from lens_assets.layout import ensemble_manifest
    from lens_assets.ml.score import load_members, logits_of_batch
    from lens_assets.science.galaxy_colour import arc_colour_table, survey_colour_kwargs

    manifest = json.loads((root / Path(*ensemble_manifest(survey.name))).read_text())
    members = load_members([root / m["checkpoint"] for m in manifest["members"]], device="cpu")
    arrays = {k: [] for k in ("images", "variance", "fwhm_before", "band_flags")}
    for shard, g in rows.head(n).groupby("shard", sort=False):
        with h5py.File(shard_dir / shard, "r") as f:
            idx = np.sort(g["index"].to_numpy())
            for k in arrays:
                arrays[k].append(f[k][idx])
    a = {k: np.concatenate(v) for k, v in arrays.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def forward(lo, hi):  # FiLM members need the observing conditions too
            logits_of_batch(members, a["images"][lo:hi], a["variance"][lo:hi], device="cpu",
                            fwhm_before=a["fwhm_before"][lo:hi], band_flags=a["band_flags"][lo:hi])

        forward(0, 32)
        t0 = time.perf_counter()
        for i in range(0, len(a["images"]), 128):
            forward(i, i + 128)
        finder = len(a["images"]) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    arc_colour_table(a["images"], a["variance"], **survey_colour_kwargs(survey, target_fwhm_arcsec))
    colour = len(a["images"]) / (time.perf_counter() - t0)
    return {"finder_per_core": finder, "colour_per_core": colour}


def _auroc(labels, scores) -> float:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def evaluate(table, train_mask) -> tuple[list[dict], list[float]]:
    """Per-set AUROCs of the finder, the colour feature and their fusion (fitted on ``train_mask`` rows)."""
    from lens_assets.ml.score import fit_fusion

    t = table.copy()
    t["colour_defined"] = (t["colour_gate"] == "ok").astype(float)
    t["colour_consistency_filled"] = t["colour_consistency"].fillna(0.5)
    x = t[list(FEATURES)].to_numpy(float)
    # score_calibrator's val_weights fusion (a logistic regression) with the colour columns as two more inputs
    fusion = fit_fusion(x[train_mask], t["label"].to_numpy()[train_mask], method="val_weights")
    t["fused"] = fusion(x)
    from lens_assets.science.metrics import bologna_metrics

    rows = []
    for name, g in t[~train_mask].groupby("set", sort=False):
        ok = g["colour_gate"] == "ok"
        lenses = g["label"] == 1
        row = {"set": name, "n": len(g), "finder_auroc": _auroc(g["label"], g["logit"]),
               "colour_auroc_where_defined": _auroc(g["label"][ok], g["colour_consistency"][ok]),
               "defined_lenses": float(ok[lenses].mean()), "defined_nonlenses": float(ok[~lenses].mean()),
               "point_images_gated": float((g["colour_gate"] == "point_images").mean()),
               "fused_auroc": _auroc(g["label"], g["fused"])}
        for model, score in (("finder", "logit"), ("fused", "fused")):  # the report's TPR10 and faint-arc FNR
            if g["label"].nunique() == 2:
                m = bologna_metrics(g["label"].to_numpy(), g[score].to_numpy(), flux_ratio=g["flux_ratio"].to_numpy())
                row[f"{model}_tpr10"], row[f"{model}_fnr_lt_0.1"] = m["tpr10"], m["fnr_flux_ratio_lt_0.1"]
        rows.append(row)
    return rows, list(fusion.weights)


def _pipeline_root(args, work: Path) -> tuple[Path, dict]:
    """Run the graph at the demo's sizes (``bench_ablation.run_lever``): its data root and its ablation row."""
    from bench_ablation import run_lever

    ns = argparse.Namespace(survey=args.survey, n_cutouts=args.n_cutouts, n_heldout=args.n_heldout,
                            heldout=["galsim"], n_pairs=args.n_pairs, members=["regnetx_002"], epochs=args.epochs,
                            max_minutes=0.0, seed=args.seed)
    row = run_lever("physical", ns, work)
    return work / "physical", row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="data root of a survey_pipeline run (default: run one)")
    ap.add_argument("--survey", default="des")
    ap.add_argument("--n-cutouts", type=int, default=4000)
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--n-pairs", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, row = (Path(args.root), {}) if args.root else _pipeline_root(args, Path(tmp))
        return run(root, args.survey, shortcut_auroc=row.get("shortcut_auroc"))


def run(root: Path, survey_name: str, *, shortcut_auroc: float | None = None) -> dict:
    import numpy as np
    import pandas as pd

    from lens_assets.layout import ensemble_scores, shards_dir, shards_rows
    from lens_assets.science.shards import read_manifest
    from lens_assets.science.surveys import get_survey

    survey = get_survey(survey_name)
    shard_dir = root / Path(*shards_dir(survey.name))
    scores = pd.read_parquet(root / Path(*ensemble_scores(survey.name)))
    rows = pd.read_parquet(root / Path(*shards_rows(survey.name)))[["objid", "shard", "index"]]
    table = scores.merge(rows, on="objid", how="inner", validate="one_to_one")
    if len(table) != len(scores):
        raise SystemExit(f"{len(scores) - len(table)} scored rows of {root} have no shard row")
    # val and test splits of the training population; each held-out family; the lens/twin pairs (split lensing_only)
    table["set"] = np.where(table["split"] == "heldout", table["sim_family"], table["split"])
    target = float(read_manifest(shard_dir)["settings"]["target_fwhm_arcsec"])
    t0 = time.perf_counter()
    colour = colour_features(table, shard_dir, survey, target)
    seconds = time.perf_counter() - t0
    table = pd.concat([table.reset_index(drop=True), colour.reset_index(drop=True)], axis=1)
    train = ((table["split"] == "val") & (table["val_role"] == "calibrate")).to_numpy()
    table.loc[(table["split"] == "val") & ~train, "set"] = "val_stop"  # the half the fusion is not fitted on
    results, weights = evaluate(table, train)
    rates = per_core_rates(root, survey, table, shard_dir, target)
    rate = len(table) / seconds
    lines = [(r["set"], f"n {r['n']}: finder {r['finder_auroc']:.3f}, colour {r['colour_auroc_where_defined']:.3f} "
                        f"where defined (lenses {r['defined_lenses']:.0%}, non-lenses {r['defined_nonlenses']:.0%}; "
                        f"point images gated {r['point_images_gated']:.0%}), fused {r['fused_auroc']:.3f}; TPR10 "
                        f"{r.get('finder_tpr10', float('nan')):.3f} -> {r.get('fused_tpr10', float('nan')):.3f}, "
                        f"FNR(<0.1) {r.get('finder_fnr_lt_0.1', float('nan')):.3f} -> "
                        f"{r.get('fused_fnr_lt_0.1', float('nan')):.3f}")
             for r in results]
    lines.append(("fusion weights", ", ".join(f"{n} {w:+.3f}" for n, w in zip(FEATURES, weights))))
    ratio = rates["finder_per_core"] / rates["colour_per_core"]
    lines.append(("per core", f"colour {rates['colour_per_core']:.1f} cutouts/s, the finder's forward pass "
                              f"{rates['finder_per_core']:.0f} cutouts/s on the same cutouts in memory: the feature "
                              f"costs {ratio:.0f}x the finder"))
    lines.append(("all rows", f"colour {rate:.1f} cutouts/s on {cores()} cores, shard reads included"))
    if shortcut_auroc is not None:
        lines.append(("shortcut AUROC", f"{shortcut_auroc:.3f} (the training population's; the feature changes "
                                        f"no training)"))
    record = {"root": str(root), "sets": results, "fusion_weights": dict(zip(FEATURES, weights)),
              "colour_cutouts_per_s": rate, **rates, "cost_ratio_per_core": ratio, "target_fwhm_arcsec": target,
              "shortcut_auroc": shortcut_auroc}
    report(f"galaxy_colour_{survey.name}", lines, record)
    return record


if __name__ == "__main__":
    main()
