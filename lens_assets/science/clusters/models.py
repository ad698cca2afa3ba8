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
  ranks as P(lens));
* ``anomaly``: Deep SVDD (:mod:`.anomaly`) on every feature, fit on the training
  split's non-lens fields only (a one-class backstop that needs no lens
  labels); its logit is the standardized anomaly score (0 = a typical training
  non-lens), its probability an isotonic calibrator's on the ``calibrate`` rows.
  Missing features are imputed by the training median: the counts (fit rows,
  calibrate rows, each scored set) go to the notes.

:func:`component_table` lays the val/test/held-out fields out one per row with
the components a fusion combines (``track_a`` logit, ``anomaly``,
``colour_consistency``, plus e.g. Track B's logits merged on ``objid``);
:func:`fuse_scores` fits :func:`.fusion.fit_fusion` on its val ``calibrate``
rows (weights, and a calibrator on their out-of-fold fused scores; the ``stop``
rows, where the tracks early-stop and pick checkpoints, are not used) and
returns the ``fused`` model's score rows, recording the NaN it imputed in each
scored set (``Fusion.n_imputed_scored``) or refusing them for ``required``
components.

Scores are a long table: one row per (model, scored field), ``set`` the test
split or the held-out family's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..calibration import fit_calibrator
from .anomaly import DeepSVDD, fit_deep_svdd
from .features import FEATURE_MONOTONE, cluster_feature_names
from .fusion import Fusion, fit_fusion
from .pu import fit_pu, pu_xgboost_fit_fn, simulate_pu_labels
from .track_a import TrackAConfig, calibrate_track_a, fit_track_a

__all__ = ["colour_features", "fit_cluster_models", "ClusterModels", "TRUTH_COLUMNS", "component_table",
           "fuse_scores", "FUSION_COMPONENTS", "FEATURE_COMPONENTS", "SCORE_COLUMNS"]

TRUTH_COLUMNS = ("objid", "label", "sim_family", "sim_kind", "theta_e", "n_arcs", "arc_sb")
SCORE_COLUMNS = ("model", "set", *TRUTH_COLUMNS, "logit", "prob")
# the components fuse_scores combines by default, those present in the component table
FUSION_COMPONENTS = ("track_a", "track_b", "field_view", "colour_consistency", "anomaly")
# those of them that are a feature of the component table, not a model with rows of its own in the scores
FEATURE_COMPONENTS = ("colour_consistency",)


def colour_features(bands) -> list[str]:
    """The features that use the segments' colours (dropped by the colour ablation)."""
    return [c for c in cluster_feature_names(bands)
            if c.startswith(("colour_", "median_colour_")) or c == "radial_colour_gradient"]


@dataclass
class ClusterModels:
    track_a: dict = field(default_factory=dict)  # name -> TrackAModel
    calibrators: dict = field(default_factory=dict)  # name -> Calibrator
    pu: dict = field(default_factory=dict)  # name -> PUModel
    anomaly: DeepSVDD | None = None  # Deep SVDD on the training non-lenses (its calibrator: calibrators["anomaly"])
    scores: pd.DataFrame | None = None
    notes: list = field(default_factory=list)


def _set_names(rows: pd.DataFrame) -> np.ndarray:
    """``set`` of each row: "val", "test", or the held-out family's name."""
    return np.where(rows["split"] == "heldout", rows["sim_family"], rows["split"]).astype(object)


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
    train_nonlens = train[train["label"].to_numpy(int) == 0]
    out.anomaly = fit_deep_svdd(train_nonlens[feats], seed=seed)
    out.notes += [f"anomaly: {n}" for n in out.anomaly.notes]
    sets = _set_names(scored)
    for name, part in (("val calibrate", cal), *((s, scored[sets == s]) for s in pd.unique(sets))):
        imputed = out.anomaly.n_imputed(part[feats])
        if imputed:
            out.notes.append(f"anomaly: {sum(imputed.values())} missing features of the {len(part)} {name} rows "
                             f"scored with the training median: {imputed}")
    anomaly_cal = fit_calibrator(out.anomaly.standardized_score(cal[feats]), cal["label"].to_numpy(int),
                                 method="isotonic")
    out.calibrators["anomaly"] = anomaly_cal
    z = out.anomaly.standardized_score(scored[feats])
    add("anomaly", z, anomaly_cal.predict(z))
    out.scores = pd.concat(rows, ignore_index=True) if rows else None
    return out


def component_table(table: pd.DataFrame, models: ClusterModels, extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per val, test and held-out field of ``table`` with the components a fusion combines.

    Columns: ``split``, ``val_role``, ``set`` ("val", "test" or the held-out
    family), the :data:`TRUTH_COLUMNS`, and the components ``track_a`` (the
    logit of ``models.track_a["track_a"]``), ``anomaly`` (``models.anomaly``'s
    standardized score), ``anomaly_n_imputed`` (how many of the field's features
    the anomaly model imputed by the training median; not a component),
    ``colour_consistency`` (the feature, NaN where a field
    has fewer than two usable segments), then every column of ``extra`` but
    ``objid`` (e.g. ``track_b``: Track B's per-field logits), merged on
    ``objid``; a field ``extra`` lacks gets NaN there.
    """
    need = [c for c in ("split", "val_role", "colour_consistency", *TRUTH_COLUMNS) if c not in table]
    if need:
        raise ValueError(f"features table lacks columns {need}")
    if "track_a" not in models.track_a or models.anomaly is None:
        raise ValueError("component_table needs models from fit_cluster_models: a 'track_a' model and the anomaly "
                         f"model (got track_a models {sorted(models.track_a)}, anomaly "
                         f"{'present' if models.anomaly is not None else 'None'})")
    rows = table[table["split"].isin(["val", "test", "heldout"])]
    out = rows[["split", "val_role", *TRUTH_COLUMNS]].reset_index(drop=True)
    out.insert(2, "set", _set_names(rows))
    out["track_a"] = models.track_a["track_a"].logit(rows)
    out["anomaly"] = models.anomaly.standardized_score(rows)
    names = models.anomaly.columns
    out["anomaly_n_imputed"] = rows[names].isna().sum(axis=1).to_numpy(int) if names else 0
    out["colour_consistency"] = rows["colour_consistency"].to_numpy(dtype=float, na_value=np.nan)
    if extra is not None:
        if "objid" not in extra:
            raise ValueError(f"extra needs an objid column to merge on, has {list(extra.columns)}")
        dup = extra["objid"][extra["objid"].duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"extra holds objids more than once: {dup[:5]}")
        clash = sorted(set(extra.columns) - {"objid"} & set(out.columns))
        if clash:
            raise ValueError(f"extra's columns {clash} are already in the component table")
        out = out.merge(extra, on="objid", how="left", validate="one_to_one")
    return out


def fuse_scores(components_table: pd.DataFrame, *, components=None, max_fpr: float = 0.1, seed: int = 0,
                required=(), **fusion_options) -> tuple[pd.DataFrame, Fusion]:
    """Fit :func:`.fusion.fit_fusion` on the val ``calibrate`` rows of a :func:`component_table` and score its
    test and held-out rows: the long score rows of model ``fused`` (columns :data:`SCORE_COLUMNS`, like
    ``ClusterModels.scores``) and the fitted :class:`.fusion.Fusion`.

    ``components``: the columns to fuse; None takes those of
    :data:`FUSION_COMPONENTS` the table has (so a table without ``track_b`` is
    fused without it, which the fusion's notes say). ``required``: components
    that must be present (not NaN) in every row of the table (val, test and
    held-out): a NaN there is a ValueError naming the component and the first
    objids. Other NaN are imputed by the fit rows' median, and counted per scored
    set and component in ``fusion.n_imputed_scored`` (``{set: {component: n}}``)
    and the notes. ``fusion_options`` go to :func:`.fusion.fit_fusion`
    (``objective``, ``tau``, ``n_random``, ``calibration``, ``fit_role``, ``n_folds``).
    """
    if components is None:
        components = [c for c in FUSION_COMPONENTS if c in components_table]
        absent = [c for c in FUSION_COMPONENTS if c not in components_table]
    else:
        absent = []
    missing = [c for c in ("set", *TRUTH_COLUMNS) if c not in components_table]
    if missing:
        raise ValueError(f"the component table lacks columns {missing}")
    required = [required] if isinstance(required, str) else list(required)
    not_fused = [c for c in required if c not in components]
    if not_fused:
        raise ValueError(f"required components {not_fused} are not among the fused components {list(components)}")
    for c in required:
        if c not in components_table:
            raise ValueError(f"the component table lacks the required component column {c!r}")
        nan = components_table[c].isna().to_numpy()
        if nan.any():
            objids = components_table.loc[nan, "objid"].tolist()
            raise ValueError(f"required component {c!r} is missing (NaN) for {len(objids)} fields, e.g. objids "
                             f"{objids[:5]}")
    fusion = fit_fusion(components_table, components, max_fpr=max_fpr, seed=seed, **fusion_options)
    if absent:
        fusion.notes.append(f"fused without {absent}: not in the component table")
    scored = components_table[components_table["split"].isin(["test", "heldout"])]
    fusion.n_imputed_scored = {}
    for name in pd.unique(scored["set"]):
        counts = fusion.n_imputed(scored[scored["set"] == name])
        fusion.n_imputed_scored[str(name)] = counts
        if any(counts.values()):
            n = int((scored["set"] == name).sum())
            fusion.notes.append(f"scoring {name} ({n} rows): NaN imputed by the fit rows' median: "
                                + ", ".join(f"{c} {k}" for c, k in counts.items() if k))
    out = scored[["set", *TRUTH_COLUMNS]].reset_index(drop=True)
    out.insert(0, "model", "fused")
    z = fusion.logit(scored)
    out["logit"], out["prob"] = z, fusion.calibrator.predict(z)
    return out[list(SCORE_COLUMNS)], fusion
