"""Train and score Track B of the cluster track (the MIL model of :mod:`lens_assets.ml.mil`): CLI or Pipes job.

    python -m lens_assets.ml.train_mil --bags data/clusters/models/des/track_b/bags.npz \\
        --table data/clusters/features/des/cluster_features.parquet --out runs/des/track_b --epochs 8

Reads the bag cache (cut once by the ``cluster_track_b`` asset) and the features
table (``objid``, ``label``, ``split``, ``val_role`` and the truth columns),
trains on the ``train`` split with the best checkpoint by AUROC on the
val/``stop`` rows, then scores with that checkpoint and writes:

* ``scores``: Track A's long format (``model, set, objid, label, sim_family,
  sim_kind, theta_e, n_arcs, arc_sb, logit, prob``), ``model = "track_b"``, ``set``
  ``"test"`` or the held-out family's name; ``prob`` is isotonic-calibrated on
  the val/``calibrate`` rows (as Track A's), or ``sigmoid(logit)`` when those rows
  lack a class (``calibration`` in the summary says which);
* ``val_scores``: the same columns for the val rows, ``set`` ``"val_stop"`` or
  ``"val_calibrate"`` (what a fusion of the tracks is fit on);
* ``attention``: one row per scored instance: ``objid, set, instance,
  segment_id, x_px, y_px, attention`` (``segment_id`` -1: the central stamp of a
  field without segments);
* ``calibrator``: the calibrator's JSON (``science.calibration.Calibrator``), when
  one was fit.

With ``pu_labeled`` in the settings, one Elkan–Noto PU model per ``n``
(:func:`.mil.train_pu_mil`: the same network and training loop on ``n`` labeled
lenses of the train split against the unlabeled rest, early-stopped on PU labels
of the val/``stop`` rows) adds rows of model ``pu_b_<n>`` to ``scores`` (the
same test and held-out fields as ``track_b``): ``logit`` is the logit of g =
P(labeled | field), ``prob`` P(lens) = g / c by :mod:`lens_assets.science.clusters.pu`'s
conversion, c estimated on held-out labeled lenses. Its checkpoint is
``pu_b_<n>.ckpt`` beside ``checkpoint``. An ``n`` above the train split's lenses
is skipped with a note (``notes`` in the summary), as Track A's ``pu_<n>``;
``val_scores`` keeps no PU rows.

When the bag cache holds field overviews and ``settings.field_view`` is on, the
field-view model (``settings.field_view_settings()``: the same network and loop
on one instance per field, the overview) is trained, selected on the val/``stop``
rows and calibrated on the val/``calibrate`` rows like ``track_b``; its rows,
model ``field_view``, join ``scores`` and ``val_scores``, and its checkpoint is
``field_view.ckpt`` beside ``checkpoint`` (:func:`field_view_checkpoint`).
``max_minutes`` bounds each network's training, not their sum.

Launched by Dagster Pipes (``cluster_track_b``), the paths and settings come from
the extras and the summary goes back as a custom message (as :mod:`.train`,
whose :func:`~.train.launched_by_pipes` it uses). A run starts from scratch: a
previous checkpoint at the path is replaced (no resume).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

__all__ = ["run", "default_outputs", "OUTPUTS", "FIELD_VIEW_CHECKPOINT", "field_view_checkpoint"]

OUTPUTS = ("checkpoint", "scores", "val_scores", "attention", "calibrator")
FIELD_VIEW_CHECKPOINT = "field_view.ckpt"  # the field-view model's file, beside Track B's checkpoint


def default_outputs(out_dir: str | Path) -> dict:
    """The output paths of a CLI run into ``out_dir`` (the asset passes the layout's paths instead)."""
    out = Path(out_dir)
    return {"checkpoint": out / "best.ckpt", "scores": out / "scores.parquet", "val_scores": out / "val_scores.parquet",
            "attention": out / "attention.parquet", "calibrator": out / "calibrator.json"}


def _set_names(part):
    import numpy as np

    split, role = part["split"].to_numpy(), part["val_role"].to_numpy()
    return np.where(split == "test", "test", np.where(split == "val", "val_" + role.astype(str), part["sim_family"]))


def run(bags_path: str | Path, table_path: str | Path, outputs: dict, settings, report=None) -> dict:
    """Train (:func:`.mil.train_mil`), score the val, test and held-out rows with the best checkpoint
    (:func:`.mil.score_mil`), calibrate, and write ``outputs`` (:data:`OUTPUTS` -> path); returns the summary.
    ``report``: a line per epoch of every model trained (:func:`.progress.epoch_line`, after the model's name)."""
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    from lens_assets.science.clusters.models import TRUTH_COLUMNS
    from lens_assets.science.fileio import atomic_path, write_json_atomic

    from .mil import read_bag_cache, score_mil, train_mil

    missing = [k for k in OUTPUTS if k not in outputs]
    if missing:
        raise ValueError(f"outputs lack paths for {missing}")
    outputs = {k: Path(v) for k, v in outputs.items()}
    bags = read_bag_cache(bags_path)
    table = pd.read_parquet(table_path)
    need = [*TRUTH_COLUMNS, "split", "val_role"]
    if [c for c in need if c not in table.columns]:
        raise ValueError(f"{table_path}: lacks columns {[c for c in need if c not in table.columns]}")
    summary = train_mil(settings, bags=bags, table=table, checkpoint_path=outputs["checkpoint"], report=report)
    scored = table[table["split"].isin(["test", "heldout", "val"])].reset_index(drop=True)
    gpu = summary["device"] == "cuda"
    logits, attention = score_mil(summary["checkpoint"], bags, rows=bags.index_of(list(scored["objid"])),
                                  device="cuda" if gpu else "cpu", precision=settings.precision)
    sets = _set_names(scored)
    calibrator, prob, calibration = _calibrate(logits, sets, scored["label"].to_numpy(int))
    if calibrator is not None:
        write_json_atomic(outputs["calibrator"], calibrator.to_dict())
    else:
        outputs["calibrator"].unlink(missing_ok=True)
    frame = scored[list(TRUTH_COLUMNS)].copy()
    frame.insert(0, "model", "track_b")
    frame.insert(1, "set", sets)
    frame["logit"], frame["prob"] = logits, prob
    is_val = np.char.startswith(sets.astype(str), "val_")
    pu_frames, pu_summaries, notes = _pu_models(settings, bags, table, scored[~is_val], frame[~is_val],
                                                 outputs["checkpoint"], gpu=gpu, report=report)
    view_frame, view_summary = _field_view(settings, bags, table, scored, frame, outputs, gpu=gpu, report=report)
    if view_frame is not None:
        pu_frames.append(view_frame[~is_val])
    val_part = frame[is_val] if view_frame is None else pd.concat([frame[is_val], view_frame[is_val]])
    for key, part in (("scores", pd.concat([frame[~is_val], *pu_frames])), ("val_scores", val_part)):
        with atomic_path(outputs[key]) as tmp:
            part.reset_index(drop=True).to_parquet(tmp, index=False)
    rows = []
    for i, (objid, b) in enumerate(zip(scored["objid"], bags.index_of(list(scored["objid"])))):
        sl = bags.instances(int(b))
        n = sl.stop - sl.start
        rows.append(pd.DataFrame({"objid": objid, "set": sets[i], "instance": np.arange(n),
                                  "segment_id": bags.segment_id[sl], "x_px": bags.xy_px[sl, 0],
                                  "y_px": bags.xy_px[sl, 1], "attention": attention[i, :n]}))
    with atomic_path(outputs["attention"]) as tmp:
        pd.concat(rows, ignore_index=True).to_parquet(tmp, index=False)

    def auroc(sel):
        y = frame.loc[sel, "label"].to_numpy(int)
        return float(roc_auc_score(y, frame.loc[sel, "logit"])) if 0 < y.sum() < len(y) else None

    heldout = sorted(set(sets[scored["split"] == "heldout"]))
    summary.update({
        "test_auroc": auroc(sets == "test"), "n_test": int((sets == "test").sum()),
        "heldout_auroc": {f: auroc(sets == f) for f in heldout},
        "n_heldout": {f: int((sets == f).sum()) for f in heldout},
        "calibration": calibration, "cuda_available": bool(torch.cuda.is_available()),
        "outputs": {k: str(v) for k, v in outputs.items() if k != "calibrator" or calibrator is not None},
        "pu": pu_summaries, "notes": notes, "field_view": view_summary,
    })
    return summary


def _calibrate(logits, sets, labels):
    """(calibrator or None, prob, how): isotonic on the rows of set ``val_calibrate``, or ``sigmoid(logit)`` when
    those rows lack a class; the same for Track B and the field view."""
    import numpy as np

    from lens_assets.science.calibration import fit_calibrator

    cal = np.asarray(sets) == "val_calibrate"
    y_cal = np.asarray(labels, dtype=int)[cal]
    if len(np.unique(y_cal)) == 2:
        calibrator = fit_calibrator(logits[cal], y_cal, method="isotonic")
        return calibrator, calibrator.predict(logits), f"isotonic on {int(cal.sum())} val/calibrate rows"
    return None, 1.0 / (1.0 + np.exp(-logits)), (f"sigmoid(logit): the {int(cal.sum())} val/calibrate rows hold "
                                                 f"labels {sorted(set(y_cal.tolist()))}, not both")


def field_view_checkpoint(checkpoint: str | Path) -> Path:
    """The field-view model's checkpoint, beside Track B's."""
    return Path(checkpoint).with_name(FIELD_VIEW_CHECKPOINT)


def _field_view(settings, bags, table, scored, frame, outputs, *, gpu: bool, report=None):
    """The field-view model (``settings.field_view_settings()`` on ``bags.overview_bags()``): trained like Track
    B, scored on ``scored``'s rows and calibrated (isotonic) on the val/calibrate rows. Returns (a frame like
    ``frame`` with model ``field_view``, its summary), or (None, None) when the settings turn it off or the cache
    has no overviews (its old checkpoint is then removed)."""
    from sklearn.metrics import roc_auc_score

    from .mil import score_mil, train_mil

    checkpoint = field_view_checkpoint(outputs["checkpoint"])
    if not settings.field_view or bags.overview is None:
        checkpoint.unlink(missing_ok=True)
        return None, None
    views = bags.overview_bags()
    s = train_mil(settings.field_view_settings(), bags=views, table=table, checkpoint_path=checkpoint,
                  model_name="field_view", report=report)
    logits, _ = score_mil(s["checkpoint"], views, rows=views.index_of(list(scored["objid"])),
                          device="cuda" if gpu else "cpu", precision=settings.precision)
    part = frame.copy()
    part["model"] = "field_view"
    part["logit"] = logits
    _, part["prob"], s["calibration"] = _calibrate(logits, part["set"].to_numpy(), part["label"].to_numpy(int))
    test = (part["set"] == "test").to_numpy()
    y = part.loc[test, "label"].to_numpy(int)
    s["test_auroc"] = float(roc_auc_score(y, logits[test])) if 0 < y.sum() < len(y) else None
    s["overview_px"] = views.stamp_px
    return part, s


def _pu_models(settings, bags, table, scored, frame, checkpoint, *, gpu: bool, report=None):
    """One :func:`.mil.train_pu_mil` per ``settings.pu_labeled``: (score frames like ``frame`` with model
    ``pu_b_<n>``, {model: summary with its test AUROC}, notes). ``scored``/``frame``: the test and held-out rows."""
    import numpy as np
    from scipy.special import expit
    from sklearn.metrics import roc_auc_score

    from .mil import pu_model_name, score_mil, train_pu_mil

    checkpoint = Path(checkpoint)
    for old in checkpoint.parent.glob("pu_b_*.ckpt"):  # a previous run's PU models
        old.unlink()
    n_lenses = int((table.loc[table["split"] == "train", "label"].to_numpy(int) == 1).sum())
    frames, summaries, notes = [], {}, []
    rows = bags.index_of(list(scored["objid"]))
    for n in settings.pu_labeled:
        name = pu_model_name(n)
        if n > n_lenses:
            notes.append(f"{name}: skipped, the training split has {n_lenses} lenses")
            continue
        pu, s = train_pu_mil(settings, bags=bags, table=table, n_labeled=n,
                             checkpoint_path=checkpoint.with_name(f"{name}.ckpt"), report=report)
        logits, _ = score_mil(s["checkpoint"], bags, rows=rows, device="cuda" if gpu else "cpu",
                              precision=settings.precision)
        part = frame.copy()
        part["model"] = name
        part["logit"], part["prob"] = logits, pu.prob_from_g(expit(logits))
        test = (part["set"] == "test").to_numpy()
        y = part.loc[test, "label"].to_numpy(int)
        s["test_auroc"] = float(roc_auc_score(y, logits[test])) if 0 < y.sum() < len(y) else None
        frames.append(part)
        summaries[name] = s
    return frames, summaries, notes


def _settings(values: dict):
    from .mil import MILSettings

    return MILSettings(**values)


def pipes_main() -> None:
    """Under Dagster Pipes: extras ``bags_path``, ``table_path``, ``outputs`` (name -> path), ``settings``."""
    from dagster_pipes import open_dagster_pipes

    from .progress import figure

    with open_dagster_pipes() as pipes:
        ex = pipes.extras
        settings = _settings({**ex.get("settings", {}), "progress": False})
        pipes.log.info(f"training track_b ({settings.backbone}) for {settings.epochs} epochs on {ex['bags_path']}")
        summary = run(ex["bags_path"], ex["table_path"], ex["outputs"], settings, report=pipes.log.info)
        pipes.log.info(f"track_b: best val AUROC {figure(summary['best_val_auroc'])}, "
                       f"test AUROC {figure(summary['test_auroc'])}, "
                       f"{summary['train_instances_per_s']:.0f} instances/s on {summary['device']} "
                       f"({summary['precision']})")
        for name, pu in summary["pu"].items():
            pipes.log.info(f"{name}: c {pu['c']:.3f} from {pu['n_labeled_holdout']} held-out labeled lenses, "
                           f"test AUROC {figure(pu['test_auroc'])}")
        if summary.get("field_view"):
            v = summary["field_view"]
            pipes.log.info(f"field_view ({v['settings']['backbone']}, {v['overview_px']} px overviews): best val "
                           f"AUROC {figure(v['best_val_auroc'])}, test AUROC {figure(v['test_auroc'])}")
        for note in summary["notes"]:
            pipes.log.info(note)
        pipes.report_custom_message(summary)


def main(argv=None) -> dict:
    from .mil import MILSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", required=True, help="bag cache (.npz) written by cluster_track_b / build_bag_cache")
    ap.add_argument("--table", required=True, help="cluster features table with split and val_role")
    ap.add_argument("--out", required=True, help="folder of the checkpoint, scores, attention and calibrator")
    defaults = asdict(MILSettings())
    for name, default in defaults.items():
        if isinstance(default, list):  # pu_labeled
            ap.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="*", default=default)
        elif isinstance(default, bool):
            ap.add_argument(f"--{name.replace('_', '-')}", type=lambda v: v.lower() in ("1", "true", "yes"),
                            default=default)
        else:
            ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(ap.parse_args(argv))
    summary = run(args["bags"], args["table"], default_outputs(args["out"]),
                  _settings({k: args[k] for k in defaults}))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from .train import launched_by_pipes

    pipes_main() if launched_by_pipes() else main()
