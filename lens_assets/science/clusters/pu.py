"""Positive-unlabeled (PU) learning after Elkan & Noto (2008, KDD, "Learning classifiers from only positive
and unlabeled data").

``s`` = 1 marks a labeled (confirmed) lensing cluster, 0 an unlabeled field (a lens
or not). Under "selected completely at random" (every lens is labeled with the same
probability c = P(s=1 | y=1), whatever its features), a classifier g(x) = P(s=1 | x)
equals c P(y=1 | x), so P(y=1 | x) = g(x) / c. c is estimated by Elkan-Noto's e1: the
mean of g over labeled positives held out of g's training. e1 is exact when lenses
and non-lenses do not overlap in feature space (g = c on every lens) and
underestimates c, by the factor E[P(y=1 | x) | y=1], where they do; ranking is
unaffected either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from scipy.special import expit

from .track_a import TrackAConfig, fit_track_a

__all__ = ["PUModel", "estimate_label_frequency", "fit_pu", "pu_xgboost_fit_fn", "simulate_pu_labels"]


def estimate_label_frequency(g_probs_on_heldout_labeled) -> float:
    """Elkan-Noto's e1: c = mean g(x) over held-out labeled positives, clipped to (0, 1]."""
    g = np.asarray(g_probs_on_heldout_labeled, dtype=float).ravel()
    if len(g) == 0:
        raise ValueError("estimating the label frequency needs g on at least one held-out labeled positive, got none")
    if not (np.isfinite(g).all() and (g >= 0).all() and (g <= 1).all()):
        bad = g[~(np.isfinite(g) & (g >= 0) & (g <= 1))]
        raise ValueError(f"g must be probabilities in [0, 1], got values {bad[:5].tolist()}")
    c = float(g.mean())
    if c <= 0:
        raise ValueError(f"g is 0 on all {len(g)} held-out labeled positives, so the label frequency c "
                         f"(their mean) is 0; g has not learned the labeled class")
    return min(c, 1.0)


def _take(X, idx):
    return X.iloc[idx] if isinstance(X, (pd.DataFrame, pd.Series)) else np.asarray(X)[idx]


def _probs(g, X, n: int, what: str) -> np.ndarray:
    p = np.asarray(g(X), dtype=float)
    if p.shape != (n,):
        raise ValueError(f"{what} returned shape {p.shape} for {n} rows; it must return a 1-D array of "
                         f"P(s=1|x), e.g. clf.predict_proba(X)[:, 1]")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError(f"{what} returned values outside [0, 1]; it must return probabilities")
    return p


@dataclass
class PUModel:
    """g(x) = P(s=1 | x) trained on the unlabeled rows and the fit part of the labeled ones, and the label
    frequency estimated on the held-out part.

    ``c``: P(s=1 | y=1) in the data given to :func:`fit_pu`. ``c_fit``: the e1
    estimate, the label frequency among g's training rows (lower than ``c``, as a
    fraction ``holdout_fraction`` of the labeled rows was taken out):
    c = c_fit / (1 - h + h c_fit).
    """

    g: Callable = field(repr=False)
    c: float
    c_fit: float
    holdout_fraction: float  # h: held-out labeled / all labeled, as realized
    n_labeled_fit: int
    n_labeled_holdout: int
    n_unlabeled: int
    holdout_index: np.ndarray = field(repr=False)  # positions (in the X given to fit_pu) of the held-out rows

    def prob(self, X) -> np.ndarray:
        """P(y=1 | x) in the population given to :func:`fit_pu`.

        clip(g / c_fit, 0, 1) is P(y=1 | x) among g's training rows, where lenses are
        a factor (1 - h c) rarer than in the population (the held-out labeled lenses
        are missing); its odds are divided by (1 - h c) to undo that. For h c small
        this is clip(g / c, 0, 1).
        """
        return self.prob_from_g(_probs(self.g, X, len(X), "g"))

    def prob_from_g(self, g) -> np.ndarray:
        """:meth:`prob` from values of g already computed (e.g. a network's sigmoid on rows that are not a
        feature matrix): the same conversion, without calling ``g``."""
        g = np.asarray(g, dtype=float)
        if not (np.isfinite(g).all() and (g >= 0).all() and (g <= 1).all()):
            raise ValueError("g must be probabilities in [0, 1]")
        p = np.clip(g / self.c_fit, 0.0, 1.0)
        k = 1.0 - self.holdout_fraction * self.c
        return p / (p + (1.0 - p) * k)


def fit_pu(X, s, *, fit_fn: Callable, holdout_fraction: float = 0.2, seed: int = 0) -> PUModel:
    """Elkan-Noto PU learning: hold out ``holdout_fraction`` of the labeled positives (at least one; the
    unlabeled rows all train g), train g = ``fit_fn(X_fit, s_fit)``, estimate c on the held-out ones.

    ``fit_fn(X, s)`` returns a callable mapping rows like ``X`` (DataFrame or array,
    indexed like the input) to a 1-D array of calibrated P(s=1 | x); e1 needs g
    calibrated, so do not return class-reweighted probabilities.
    """
    s = np.asarray(s)
    if s.ndim != 1 or len(s) != len(X):
        raise ValueError(f"s has shape {s.shape}, expected ({len(X)},) to match X")
    if not np.isin(s, (0, 1)).all():
        raise ValueError(f"s must hold 1 (labeled positive) or 0 (unlabeled), got values "
                         f"{pd.unique(s[~np.isin(s, (0, 1))])[:5].tolist()}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    labeled = np.flatnonzero(s == 1)
    unlabeled = np.flatnonzero(s == 0)
    if len(labeled) < 2:
        raise ValueError(f"PU learning needs at least 2 labeled positives (1 to fit, 1 to hold out), "
                         f"got {len(labeled)}")
    if len(unlabeled) == 0:
        raise ValueError("PU learning needs unlabeled rows (s=0), got none")
    n_hold = min(max(1, int(round(holdout_fraction * len(labeled)))), len(labeled) - 1)
    rng = np.random.default_rng(seed)
    hold = np.sort(rng.choice(labeled, n_hold, replace=False))
    fit_idx = np.setdiff1d(np.arange(len(s)), hold)
    g = fit_fn(_take(X, fit_idx), s[fit_idx].astype(int).copy())
    if not callable(g):
        raise ValueError(f"fit_fn must return a callable X -> P(s=1|x), got {type(g).__name__}")
    c_fit = estimate_label_frequency(_probs(g, _take(X, hold), n_hold, "g (from fit_fn)"))
    h = n_hold / len(labeled)
    c = min(c_fit / (1.0 - h + h * c_fit), 1.0)
    return PUModel(g=g, c=float(c), c_fit=float(c_fit), holdout_fraction=float(h), n_labeled_fit=len(labeled) - n_hold,
                   n_labeled_holdout=int(n_hold), n_unlabeled=len(unlabeled), holdout_index=hold)


def pu_xgboost_fit_fn(config: TrackAConfig | None = None, *, monotone: dict | None = None) -> Callable:
    """A ``fit_fn`` for :func:`fit_pu` training the track-A booster on (X, s).

    No early stopping (``config.early_stopping_rounds`` is ignored; all
    ``n_estimators`` trees are trained): a stop set's unlabeled rows hold
    unlabeled lenses, so its loss does not measure P(y|x). ``scale_pos_weight`` is
    ``config``'s ("auto": n_unlabeled / n_labeled); its log is subtracted from the
    margin so that g stays P(s=1 | x) (e1 needs g calibrated). Array inputs get
    columns "f0", "f1", ...
    """
    config = TrackAConfig() if config is None else config

    def frame(X):
        if isinstance(X, pd.DataFrame):
            return X
        a = np.asarray(X, dtype=float)
        if a.ndim != 2:
            raise ValueError(f"X must be 2-D (rows, features), got shape {a.shape}")
        return pd.DataFrame(a, columns=[f"f{i}" for i in range(a.shape[1])])

    def fit_fn(X, s):
        model = fit_track_a(frame(X), s, None, None, config=config, monotone=monotone)
        offset = float(np.log(model.scale_pos_weight))
        return lambda Xn: expit(model.logit(frame(Xn)) - offset)

    return fit_fn


def simulate_pu_labels(y, n_labeled: int, *, seed: int) -> np.ndarray:
    """s: ``n_labeled`` of the positives of ``y``, chosen uniformly at random (by ``seed``), set to 1; the rest 0."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("y must be a 1-D array of 0 (negative) and 1 (positive)")
    if not isinstance(n_labeled, (int, np.integer)) or isinstance(n_labeled, bool) or n_labeled < 0:
        raise ValueError(f"n_labeled must be an integer >= 0, got {n_labeled!r}")
    pos = np.flatnonzero(y == 1)
    if n_labeled > len(pos):
        raise ValueError(f"n_labeled={n_labeled} exceeds the {len(pos)} positives in y")
    s = np.zeros(len(y), dtype=int)
    s[np.random.default_rng(seed).choice(pos, n_labeled, replace=False)] = 1
    return s
