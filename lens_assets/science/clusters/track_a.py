"""Track A: a gradient-boosted (XGBoost) lens classifier on one row of physics features per cluster field.

Features are a pandas DataFrame (``colour_consistency``, ``tangential_alignment``,
``arc_curvature``, ``n_segments``, ``seeing_arcsec``, ...; NaN means missing and
follows XGBoost's learned default branch). Physics priors enter as monotone
constraints, feature name -> +1 (the lens probability never decreases with it) or
-1 (never increases). Early stopping uses a separate stop set; calibration must
then use a third set of rows (:func:`calibrate_track_a`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ..calibration import Calibrator, fit_calibrator

__all__ = ["TrackAConfig", "TrackAModel", "fit_track_a", "calibrate_track_a", "plot_partial_dependence",
           "EVAL_METRICS"]

EVAL_METRICS = ("aucpr", "logloss")


@dataclass(frozen=True)
class TrackAConfig:
    """Hyper-parameters of the track-A booster (XGBoost ``hist`` trees, ``binary:logistic``).

    ``scale_pos_weight``: "auto" (n_negative / n_positive of the training rows,
    counted without sample weights) or a positive number. ``monotone``: apply the
    ``monotone`` mapping given to :func:`fit_track_a` (False trains unconstrained).
    ``eval_metric`` (early stopping on the stop set): "aucpr" (default; ranking only,
    so unaffected by the log(scale_pos_weight) offset that up-weighting lenses puts
    on the margin) or "logloss" (sensible when scale_pos_weight is 1).
    ``early_stopping_rounds`` None trains all ``n_estimators`` trees.
    """

    n_estimators: int = 400
    learning_rate: float = 0.05
    max_depth: int = 4
    min_child_weight: float = 1.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    early_stopping_rounds: int | None = 30
    scale_pos_weight: str | float = "auto"
    monotone: bool = True
    eval_metric: str = "aucpr"
    seed: int = 0
    n_jobs: int = 1

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrackAConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        need(is_int(self.n_estimators) and self.n_estimators >= 1, "n_estimators", "an integer >= 1")
        need(is_num(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a number > 0")
        need(is_int(self.max_depth) and self.max_depth >= 1, "max_depth", "an integer >= 1")
        need(is_num(self.min_child_weight) and self.min_child_weight >= 0, "min_child_weight", "a number >= 0")
        need(is_num(self.subsample) and 0 < self.subsample <= 1, "subsample", "in (0, 1]")
        need(is_num(self.colsample_bytree) and 0 < self.colsample_bytree <= 1, "colsample_bytree", "in (0, 1]")
        need(self.early_stopping_rounds is None or (is_int(self.early_stopping_rounds)
                                                    and self.early_stopping_rounds >= 1),
             "early_stopping_rounds", "None or an integer >= 1")
        need(self.scale_pos_weight == "auto" or (is_num(self.scale_pos_weight) and self.scale_pos_weight > 0
                                                 and math.isfinite(self.scale_pos_weight)),
             "scale_pos_weight", "'auto' or a finite number > 0")
        need(isinstance(self.monotone, bool), "monotone", "True or False")
        need(self.eval_metric in EVAL_METRICS, "eval_metric", f"one of {list(EVAL_METRICS)}")
        need(is_int(self.seed), "seed", "an integer")
        need(is_int(self.n_jobs) and self.n_jobs >= 1, "n_jobs", "an integer >= 1")


def _features(X, what: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A float copy of ``X`` (a DataFrame), its columns reordered to ``columns`` when given (extra ones dropped)."""
    if not isinstance(X, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame of features, got {type(X).__name__}")
    names = list(X.columns)
    bad = [c for c in names if not isinstance(c, str)]
    if bad:
        raise ValueError(f"{what}: feature names must be strings, got {bad[:5]}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"{what}: duplicated columns {dup}")
    if columns is not None:
        missing = [c for c in columns if c not in X.columns]
        if missing:
            raise ValueError(f"{what} lacks the model's feature columns {missing}")
        names = list(columns)
    out = {}
    for c in names:
        col = X[c]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            raise ValueError(f"{what}: column {c!r} has dtype {col.dtype}; features must be numeric (NaN = missing)")
        out[c] = col.to_numpy(dtype=float, na_value=np.nan)
    return pd.DataFrame(out, columns=names)


def _labels(y, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what} has shape {y.shape}, expected ({n},) to match its features")
    if not np.isin(y, (0, 1)).all():
        bad = [v.item() if hasattr(v, "item") else v for v in pd.unique(y[~np.isin(y, (0, 1))])]
        raise ValueError(f"{what} must hold 0 (non-lens) or 1 (lens), got values {bad[:5]}")
    return y.astype(int)


def _classifier(config: TrackAConfig, constraints: tuple, scale_pos_weight: float, *, early_stopping: bool):
    from xgboost import XGBClassifier

    return XGBClassifier(
        n_estimators=config.n_estimators, learning_rate=config.learning_rate, max_depth=config.max_depth,
        min_child_weight=config.min_child_weight, subsample=config.subsample,
        colsample_bytree=config.colsample_bytree, scale_pos_weight=scale_pos_weight,
        monotone_constraints=constraints, objective="binary:logistic", eval_metric=config.eval_metric,
        early_stopping_rounds=config.early_stopping_rounds if early_stopping else None, tree_method="hist",
        random_state=config.seed, n_jobs=config.n_jobs)


@dataclass
class TrackAModel:
    """A fitted track-A booster, holding only the trees up to the best (early-stopping) iteration."""

    booster: object = field(repr=False)  # xgboost.Booster
    feature_names: list
    best_iteration: int  # 0-based: the booster holds best_iteration + 1 trees
    monotone_constraints: dict  # every feature -> -1, 0 or +1, as trained
    scale_pos_weight: float
    config: TrackAConfig = field(default_factory=TrackAConfig)
    best_score: float | None = None  # the stop set's eval_metric at best_iteration (None without a stop set)
    notes: list = field(default_factory=list)

    def logit(self, X: pd.DataFrame) -> np.ndarray:
        """The booster's margin (log-odds under the training class weighting) for each row of ``X``.

        Columns are matched by name (order free, extra columns ignored); a missing feature column is an error.
        """
        return self._margin(_features(X, "X", self.feature_names).to_numpy())

    def _margin(self, a: np.ndarray) -> np.ndarray:
        """Margins of a float array whose columns are ``feature_names`` in order."""
        if len(a) == 0:
            return np.empty(0)
        return np.asarray(self.booster.inplace_predict(a, predict_type="margin", missing=np.nan), dtype=float)

    def importance(self) -> pd.DataFrame:
        """Gain importances: ``feature`` (every feature, in training order), ``gain`` (mean gain per split),
        ``total_gain``, ``share`` (total gain / sum of total gains) and ``n_splits``; 0 for unused features."""
        mean = self.booster.get_score(importance_type="gain")
        total = self.booster.get_score(importance_type="total_gain")
        splits = self.booster.get_score(importance_type="weight")
        tg = np.array([float(total.get(f, 0.0)) for f in self.feature_names])
        return pd.DataFrame({"feature": list(self.feature_names),
                             "gain": [float(mean.get(f, 0.0)) for f in self.feature_names],
                             "total_gain": tg, "share": tg / tg.sum() if tg.sum() > 0 else np.zeros(len(tg)),
                             "n_splits": [int(splits.get(f, 0)) for f in self.feature_names]})

    def partial_dependence(self, X: pd.DataFrame, feature: str, *, grid=20) -> pd.DataFrame:
        """Mean margin over the rows of ``X`` with ``feature`` set to each grid value: columns ``value``,
        ``mean_margin``.

        ``grid``: an int n (the 0..1 quantiles, n evenly spaced, of the feature's
        non-NaN values in ``X``; duplicates merged) or a sequence of values.
        """
        if feature not in self.feature_names:
            raise ValueError(f"feature {feature!r} is not one of the model's features {self.feature_names}")
        Xf = _features(X, "X", self.feature_names)
        if len(Xf) == 0:
            raise ValueError("partial_dependence needs at least one row in X")
        if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
            if grid < 1:
                raise ValueError(f"grid must be >= 1 points or a sequence of values, got {grid}")
            vals = Xf[feature].to_numpy()
            vals = vals[~np.isnan(vals)]
            if len(vals) == 0:
                raise ValueError(f"feature {feature!r} is NaN in every row of X; give the grid values explicitly")
            values = np.unique(np.quantile(vals, np.linspace(0.0, 1.0, grid)))
        else:
            values = np.asarray(grid, dtype=float).ravel()
            if len(values) == 0 or not np.isfinite(values).all():
                raise ValueError(f"grid values must be finite and at least one, got {values.tolist()[:5]}")
        a = Xf.to_numpy()
        j = self.feature_names.index(feature)
        means = []
        for v in values:
            a[:, j] = v
            means.append(float(np.mean(self._margin(a))))
        return pd.DataFrame({"value": values, "mean_margin": means})

    def save(self, path) -> Path:
        """Write the booster in XGBoost's JSON model format to ``path`` (must end in ``.json``) and the rest to
        the sidecar ``<stem>.meta.json`` beside it; returns ``path``."""
        path = Path(path)
        if path.suffix != ".json":
            raise ValueError(f"{path}: a track-A model is saved as XGBoost JSON; the path must end in .json")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path))
        meta = {"feature_names": list(self.feature_names), "best_iteration": int(self.best_iteration),
                "monotone_constraints": {k: int(v) for k, v in self.monotone_constraints.items()},
                "scale_pos_weight": float(self.scale_pos_weight), "config": asdict(self.config),
                "best_score": self.best_score, "notes": list(self.notes)}
        _sidecar(path).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path) -> "TrackAModel":
        """Read a model written by :meth:`save` (the booster JSON and its ``.meta.json`` sidecar)."""
        from xgboost import Booster

        path = Path(path)
        for p in (path, _sidecar(path)):
            if not p.exists():
                raise FileNotFoundError(f"{p}: no such file (a track-A model is the booster JSON and its sidecar)")
        meta = json.loads(_sidecar(path).read_text())
        known = {f.name for f in fields(cls)} - {"booster"}
        unknown = set(meta) - known
        if unknown:
            raise ValueError(f"{_sidecar(path)}: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        booster = Booster()
        booster.load_model(str(path))
        if list(booster.feature_names or []) != meta["feature_names"]:
            raise ValueError(f"{path}: booster features {booster.feature_names} differ from the sidecar's "
                             f"{meta['feature_names']}")
        config = TrackAConfig(**meta.pop("config"))
        booster.set_param({"nthread": config.n_jobs})
        return cls(booster=booster, config=config, **meta)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def fit_track_a(X_train: pd.DataFrame, y_train, X_stop: pd.DataFrame | None, y_stop, *,
                config: TrackAConfig = TrackAConfig(), monotone: Mapping[str, int] | None = None,
                sample_weight=None) -> TrackAModel:
    """Train the track-A booster on (X_train, y_train), early-stopping on ``config.eval_metric`` of (X_stop, y_stop).

    ``monotone``: feature -> +1 / -1 (0 or absent: unconstrained), applied when
    ``config.monotone``; keys that are not columns are ignored and listed in the
    model's ``notes``. X_stop must hold the same columns as X_train (any order).
    ``X_stop``/``y_stop`` None (or ``config.early_stopping_rounds`` None, the stop set then
    only checked) trains all ``n_estimators`` trees. ``sample_weight``
    weights training rows only (the stop set is unweighted). The model keeps the
    trees up to the best iteration.
    """
    if not isinstance(config, TrackAConfig):
        raise ValueError(f"config must be a TrackAConfig, got {type(config).__name__}")
    Xt = _features(X_train, "X_train")
    cols = list(Xt.columns)
    if not cols:
        raise ValueError("X_train has no feature columns")
    yt = _labels(y_train, len(Xt), "y_train")
    n_pos, n_neg = int(yt.sum()), int(len(yt) - yt.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"y_train needs both lenses and non-lenses, got {n_pos} lenses and {n_neg} non-lenses")
    if (X_stop is None) != (y_stop is None):
        raise ValueError("give both X_stop and y_stop (early stopping) or neither (no early stopping)")
    eval_set = None
    if X_stop is not None:
        if not isinstance(X_stop, pd.DataFrame):
            raise ValueError(f"X_stop must be a pandas DataFrame of features, got {type(X_stop).__name__}")
        only_train = [c for c in cols if c not in X_stop.columns]
        only_stop = [c for c in X_stop.columns if c not in cols]
        if only_train or only_stop:
            raise ValueError(f"X_train and X_stop columns differ: only in X_train {only_train}, "
                             f"only in X_stop {only_stop}")
        Xs = _features(X_stop, "X_stop", cols)
        ys = _labels(y_stop, len(Xs), "y_stop")
        if len(ys) == 0:
            raise ValueError("X_stop is empty; pass X_stop=None, y_stop=None to train without early stopping")
        if config.eval_metric == "aucpr" and len(np.unique(ys)) != 2:
            raise ValueError(f"early stopping on aucpr needs lenses and non-lenses in y_stop, got only "
                             f"label {int(ys[0])}")
        eval_set = [(Xs, ys)]
    w = None
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=float)
        if w.shape != (len(Xt),):
            raise ValueError(f"sample_weight has shape {w.shape}, expected ({len(Xt)},)")
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError("sample_weight must be finite, >= 0 and not all 0")
    spw = n_neg / n_pos if config.scale_pos_weight == "auto" else float(config.scale_pos_weight)

    notes = []
    mono = dict(monotone or {})
    for k, v in mono.items():
        if v not in (-1, 0, 1) or isinstance(v, bool):
            raise ValueError(f"monotone[{k!r}] must be -1, 0 or +1, got {v!r}")
    unknown = sorted(str(k) for k in mono if k not in cols)
    if unknown:
        notes.append(f"monotone keys not among the features, ignored: {unknown}")
    if mono and not config.monotone:
        notes.append("monotone constraints given but off (config.monotone=False); trained unconstrained")
    constraints = {c: int(mono.get(c, 0)) if config.monotone else 0 for c in cols}

    stopping = eval_set is not None and config.early_stopping_rounds is not None
    clf = _classifier(config, tuple(constraints[c] for c in cols), spw, early_stopping=stopping)
    clf.fit(Xt, yt, sample_weight=w, eval_set=eval_set if stopping else None, verbose=False)
    if stopping:
        best, best_score = int(clf.best_iteration), float(clf.best_score)
    else:
        best, best_score = config.n_estimators - 1, None
    booster = clf.get_booster()[: best + 1]
    booster.set_param({"nthread": config.n_jobs})
    return TrackAModel(booster=booster, feature_names=cols, best_iteration=best, monotone_constraints=constraints,
                       scale_pos_weight=float(spw), config=config, best_score=best_score, notes=notes)


def calibrate_track_a(model: TrackAModel, X_cal: pd.DataFrame, y_cal, *, method: str = "isotonic",
                      groups=None, seed: int = 0, target_prevalence: float | None = None) -> Calibrator:
    """A :class:`~lens_assets.science.calibration.Calibrator` mapping the model's margins to lens probabilities.

    ``X_cal`` must be rows the model was neither trained nor early-stopped on (the
    function cannot check this); ``method`` is "isotonic", "platt", "temperature"
    or "auto" (see :func:`~lens_assets.science.calibration.fit_calibrator`).
    """
    z = model.logit(X_cal)
    y = _labels(y_cal, len(z), "y_cal")
    return fit_calibrator(z, y, method=method, groups=groups, seed=seed, target_prevalence=target_prevalence)


def plot_partial_dependence(pd_tables: Mapping[str, pd.DataFrame], path, *, title: str = "") -> Path:
    """One panel per feature of mean margin against feature value (tables from
    :meth:`TrackAModel.partial_dependence`); PNG at ``path``. matplotlib is imported only here."""
    from ..plots import _pyplot, _save

    if not pd_tables:
        raise ValueError("plot_partial_dependence needs at least one feature's table")
    for name, t in pd_tables.items():
        missing = [c for c in ("value", "mean_margin") if c not in t.columns]
        if missing:
            raise ValueError(f"partial dependence table {name!r} lacks columns {missing}")
    plt = _pyplot()
    n = len(pd_tables)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, t) in zip(axes.flat, pd_tables.items()):
        ax.plot(t["value"], t["mean_margin"], marker=".", lw=1.2)
        ax.set_xlabel(name)
        ax.set_ylabel("mean margin (log-odds)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
