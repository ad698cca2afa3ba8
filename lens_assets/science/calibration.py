"""Score calibration: temperature scaling, Platt scaling and isotonic regression on ensemble logits.

All three are fit on the validation split's ``calibrate`` half (rows the members
were not early-stopped or selected on); the one with the lowest cross-validated
negative log-likelihood on that half is chosen (isotonic regression would always
win on the data it was fit to). Temperature scaling, sigmoid(z / T), only
rescales; Platt scaling, sigmoid(a z + b), also shifts, so a fused logit with an
offset (mean fusion of biased members) is corrected. :func:`cross_fit` gives
out-of-fold predictions by sky group, so the ECE reported for a calibrator is
measured on rows it was not fit to. An optional prior shift (Saerens et al.
2002) moves calibrated probabilities from the training prevalence of lenses to a
survey's expected prevalence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

__all__ = ["Calibrator", "fit_temperature", "fit_platt", "fit_calibrator", "cross_fit", "prior_shift", "nll",
           "METHODS"]

METHODS = ("temperature", "isotonic", "platt")
_EPS = 1e-7


def nll(labels, probs) -> float:
    """Mean negative log-likelihood of binary labels under probabilities (clipped to [1e-7, 1 - 1e-7])."""
    y = np.asarray(labels, dtype=float)
    p = np.clip(np.asarray(probs, dtype=float), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(logits, labels) -> float:
    """The temperature T minimizing the NLL of sigmoid(logit / T) (searched over log T in [-5, 5])."""
    z = np.asarray(logits, dtype=float)
    y = np.asarray(labels, dtype=float)
    res = minimize_scalar(lambda log_t: nll(y, expit(z / np.exp(log_t))), bounds=(-5.0, 5.0), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_platt(logits, labels) -> tuple[float, float]:
    """(a, b) minimizing the mean NLL of sigmoid(a * logit + b): unpenalized logistic regression on one feature.

    Newton's method with the exact gradient and Hessian and a backtracking line
    search (the loss is convex, so it converges in a few steps); ``a`` is kept in
    [0, e^5] (the temperature's range, and a calibrator never reverses the
    ranking), so perfectly separated labels give a finite fit.
    """
    z = np.asarray(logits, dtype=float)
    y = np.asarray(labels, dtype=float)
    x = np.column_stack([z, np.ones_like(z)])

    def loss(ab):
        s = x @ ab
        return float(np.mean(np.logaddexp(0.0, s) - y * s)), x.T @ (expit(s) - y) / len(z), s

    ab = np.array([1.0, 0.0])
    f, g, s = loss(ab)
    for _ in range(200):
        p = expit(s)
        hess = (x * (p * (1.0 - p))[:, None]).T @ x / len(z) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, g)
        t = 1.0
        while True:
            new = ab - t * step
            new[0] = np.clip(new[0], 0.0, np.exp(5.0))
            f_new, g_new, s_new = loss(new)
            if f_new <= f + 1e-4 * g @ (new - ab) or t < 1e-12:
                break
            t /= 2.0
        done = np.abs(new - ab).max() < 1e-12 * (1.0 + np.abs(ab).max())
        ab, f, g, s = new, f_new, g_new, s_new
        if done:
            break
    return float(ab[0]), float(ab[1])


@dataclass
class Calibrator:
    """Maps ensemble logits to calibrated lens probabilities."""

    method: str
    temperature: float = 1.0
    isotonic_x: list | None = None  # scikit-learn's IsotonicRegression thresholds: a piecewise-linear map
    isotonic_y: list | None = None
    train_prevalence: float | None = None
    target_prevalence: float | None = None
    cv_nll: dict | None = None
    platt_a: float | None = None  # Platt scaling: sigmoid(platt_a * logit + platt_b)
    platt_b: float | None = None

    def predict(self, logits) -> np.ndarray:
        z = np.asarray(logits, dtype=float)
        if self.method == "temperature":
            p = expit(z / self.temperature)
        elif self.method == "platt":
            p = expit(self.platt_a * z + self.platt_b)
        else:  # what IsotonicRegression(out_of_bounds="clip").predict computes
            p = np.interp(z, self.isotonic_x, self.isotonic_y)
        if self.target_prevalence is not None:
            p = prior_shift(p, self.train_prevalence, self.target_prevalence)
        return np.clip(p, 0.0, 1.0)

    def to_dict(self) -> dict:
        """Plain JSON-able fields (what ``score_calibrator`` writes to disk)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"calibrator fields {sorted(unknown)} are not known; "
                             f"expected {[f.name for f in fields(cls)]}")
        if d.get("method") not in METHODS:
            raise ValueError(f"calibrator method {d.get('method')!r} is not one of {list(METHODS)}")
        if d["method"] == "platt" and not all(isinstance(d.get(k), (int, float)) for k in ("platt_a", "platt_b")):
            raise ValueError(f"a platt calibrator needs numbers platt_a and platt_b, got "
                             f"platt_a={d.get('platt_a')!r}, platt_b={d.get('platt_b')!r}")
        return cls(**d)


def _fit(method: str, z, y) -> Calibrator:
    if method == "temperature":
        return Calibrator("temperature", temperature=fit_temperature(z, y))
    if method == "platt":
        a, b = fit_platt(z, y)
        return Calibrator("platt", platt_a=a, platt_b=b)
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, y)
    return Calibrator("isotonic", isotonic_x=iso.X_thresholds_.tolist(), isotonic_y=iso.y_thresholds_.tolist())


def _folds(labels, groups, *, n_folds: int, seed: int, what: str) -> list:
    """(train, test) index pairs of a stratified k-fold split, by ``groups`` when given (a group is never divided).

    ``k`` is ``n_folds`` or fewer: at most the number of rows (or groups) holding
    lenses and the number holding non-lenses, so that every fold's training part
    holds both; fewer than two of either is a ValueError naming ``what``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels, dtype=int)
    unit = "rows" if groups is None else "sky groups"
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    if len(g) != len(y):
        raise ValueError(f"{what}: {len(g)} groups for {len(y)} labels")
    n_pos, n_neg = len(np.unique(g[y == 1])), len(np.unique(g[y == 0]))
    k = min(n_folds, n_pos, n_neg)
    if k < 2:
        raise ValueError(f"{what} needs at least 2 {unit} with lenses and 2 with non-lenses, got {n_pos} and {n_neg}")
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(y, y)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(y, y, g)
    folds = list(splitter)
    for i, (tr, _) in enumerate(folds):
        if len(np.unique(y[tr])) != 2:
            raise ValueError(f"{what}: the training part of fold {i} of {k} holds one label only; "
                             f"use fewer folds than n_folds={n_folds}")
    return folds


def fit_calibrator(logits, labels, *, method: str = "auto", n_folds: int = 5, seed: int = 0, groups=None,
                   target_prevalence: float | None = None) -> Calibrator:
    """Fit on calibration logits; ``method`` "auto" picks by ``n_folds``-fold cross-validated NLL, the folds
    keeping ``groups`` (e.g. sky groups) whole when given."""
    if method not in ("auto", *METHODS):
        raise ValueError(f"method {method!r} is not one of {['auto', *METHODS]}")
    z = np.asarray(logits, dtype=float)
    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) != 2:
        raise ValueError("calibration needs both lenses and non-lenses in the labels it is fit to")
    cv = None
    if method == "auto":
        folds = _folds(y, groups, n_folds=n_folds, seed=seed, what="choosing a calibrator (method='auto')")
        cv = {m: float(np.mean([nll(y[te], _fit(m, z[tr], y[tr]).predict(z[te])) for tr, te in folds]))
              for m in METHODS}
        method = min(cv, key=cv.get)
    cal = _fit(method, z, y)
    cal.cv_nll = cv
    cal.train_prevalence = float(y.mean())
    if target_prevalence is not None:
        if not 0.0 < target_prevalence < 1.0:
            raise ValueError(f"target_prevalence must be in (0, 1), got {target_prevalence}")
        cal.target_prevalence = float(target_prevalence)
    return cal


def cross_fit(fit, x, labels, groups, *, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions: ``fit(x[train], labels[train])`` returns a function of ``x[test]``, for each of
    ``n_folds`` stratified folds that keep ``groups`` whole; row i's prediction comes from the fit on the
    folds without it. Metrics of these predictions are out of sample (unlike those of a fit on all rows)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(labels, dtype=int)
    out = np.full(len(y), np.nan)
    for tr, te in _folds(y, groups, n_folds=n_folds, seed=seed, what="cross-fitting a calibrator"):
        out[te] = fit(x[tr], y[tr])(x[te])
    return out


def prior_shift(probs, train_prevalence: float, target_prevalence: float) -> np.ndarray:
    """Re-weight probabilities from a training lens prevalence to a target one (Bayes' rule on the odds)."""
    p = np.asarray(probs, dtype=float)
    a = p * target_prevalence / train_prevalence
    b = (1.0 - p) * (1.0 - target_prevalence) / (1.0 - train_prevalence)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a + b > 0, a / (a + b), 0.0)
