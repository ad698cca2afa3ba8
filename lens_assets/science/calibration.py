"""Score calibration: temperature scaling and isotonic regression on ensemble logits.

Both are fit on the validation split; the one with the lower cross-validated
negative log-likelihood on that split is chosen (isotonic regression would
always win on the data it was fit to). An optional prior shift (Saerens et al.
2002) moves calibrated probabilities from the training prevalence of lenses to
a survey's expected prevalence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

__all__ = ["Calibrator", "fit_temperature", "fit_calibrator", "prior_shift", "nll", "METHODS"]

METHODS = ("temperature", "isotonic")
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

    def predict(self, logits) -> np.ndarray:
        z = np.asarray(logits, dtype=float)
        if self.method == "temperature":
            p = expit(z / self.temperature)
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
        return cls(**d)


def _fit(method: str, z, y) -> Calibrator:
    if method == "temperature":
        return Calibrator("temperature", temperature=fit_temperature(z, y))
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, y)
    return Calibrator("isotonic", isotonic_x=iso.X_thresholds_.tolist(), isotonic_y=iso.y_thresholds_.tolist())


def fit_calibrator(logits, labels, *, method: str = "auto", n_folds: int = 5, seed: int = 0,
                   target_prevalence: float | None = None) -> Calibrator:
    """Fit on validation logits; ``method`` "auto" picks by ``n_folds``-fold cross-validated NLL."""
    if method not in ("auto", *METHODS):
        raise ValueError(f"method {method!r} is not one of {['auto', *METHODS]}")
    z = np.asarray(logits, dtype=float)
    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) != 2:
        raise ValueError("calibration needs both lenses and non-lenses in the validation labels")
    cv = None
    if method == "auto":
        from sklearn.model_selection import StratifiedKFold

        folds = StratifiedKFold(n_splits=min(n_folds, int(np.bincount(y).min())), shuffle=True, random_state=seed)
        cv = {}
        for m in METHODS:
            losses = [nll(y[te], _fit(m, z[tr], y[tr]).predict(z[te])) for tr, te in folds.split(z, y)]
            cv[m] = float(np.mean(losses))
        method = min(cv, key=cv.get)
    cal = _fit(method, z, y)
    cal.cv_nll = cv
    cal.train_prevalence = float(y.mean())
    if target_prevalence is not None:
        if not 0.0 < target_prevalence < 1.0:
            raise ValueError(f"target_prevalence must be in (0, 1), got {target_prevalence}")
        cal.target_prevalence = float(target_prevalence)
    return cal


def prior_shift(probs, train_prevalence: float, target_prevalence: float) -> np.ndarray:
    """Re-weight probabilities from a training lens prevalence to a target one (Bayes' rule on the odds)."""
    p = np.asarray(probs, dtype=float)
    a = p * target_prevalence / train_prevalence
    b = (1.0 - p) * (1.0 - target_prevalence) / (1.0 - train_prevalence)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a + b > 0, a / (a + b), 0.0)
