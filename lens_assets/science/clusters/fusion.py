"""Fusion of per-field component scores into one lens score, fit for recall at a low false-positive rate.

Components are columns of a per-field table: e.g. ``track_a`` (XGBoost logit),
``track_b`` (MIL CNN logit), ``colour_consistency`` (the feature) and ``anomaly``
(the Deep SVDD standardized score). The fused score is linear,

    s(x) = sum_k w_k (x_k - mu_k) / sigma_k,     ||w||_2 = 1,

with mu_k, sigma_k the mean and standard deviation of component k on the fit
rows (after imputation: a NaN in component k is replaced by its median on the
fit rows, recorded in ``Fusion.impute``; NaN imputed later, when scoring, is
counted by :meth:`Fusion.n_imputed`). w is fit on the same rows to maximize a
smooth surrogate of recall at FPR <= ``max_fpr`` (alpha).

Rows used. The fit rows are the val ``calibrate`` rows (``fit_role``), which no
track selects on: Track A early-stops on the val ``stop`` rows and Track B picks
its checkpoint by AUROC there, so their logits are optimistic on the stop rows
and a fusion fit there would over-weight them; on the calibrate rows the tracks
only fit their calibrators, monotone maps that the fusion does not use (it takes
logits). The stop rows, the test split and the held-out families are not read.
The fused score is calibrated out of fold on the calibrate rows: they are cut
into K folds (``n_folds``, default 5, fewer when a class has fewer rows;
stratified by label, the assignment drawn from ``seed``); for each fold,
standardization and weights fit on the other K - 1 folds score it; the
calibrator (:func:`..calibration.fit_calibrator`, isotonic by default) is fit on
these out-of-fold fused scores, so it sees scores as noisy as those of fresh
fields rather than the optimistic in-sample ones. The final standardization and
weights are fit on all calibrate rows. ``fit_role="stop"`` restores the former
scheme (weights on the stop rows, calibrator on the fused scores of the
calibrate rows), for comparison only.

With P lenses and N non-lenses among the fit rows, k = floor(alpha N) false
positives are allowed (N >= 1 / alpha is required; N < 50 gives a note: k is
then tiny and the weights noisy; a fold's fit uses at least k = 1), t_m is the
(m+1)-th highest non-lens score, and s~ = s / sd(s) (so the objective depends on
the direction of w only):

* ``objective="pauc"`` (default): the normalized partial AUC over FPR in
  [0, k/N], i.e. the mean over m = 0..k-1 of TPR at m false positives,

      pAUC = 1/(P k) sum_{i lens} sum_{j in top-k non-lenses} 1[s_i > s_j]
           ~ 1/(P k) sum_i sum_j sigmoid((s~_i - s~_j) / tau);

* ``objective="tpr"``: TPR at FPR alpha (lenses strictly above t_k; equal to
  :func:`..metrics.tpr_at_fpr`),

      TPR = 1/P sum_i 1[s_i > t_k]  ~  1/P sum_i sigmoid((s~_i - s~_{t_k}) / tau).

The set of top-k non-lenses (and t_k) follows w; the surrogate's gradient
treats it as fixed, which is exact wherever the order of the non-lenses does not
change. As tau -> 0 the surrogate tends to the exact figure
(:func:`surrogate_objective`, :func:`exact_objective`). The maximization runs
``scipy.optimize.minimize`` (L-BFGS-B, analytic gradient) from several starts:
each component alone (signed by its AUROC on the fit rows), their signed equal
mix, and ``n_random`` random directions drawn from ``seed``; first at a
smoother temperature (max(tau, 0.5)), then at ``tau``; the start with the best
surrogate wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit

from ..calibration import Calibrator, fit_calibrator

__all__ = ["Fusion", "fit_fusion", "surrogate_objective", "exact_objective", "OBJECTIVES", "FIT_ROLES"]

OBJECTIVES = ("pauc", "tpr")
FIT_ROLES = ("calibrate", "stop")  # val_role of the rows the weights are fit on (module docstring)
_FEW_NONLENSES = 50  # fewer non-lenses in the fit rows give a note
_NORM_PENALTY = 1e-2  # pins ||v|| near 1; the objective itself does not depend on ||v||


def _n_allowed(n_neg: int, max_fpr: float) -> int:
    return int(math.floor(max_fpr * n_neg + 1e-9))


def _check_labels(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or y.shape != s.shape[:1]:
        raise ValueError(f"{what}: labels of shape {y.shape} do not match scores of shape {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (non-lens) or 1 (lens), got {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores must be finite")
    return y.astype(int), s


def _top_k_order(neg: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k + 1 highest non-lens scores, highest first (ties by index: deterministic)."""
    return np.argsort(-neg, kind="stable")[:k + 1]


def _surrogate_grad(s: np.ndarray, y: np.ndarray, *, k: int, tau: float, objective: str) -> tuple[float, np.ndarray]:
    """The surrogate F of scores ``s`` (already scaled) and dF/ds."""
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    top = neg_idx[_top_k_order(s[neg_idx], k)]
    g = np.zeros_like(s)
    if objective == "tpr":
        t = top[k]
        sig = expit((s[pos_idx] - s[t]) / tau)
        d = sig * (1 - sig) / (tau * len(pos_idx))
        g[pos_idx] += d
        g[t] -= d.sum()
        return float(sig.mean()), g
    top = top[:k]
    sig = expit((s[pos_idx, None] - s[None, top]) / tau)
    d = sig * (1 - sig) / (tau * len(pos_idx) * k)
    g[pos_idx] += d.sum(axis=1)
    np.subtract.at(g, top, d.sum(axis=0))
    return float(sig.mean()), g


def _check_options(max_fpr: float, objective: str, tau: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {list(OBJECTIVES)}")
    if not 0 < max_fpr < 1:
        raise ValueError(f"max_fpr must be in (0, 1), got {max_fpr}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")


def _allowed_false_positives(y: np.ndarray, max_fpr: float, what: str) -> int:
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    k = _n_allowed(n_neg, max_fpr)
    if n_pos == 0 or k == 0:
        raise ValueError(f"{what} needs lenses and at least {math.ceil(1 / max_fpr - 1e-9)} non-lenses (so that "
                         f"FPR <= {max_fpr} allows one false positive), got {n_pos} lenses and {n_neg} non-lenses")
    return k


def surrogate_objective(labels, scores, *, max_fpr: float = 0.1, tau: float = 0.1, objective: str = "pauc") -> float:
    """The smooth surrogate (module docstring) of ``scores`` divided by their standard deviation."""
    _check_options(max_fpr, objective, tau)
    y, s = _check_labels(labels, scores, "surrogate_objective")
    k = _allowed_false_positives(y, max_fpr, "surrogate_objective")
    sd = float(np.std(s))
    return _surrogate_grad(s / (sd if sd > 0 else 1.0), y, k=k, tau=tau, objective=objective)[0]


def exact_objective(labels, scores, *, max_fpr: float = 0.1, objective: str = "pauc") -> float:
    """What the surrogate approximates: TPR at FPR <= max_fpr ("tpr": lenses strictly above the (k+1)-th highest
    non-lens) or the normalized pAUC ("pauc": the mean of TPR at m = 0..k-1 false positives)."""
    _check_options(max_fpr, objective, 1.0)
    y, s = _check_labels(labels, scores, "exact_objective")
    return _exact(y, s, _allowed_false_positives(y, max_fpr, "exact_objective"), objective)


def _exact(y: np.ndarray, s: np.ndarray, k: int, objective: str) -> float:
    """:func:`exact_objective` with k false positives allowed (k >= 1, fewer than the non-lenses)."""
    pos, neg = s[y == 1], np.sort(s[y == 0])[::-1]
    if objective == "tpr":
        return float(np.mean(pos > neg[k]))
    return float(np.mean(pos[:, None] > neg[None, :k]))


@dataclass
class Fusion:
    """A fitted linear fusion of components (module docstring) and its calibrator."""

    components: list
    weights: dict  # component -> w_k on the standardized component (unit L2 norm)
    mean: dict  # component -> mu_k (fit rows, after imputation)
    sd: dict  # component -> sigma_k
    impute: dict  # component -> the fit rows' median, replacing NaN
    calibrator: Calibrator
    max_fpr: float = 0.1
    objective: str = "pauc"
    tau: float = 0.1
    seed: int = 0
    fit_role: str = "calibrate"  # val_role of the fit rows ("stop": a fusion of the former scheme)
    fit_exact: float = float("nan")  # the exact objective of the fused score on the fit rows (in sample)
    fit_single: dict = field(default_factory=dict)  # component -> its exact objective alone (signed) there
    oof_exact: float = float("nan")  # the exact objective of the out-of-fold fused scores on the fit rows
    n_fit_lenses: int = 0
    n_fit_nonlenses: int = 0
    k: int = 0  # false positives allowed among the fit rows' non-lenses: floor(max_fpr * n_fit_nonlenses)
    n_folds: int = 0  # folds of the out-of-fold calibration (0: none, fit_role "stop")
    n_missing: dict = field(default_factory=dict)  # component -> NaN imputed in the rows fit on (weights, calibrator)
    n_imputed_scored: dict = field(default_factory=dict)  # set -> component -> NaN imputed when scoring it
    notes: list = field(default_factory=list)

    def n_imputed(self, frame: pd.DataFrame) -> dict:
        """component -> how many NaN of ``frame`` :meth:`logit` replaces by the fit rows' median."""
        missing = [c for c in self.components if c not in frame]
        if missing:
            raise ValueError(f"the frame lacks the fusion's component columns {missing} (has {list(frame.columns)})")
        return {c: int(frame[c].isna().sum()) for c in self.components}

    def _matrix(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.components if c not in frame]
        if missing:
            raise ValueError(f"the frame lacks the fusion's component columns {missing} (has {list(frame.columns)})")
        cols = []
        for c in self.components:
            if not pd.api.types.is_numeric_dtype(frame[c]):
                raise ValueError(f"component {c!r} has dtype {frame[c].dtype}; components must be numeric")
            x = frame[c].to_numpy(dtype=float, na_value=np.nan)
            if np.isinf(x).any():
                raise ValueError(f"component {c!r} holds +-inf in {int(np.isinf(x).sum())} rows")
            cols.append((np.where(np.isnan(x), self.impute[c], x) - self.mean[c]) / self.sd[c])
        return np.column_stack(cols) if cols else np.zeros((len(frame), 0))

    def logit(self, frame: pd.DataFrame) -> np.ndarray:
        """The fused score s(x) per row (a ranking score in standardized units, not log-odds). A NaN component is
        imputed by the fit rows' median: count them with :meth:`n_imputed` (``models.fuse_scores`` records them
        and can refuse them)."""
        return self._matrix(frame) @ np.array([self.weights[c] for c in self.components])

    def prob(self, frame: pd.DataFrame) -> np.ndarray:
        """The calibrated lens probability of each row."""
        return self.calibrator.predict(self.logit(frame))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["calibrator"] = self.calibrator.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Fusion":
        """The inverse of :meth:`to_dict`. A dict of the former scheme (``stop_exact``, ``stop_single``: weights fit
        on the stop rows) loads with ``fit_role="stop"`` and those figures as ``fit_exact``, ``fit_single``."""
        if "stop_exact" in d or "stop_single" in d:
            d = {k: v for k, v in d.items() if k not in ("stop_exact", "stop_single")} | {
                "fit_role": "stop", "fit_exact": d.get("stop_exact", float("nan")),
                "fit_single": d.get("stop_single", {})}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"fusion fields {sorted(unknown)} are not known; expected {sorted(known)}")
        missing = [k for k in ("components", "weights", "mean", "sd", "impute", "calibrator") if k not in d]
        if missing:
            raise ValueError(f"fusion dict lacks fields {missing}")
        for k in ("weights", "mean", "sd", "impute"):
            if set(d[k]) != set(d["components"]):
                raise ValueError(f"fusion {k} has keys {sorted(d[k])}, expected the components {d['components']}")
        return cls(**{**d, "calibrator": Calibrator.from_dict(d["calibrator"])})


def _rows(frame: pd.DataFrame, role: str) -> pd.DataFrame:
    return frame[(frame["split"] == "val") & (frame["val_role"] == role)]


def _fit_direction(Z: np.ndarray, y: np.ndarray, *, k: int, tau: float, objective: str, starts: list) -> tuple:
    """Maximize the surrogate over directions v (s~ = Z v / sd(Z v)) from each start; the best (v, surrogate)."""
    n = len(Z)
    C = Z.T @ Z / n  # Z is centred on these rows

    def loss(v, t):
        sv = Z @ v
        sd = math.sqrt(max(float(v @ C @ v), 0.0))
        q = float(v @ v)
        pen, dpen = 0.5 * _NORM_PENALTY * (q - 1) ** 2, 2 * _NORM_PENALTY * (q - 1) * v
        if sd < 1e-12:
            return pen, dpen
        f, g = _surrogate_grad(sv / sd, y, k=k, tau=t, objective=objective)
        grad = Z.T @ g / sd - (g @ sv) / sd ** 3 * (C @ v)
        return -f + pen, -grad + dpen

    best = (None, -np.inf)
    for v0 in starts:
        v = np.asarray(v0, dtype=float)
        for t in (max(tau, 0.5), tau):
            v = minimize(loss, v, args=(t,), jac=True, method="L-BFGS-B", options={"maxiter": 200}).x
        f = -loss(v, tau)[0]
        if f > best[1] + 1e-12:
            best = (v, f)
    return best


def _standardization(rows: pd.DataFrame, components: list, what: str) -> tuple[dict, dict, dict]:
    """Per component, on ``rows``: the median (NaN imputation), then the mean and standard deviation."""
    impute, mean, sd = {}, {}, {}
    for c in components:
        x = rows[c].to_numpy(dtype=float, na_value=np.nan)
        if np.isinf(x).any():
            raise ValueError(f"component {c!r} holds +-inf in {int(np.isinf(x).sum())} {what} rows")
        if np.isnan(x).all():
            raise ValueError(f"component {c!r} is NaN in all {len(x)} {what} rows; drop it from the components")
        impute[c] = float(np.nanmedian(x))
        x = np.where(np.isnan(x), impute[c], x)
        mean[c], sd[c] = float(x.mean()), float(x.std())
        if not sd[c] > 0:
            raise ValueError(f"component {c!r} is constant ({mean[c]}) on the {len(x)} {what} rows (after "
                             f"imputing NaN by its median); drop it from the components")
    return impute, mean, sd


def _fit_weights(rows: pd.DataFrame, components: list, *, k: int, max_fpr: float, objective: str, tau: float,
                 seed: int, n_random: int, what: str) -> Fusion:
    """A :class:`Fusion` whose standardization and weights are fit on ``rows`` (k false positives allowed); its
    calibrator is a placeholder."""
    from sklearn.metrics import roc_auc_score

    impute, mean, sd = _standardization(rows, components, what)
    fusion = Fusion(components=list(components), weights={c: 0.0 for c in components}, mean=mean, sd=sd,
                    impute=impute, calibrator=Calibrator("temperature"), max_fpr=float(max_fpr), objective=objective,
                    tau=float(tau), seed=int(seed))
    y = rows["label"].to_numpy(int)
    Z = fusion._matrix(rows)
    signs = np.array([1.0 if roc_auc_score(y, Z[:, j]) >= 0.5 else -1.0 for j in range(Z.shape[1])])
    fusion.fit_single = {c: _exact(y, signs[j] * Z[:, j], k, objective) for j, c in enumerate(components)}
    rng = np.random.default_rng(seed)
    starts = [signs[j] * np.eye(len(components))[j] for j in range(len(components))]
    starts += [signs / np.sqrt(len(components))]
    starts += [v / np.linalg.norm(v) for v in rng.normal(size=(n_random, len(components)))]
    v, _ = _fit_direction(Z, y, k=k, tau=tau, objective=objective, starts=starts)
    w = v / np.linalg.norm(v)
    fusion.weights = {c: float(w[j]) for j, c in enumerate(components)}
    fusion.fit_exact = _exact(y, Z @ w, k, objective)
    return fusion


def _out_of_fold(rows: pd.DataFrame, components: list, *, n_folds: int, max_fpr: float, objective: str,
                 tau: float, seed: int, n_random: int, what: str) -> tuple[np.ndarray, int, list]:
    """The fused score of each of ``rows`` from standardization and weights fit on the other folds (stratified
    K-fold, assignment from ``seed``); the number of folds used and notes."""
    from sklearn.model_selection import StratifiedKFold

    y = rows["label"].to_numpy(int)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    n_used = min(n_folds, n_pos, n_neg)
    if n_used < 2:
        raise ValueError(f"the out-of-fold calibration of the fusion needs at least 2 lenses and 2 non-lenses in "
                         f"the {what} rows, got {n_pos} and {n_neg}")
    notes = []
    if n_used < n_folds:
        notes.append(f"out-of-fold calibration: {n_used} folds instead of {n_folds} ({what} rows: {n_pos} lenses, "
                     f"{n_neg} non-lenses)")
    oof, raised = np.full(len(rows), np.nan), 0
    for i, (tr, te) in enumerate(StratifiedKFold(n_used, shuffle=True, random_state=seed).split(y, y)):
        k = _n_allowed(int((y[tr] == 0).sum()), max_fpr)
        raised += k == 0
        part = f"{what} (fold {i + 1} of {n_used}: the other folds)"
        fold = _fit_weights(rows.iloc[tr], components, k=max(k, 1), max_fpr=max_fpr, objective=objective, tau=tau,
                            seed=seed, n_random=n_random, what=part)
        oof[te] = fold.logit(rows.iloc[te])
    if raised:
        notes.append(f"out-of-fold calibration: in {raised} of {n_used} folds the other folds' non-lenses are too few "
                     f"for FPR <= {max_fpr} to allow a false positive; those folds' weights allow one")
    return oof, n_used, notes


def fit_fusion(frame: pd.DataFrame, components, *, max_fpr: float = 0.1, seed: int = 0, objective: str = "pauc",
               tau: float = 0.1, n_random: int = 6, calibration: str = "isotonic", fit_role: str = "calibrate",
               n_folds: int = 5) -> Fusion:
    """Fit the fusion's standardization and weights on ``frame``'s val ``fit_role`` rows and its calibrator on
    their out-of-fold fused scores (module docstring: the rows used, the objective and the optimizer).

    ``frame`` needs ``split``, ``val_role``, ``label`` and every column of
    ``components``; other rows (the stop rows, test, held-out) are ignored.
    ``calibration`` is a :func:`..calibration.fit_calibrator` method ("isotonic",
    "platt", "temperature", "auto"). ``n_folds``: the folds of the out-of-fold
    calibration (fewer when a class has fewer fit rows). ``fit_role="stop"``:
    the former scheme (weights on the stop rows, calibrator on the calibrate rows'
    fused scores; ``n_folds`` unused), for comparison.
    """
    _check_options(max_fpr, objective, tau)
    if fit_role not in FIT_ROLES:
        raise ValueError(f"fit_role {fit_role!r} is not one of {list(FIT_ROLES)}")
    if not (isinstance(n_folds, (int, np.integer)) and not isinstance(n_folds, bool) and n_folds >= 2):
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    components = list(components)
    if not components:
        raise ValueError("fit_fusion needs at least one component column")
    dup = sorted({c for c in components if components.count(c) > 1})
    if dup:
        raise ValueError(f"components {dup} are listed twice")
    missing = [c for c in ("split", "val_role", "label", *components) if c not in frame]
    if missing:
        raise ValueError(f"the frame lacks columns {missing} (components {components}; has {list(frame.columns)})")
    for c in components:
        if not pd.api.types.is_numeric_dtype(frame[c]):
            raise ValueError(f"component {c!r} has dtype {frame[c].dtype}; components must be numeric")
    fit, cal = _rows(frame, fit_role), _rows(frame, "calibrate")
    what = f"val {fit_role}"
    for name, part in ((what, fit), *((("val calibrate", cal),) if fit_role == "stop" else ())):
        if part["label"].nunique() < 2:
            raise ValueError(f"the {name} rows need lenses and non-lenses, got labels "
                             f"{sorted(part['label'].unique().tolist())} in {len(part)} rows")
    y = fit["label"].to_numpy(int)
    k = _allowed_false_positives(y, max_fpr, f"fusion on the {what} rows")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    options = dict(max_fpr=max_fpr, objective=objective, tau=tau, seed=seed, n_random=n_random)
    fusion = _fit_weights(fit, components, k=k, what=what, **options)
    notes = []
    if n_neg < _FEW_NONLENSES:
        notes.append(f"the {what} rows hold {n_neg} non-lenses (fewer than {_FEW_NONLENSES}): FPR <= {max_fpr} "
                     f"allows k = {k} false positive(s), so the weights rest on a few fields")
    used = fit if fit_role == "calibrate" else pd.concat([fit, cal])
    n_missing = {c: int(used[c].isna().sum()) for c in components}
    roles = "calibrate" if fit_role == "calibrate" else "stop and calibrate"
    for c in components:
        if n_missing[c]:
            notes.append(f"{c}: {n_missing[c]} NaN in the val {roles} rows imputed by the {what} rows' median "
                         f"{fusion.impute[c]:.6g}")
    if fit_role == "calibrate":
        oof, fusion.n_folds, fold_notes = _out_of_fold(fit, components, n_folds=n_folds, what=what, **options)
        notes += fold_notes
        fusion.oof_exact = _exact(y, oof, k, objective)
        fusion.calibrator = fit_calibrator(oof, y, method=calibration, seed=seed)
    else:
        notes.append("fit_role='stop': weights fit on the rows the tracks select on (early stopping, checkpoint "
                     "choice), where their logits are optimistic")
        fusion.calibrator = fit_calibrator(fusion.logit(cal), cal["label"].to_numpy(int), method=calibration,
                                           seed=seed)
    fusion.fit_role, fusion.k, fusion.n_fit_lenses, fusion.n_fit_nonlenses = fit_role, k, n_pos, n_neg
    fusion.n_missing, fusion.notes = n_missing, notes
    return fusion
