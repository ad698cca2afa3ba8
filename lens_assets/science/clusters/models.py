"""The cluster track's models on the features table: Track A with full labels, without colours, and PU-trained.

:func:`fit_cluster_models` trains, from one features table with a ``split``
column (``train``; ``val`` with ``val_role`` ``stop``/``calibrate``; ``test``;
held-out families under ``heldout``):

* ``track_a``: XGBoost on every feature, monotone where physics gives the sign
  (:data:`.features.FEATURE_MONOTONE`), early-stopped on the ``stop`` rows and
  calibrated (isotonic) on the ``calibrate`` rows;
* ``track_a_no_colour``: the same without the colour features (the
  colour-consistency ablation);
* ``pu_<n>`` for each ``n`` of ``pu_labeled``: Elkan–Noto PU learning with ``n``
  labeled lenses among the training fields, the rest unlabeled
  (:mod:`.pu`; its logit is that of g, the probability of being labeled, which
  ranks as P(lens)).

Scores are a long table: one row per (model, scored field), ``set`` the test
split or the held-out family's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .features import FEATURE_MONOTONE, cluster_feature_names
from .pu import fit_pu, pu_xgboost_fit_fn, simulate_pu_labels
from .track_a import TrackAConfig, calibrate_track_a, fit_track_a

__all__ = ["colour_features", "fit_cluster_models", "ClusterModels", "TRUTH_COLUMNS"]

TRUTH_COLUMNS = ("objid", "label", "sim_family", "sim_kind", "theta_e", "n_arcs", "arc_sb")


def colour_features(bands) -> list[str]:
    """The features that use the segments' colours (dropped by the colour ablation)."""
    return [c for c in cluster_feature_names(bands)
            if c.startswith(("colour_", "median_colour_")) or c == "radial_colour_gradient"]


@dataclass
class ClusterModels:
    track_a: dict = field(default_factory=dict)  # name -> TrackAModel
    calibrators: dict = field(default_factory=dict)  # name -> Calibrator
    pu: dict = field(default_factory=dict)  # name -> PUModel
    scores: pd.DataFrame | None = None
    notes: list = field(default_factory=list)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_cluster_models(table: pd.DataFrame, *, bands, config: TrackAConfig = TrackAConfig(),
                       pu_labeled=(10, 50, 200), seed: int = 0) -> ClusterModels:
    """Train the models on ``table``'s splits and score its test rows and held-out families (module docstring)."""
    feats = cluster_feature_names(bands)
    missing = [c for c in (*feats, "split", "val_role", *TRUTH_COLUMNS) if c not in table]
    if missing:
        raise ValueError(f"features table lacks columns {missing}")
    train = table[table["split"] == "train"]
    stop = table[(table["split"] == "val") & (table["val_role"] == "stop")]
    cal = table[(table["split"] == "val") & (table["val_role"] == "calibrate")]
    scored = table[table["split"].isin(["test", "heldout"])]
    for name, part in (("train", train), ("val stop", stop), ("val calibrate", cal)):
        if part["label"].nunique() < 2:
            raise ValueError(f"the {name} rows need lenses and non-lenses, got labels "
                             f"{sorted(part['label'].unique().tolist())} in {len(part)} rows")
    out = ClusterModels()
    rows = []

    def add(name: str, logit: np.ndarray, prob: np.ndarray) -> None:
        part = scored[list(TRUTH_COLUMNS)].copy()
        part.insert(0, "model", name)
        part.insert(1, "set", np.where(scored["split"] == "test", "test", scored["sim_family"]))
        part["logit"], part["prob"] = logit, prob
        rows.append(part)

    no_colour = [c for c in feats if c not in colour_features(bands)]
    for name, cols in (("track_a", feats), ("track_a_no_colour", no_colour)):
        model = fit_track_a(train[cols], train["label"], stop[cols], stop["label"], config=config,
                            monotone=FEATURE_MONOTONE)
        calib = calibrate_track_a(model, cal[cols], cal["label"], method="isotonic")
        out.track_a[name], out.calibrators[name] = model, calib
        z = model.logit(scored[cols])
        add(name, z, calib.predict(z))
    y_train = train["label"].to_numpy(int)
    for n in pu_labeled:
        if n > int((y_train == 1).sum()):
            out.notes.append(f"pu_{n}: skipped, the training split has {int((y_train == 1).sum())} lenses")
            continue
        s = simulate_pu_labels(y_train, n, seed=seed)
        pu = fit_pu(train[feats], s, fit_fn=pu_xgboost_fit_fn(config, monotone=FEATURE_MONOTONE), seed=seed)
        out.pu[f"pu_{n}"] = pu
        g = np.asarray(pu.g(scored[feats]), dtype=float)
        add(f"pu_{n}", _logit(g), pu.prob(scored[feats]))
    out.scores = pd.concat(rows, ignore_index=True) if rows else None
    return out
