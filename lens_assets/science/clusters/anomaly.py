"""Deep SVDD (Ruff et al. 2018, ICML, "Deep One-Class Classification"): the cluster track's anomaly backstop.

A one-class model of the non-lens fields: a network phi without bias terms maps
the standardized feature vector x of each training non-lens into R^d, close to a
fixed centre c. The one-class Deep SVDD objective is

    min_W  (1/n) sum_i ||phi(x_i; W) - c||^2  +  (lambda / 2) sum_l ||W_l||_F^2

and a field's anomaly score is ||phi(x; W) - c||^2 (higher = less like the
training non-lenses). As the paper requires, against the trivial solution
phi = c: c is fixed (the mean of the initial network's outputs on the training
rows, each coordinate with |c_j| < eps pushed to +-eps, 0 to +eps), the network
has no bias terms (a bias alone could output c for every input) and no bounded
activation (leaky ReLU on hidden layers, a linear output layer). The paper's
autoencoder pre-training is not done; the initial weights are uniform in
+-1/sqrt(fan_in) (torch.nn.Linear's default) from the seed.

Inputs are robustly standardized with the training rows' statistics: each
feature's median and IQR/1.349 (MAD x 1.4826, then the standard deviation, then
1 where that is 0); NaN (a missing feature) is imputed by the training median
before standardizing (so it sits at 0), and standardized values are clipped to
+-``clip``. Non-finite values other than NaN are an error. The fit records the
NaN imputed per feature (``n_imputed_fit``, and a note); :meth:`DeepSVDD.n_imputed`
counts those of rows being scored, for the caller to record.

The network's input is then the clipped value plus a fixed ``offset`` (default
``clip``: inputs lie in [0, 2 clip], the training median at ``clip * 1``).
Without it the training median would be the origin, and a bias-free leaky-ReLU
network is positively homogeneous (phi(t z) = t phi(z) for t > 0, phi(0) = 0):
a row at the median (e.g. a field whose missing features were all imputed)
would score ||c||^2, near the maximum, and rows shrunk towards the median would
score higher than typical ones. With the offset, the origin is the corner where
every feature is ``clip`` robust sigmas below its median, far outside the data,
and the median row is an ordinary inlier. The offset is fixed, not learned; the
constant part of the input does act like a bias of size ``offset`` in the first
layer, which the paper's argument warns could let phi approach c everywhere,
but the data's spread (standardized to 1 per feature) keeps phi from
collapsing: shifted and widened distributions still stand out (tests;
``benchmarks/bench_fusion.py``). A smaller offset trades better detection of
widened distributions in few (< ~10) dimensions for a median row scoring
higher; models saved before the offset existed load with offset 0.

This module is numpy only: the science layer never imports torch
(docs/design.md, ``lens_assets_tests/test_layers.py``). The network is a small
MLP trained by Adam on minibatches with hand-written backpropagation (checked
against torch's autograd in the tests); thousands of rows train in about a
second on one core. Everything random (initial weights, minibatch order) comes
from ``seed``, so a fit is reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["DeepSVDD", "fit_deep_svdd", "robust_location_scale"]

_IQR_TO_SIGMA = 1.349  # IQR of a unit Gaussian
_MAD_TO_SIGMA = 1.4826


def robust_location_scale(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per column of ``a`` (NaN ignored): the median and a robust sigma (IQR/1.349, else MAD x 1.4826, else the
    standard deviation, else 1), and the indices of the columns whose sigma fell back to 1 (constant)."""
    a = np.asarray(a, dtype=float)
    with np.errstate(all="ignore"):
        med = np.nanmedian(a, axis=0)
        q75, q25 = np.nanpercentile(a, [75, 25], axis=0)
        scale = (q75 - q25) / _IQR_TO_SIGMA
        mad = np.nanmedian(np.abs(a - med), axis=0) * _MAD_TO_SIGMA
        std = np.nanstd(a, axis=0)
    scale = np.where(scale > 0, scale, np.where(mad > 0, mad, std))
    constant = [int(j) for j in np.flatnonzero(~(scale > 0))]
    return med, np.where(scale > 0, scale, 1.0), constant


def _as_array(X, columns: list | None, n_features: int | None, what: str) -> tuple[np.ndarray, list | None]:
    """A float copy of ``X`` (DataFrame: columns by name, extra ones ignored; array: 2-D), and its column names."""
    if isinstance(X, pd.DataFrame):
        names = list(X.columns) if columns is None else list(columns)
        missing = [c for c in names if c not in X.columns]
        if missing:
            raise ValueError(f"{what} lacks the model's feature columns {missing}")
        out = np.empty((len(X), len(names)))
        for j, c in enumerate(names):
            col = X[c]
            if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                raise ValueError(f"{what}: column {c!r} has dtype {col.dtype}; features must be numeric "
                                 f"(NaN = missing)")
            out[:, j] = col.to_numpy(dtype=float, na_value=np.nan)
    else:
        if columns is not None:
            raise ValueError(f"{what}: the model was fit on a DataFrame with columns {columns}; pass a DataFrame")
        out = np.array(X, dtype=float)  # a copy: callers' arrays are never modified
        if out.ndim != 2:
            raise ValueError(f"{what} must be 2-D (rows x features), got shape {out.shape}")
        if n_features is not None and out.shape[1] != n_features:
            raise ValueError(f"{what} has {out.shape[1]} features, the model was fit on {n_features}")
        names = None
    bad = np.isinf(out).any(axis=0)
    if bad.any():
        cols = [names[j] if names else j for j in np.flatnonzero(bad)]
        raise ValueError(f"{what}: features {cols} hold +-inf; only NaN (missing) is allowed besides finite values")
    return out, names


def _leaky(a: np.ndarray, slope: float) -> np.ndarray:
    return np.where(a > 0, a, slope * a)


def _forward(weights: list, z: np.ndarray, slope: float) -> tuple[np.ndarray, list]:
    """Network outputs and the pre-activations of the hidden layers (for backpropagation)."""
    h, pre = z, []
    for w in weights[:-1]:
        a = h @ w
        pre.append(a)
        h = _leaky(a, slope)
    return h @ weights[-1], pre


def _loss_and_grads(weights: list, z: np.ndarray, c: np.ndarray, *, weight_decay: float,
                    slope: float) -> tuple[float, list]:
    """The Deep SVDD loss on the rows ``z`` (mean squared distance to c + weight_decay/2 sum ||W||^2) and its
    gradient with respect to each weight matrix (shape (fan_in, fan_out), outputs = inputs @ W)."""
    out, pre = _forward(weights, z, slope)
    diff = out - c
    n = len(z)
    loss = float(np.mean(np.sum(diff * diff, axis=1))) + 0.5 * weight_decay * sum(float(np.sum(w * w))
                                                                                    for w in weights)
    grads = [None] * len(weights)
    delta = 2.0 * diff / n  # d loss / d outputs
    for layer in range(len(weights) - 1, -1, -1):
        h = z if layer == 0 else _leaky(pre[layer - 1], slope)
        grads[layer] = h.T @ delta + weight_decay * weights[layer]
        if layer:
            delta = (delta @ weights[layer].T) * np.where(pre[layer - 1] > 0, 1.0, slope)
    return loss, grads


@dataclass
class DeepSVDD:
    """A fitted one-class Deep SVDD (module docstring): standardization, bias-free weights and the centre c."""

    columns: list | None  # feature names when fit on a DataFrame (matched by name when scoring), else None
    n_features: int
    median: np.ndarray  # per feature, of the training rows: NaN imputation value and standardization centre
    scale: np.ndarray  # per feature robust sigma of the training rows
    clip: float | None
    weights: list  # W_l, shape (fan_in, fan_out); no biases
    c: np.ndarray
    negative_slope: float
    score_median: float  # of the training rows' anomaly scores: the standardized score's centre
    score_scale: float  # their robust sigma
    offset: float = 0.0  # added to the clipped standardized inputs (module docstring); 0.0 in models saved before it
    n_imputed_fit: dict = field(default_factory=dict)  # feature (name, or index) -> NaN imputed in the training rows
    config: dict = field(default_factory=dict)  # seed, epochs, batch_size, lr, weight_decay, layers, eps
    loss_history: list = field(default_factory=list)  # mean training loss per epoch
    notes: list = field(default_factory=list)

    def transform(self, X) -> np.ndarray:
        """The network's inputs: (x - median) / scale, NaN imputed by the training median, clipped, plus
        ``offset`` (so a row at the training medians is ``offset * 1``, not the origin)."""
        a, _ = _as_array(X, self.columns, self.n_features, "X")
        a = np.where(np.isnan(a), self.median, a)
        z = (a - self.median) / self.scale
        return (z if self.clip is None else np.clip(z, -self.clip, self.clip)) + self.offset

    def n_imputed(self, X) -> dict:
        """How many NaN of ``X`` :meth:`score` (and :meth:`transform`) replace by the training median, per feature
        (name, or column index for a model fit on an array); features without NaN are left out."""
        a, _ = _as_array(X, self.columns, self.n_features, "X")
        counts = np.isnan(a).sum(axis=0)
        return {(self.columns[j] if self.columns else int(j)): int(counts[j]) for j in np.flatnonzero(counts)}

    def embed(self, X) -> np.ndarray:
        """phi(x): the network's outputs, shape (n, d)."""
        return _forward(self.weights, self.transform(X), self.negative_slope)[0]

    def score(self, X) -> np.ndarray:
        """Anomaly score ||phi(x) - c||^2 per row (higher = more anomalous). A NaN feature is imputed by the
        training median; :meth:`n_imputed` counts them, for the caller to record."""
        d = self.embed(X) - self.c
        return np.sum(d * d, axis=1)

    def standardized_score(self, X) -> np.ndarray:
        """(score - median training score) / its robust sigma: a unitless anomaly logit (0 = a typical
        training non-lens)."""
        return (self.score(X) - self.score_median) / self.score_scale

    def to_dict(self) -> dict:
        """Plain JSON-able fields (floats are written exactly by ``json``: a round trip gives identical scores)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "weights":
                v = [w.tolist() for w in v]
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DeepSVDD":
        """The inverse of :meth:`to_dict`; a dict without ``offset`` (saved before it existed) loads with offset 0,
        which is how that model was trained."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DeepSVDD fields {sorted(unknown)} are not known; expected {sorted(known)}")
        required = {"columns", "n_features", "median", "scale", "clip", "weights", "c", "negative_slope",
                    "score_median", "score_scale"}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"DeepSVDD dict lacks fields {missing}")
        kw = dict(d)
        if "n_imputed_fit" in kw and kw.get("columns") is None:  # JSON turned the column indices into strings
            kw["n_imputed_fit"] = {int(k): v for k, v in kw["n_imputed_fit"].items()}
        kw["weights"] = [np.asarray(w, dtype=float) for w in d["weights"]]
        for k in ("median", "scale", "c"):
            kw[k] = np.asarray(d[k], dtype=float)
        shapes = [w.shape for w in kw["weights"]]
        if not shapes or shapes[0][0] != kw["n_features"] or shapes[-1][1] != len(kw["c"]) or any(
                a[1] != b[0] for a, b in zip(shapes, shapes[1:])):
            raise ValueError(f"DeepSVDD weights of shapes {shapes} do not chain from {kw['n_features']} features "
                             f"to a centre of {len(kw['c'])} coordinates")
        return cls(**kw)

    def save(self, path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (must end in ``.json``); returns ``path``."""
        path = Path(path)
        if path.suffix != ".json":
            raise ValueError(f"{path}: a Deep SVDD model is saved as JSON; the path must end in .json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path) -> "DeepSVDD":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def n_parameters(self) -> int:
        return int(sum(w.size for w in self.weights))


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"fit_deep_svdd: {name} must be {what}, got {value!r}")


def fit_deep_svdd(X, *, seed: int, epochs: int = 100, layers=(32, 16), batch_size: int = 128, lr: float = 1e-3,
                  weight_decay: float = 1e-6, eps: float = 0.1, negative_slope: float = 0.1,
                  clip: float | None = 10.0, offset: float | None = None) -> DeepSVDD:
    """Fit Deep SVDD on the rows of ``X`` (a DataFrame of features, or a 2-D array): all of them are inliers.

    ``layers``: the widths of the hidden layers and, last, of the output (the
    representation's dimension d). Adam (``lr``; betas 0.9, 0.999) on minibatches
    of ``batch_size`` rows in a fresh random order each epoch; ``weight_decay`` is
    the lambda of the objective (module docstring). ``eps``: the centre's minimum
    |coordinate|. ``clip``: the standardized inputs' bound (None: no clipping).
    ``offset``: added to the clipped standardized inputs; None means ``clip``
    (inputs in [0, 2 clip]), or 10 when ``clip`` is None (module docstring).
    """
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    _check("seed", seed, is_int(seed), "an integer")
    _check("epochs", epochs, is_int(epochs) and epochs >= 1, "an integer >= 1")
    _check("batch_size", batch_size, is_int(batch_size) and batch_size >= 1, "an integer >= 1")
    layers = tuple(layers)
    _check("layers", layers, len(layers) >= 1 and all(is_int(w) and w >= 1 for w in layers),
           "a non-empty sequence of integers >= 1")
    for name, v in (("lr", lr), ("eps", eps)):
        _check(name, v, np.isfinite(v) and v > 0, "a finite number > 0")
    _check("weight_decay", weight_decay, np.isfinite(weight_decay) and weight_decay >= 0, "a finite number >= 0")
    _check("negative_slope", negative_slope, 0 <= negative_slope < 1, "in [0, 1)")
    _check("clip", clip, clip is None or clip > 0, "None or a number > 0")
    offset = float((10.0 if clip is None else clip) if offset is None else offset)
    _check("offset", offset, np.isfinite(offset) and offset > 0, "None or a finite number > 0")
    a, names = _as_array(X, None, None, "X")
    n, p = a.shape
    if n < 2 or p < 1:
        raise ValueError(f"fit_deep_svdd needs at least 2 rows and 1 feature, got shape {a.shape}")
    all_nan = np.isnan(a).all(axis=0)
    if all_nan.any():
        cols = [names[j] if names else int(j) for j in np.flatnonzero(all_nan)]
        raise ValueError(f"fit_deep_svdd: features {cols} are NaN in every training row; drop them")
    notes = []
    median, scale, constant = robust_location_scale(a)
    if constant:
        notes.append(f"constant in the training rows (scale set to 1): {[names[j] if names else j for j in constant]}")
    nan_counts = np.isnan(a).sum(axis=0)
    n_imputed_fit = {(names[j] if names else int(j)): int(nan_counts[j]) for j in np.flatnonzero(nan_counts)}
    if n_imputed_fit:
        notes.append(f"{int(nan_counts.sum())} missing values of the {n} training rows imputed by the training "
                     f"median: {n_imputed_fit}")
    model = DeepSVDD(columns=names, n_features=p, median=median, scale=scale, clip=clip, weights=[], c=np.zeros(0),
                     negative_slope=float(negative_slope), score_median=0.0, score_scale=1.0, offset=offset,
                     n_imputed_fit=n_imputed_fit, notes=notes,
                     config=dict(seed=int(seed), epochs=int(epochs), layers=list(layers), batch_size=int(batch_size),
                                 lr=float(lr), weight_decay=float(weight_decay), eps=float(eps)))
    z = (np.where(np.isnan(a), median, a) - median) / scale
    z = (z if clip is None else np.clip(z, -clip, clip)) + offset
    rng = np.random.default_rng(seed)
    widths = (p, *layers)
    weights = [rng.uniform(-1.0, 1.0, size=(fi, fo)) / np.sqrt(fi) for fi, fo in zip(widths, widths[1:])]
    c = _forward(weights, z, negative_slope)[0].mean(axis=0)
    c = np.where(np.abs(c) < eps, np.where(c < 0, -eps, eps), c)
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    b1, b2, tiny, step = 0.9, 0.999, 1e-8, 0
    bs = min(batch_size, n)
    history = []
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            loss, grads = _loss_and_grads(weights, z[idx], c, weight_decay=weight_decay, slope=negative_slope)
            total += loss * len(idx)
            step += 1
            for w, g, mw, vw in zip(weights, grads, m, v):
                mw *= b1
                mw += (1 - b1) * g
                vw *= b2
                vw += (1 - b2) * g * g
                w -= lr * (mw / (1 - b1 ** step)) / (np.sqrt(vw / (1 - b2 ** step)) + tiny)
        history.append(total / n)
    model.weights, model.c, model.loss_history = weights, c, history
    d = _forward(weights, z, negative_slope)[0] - c
    train_scores = np.sum(d * d, axis=1)
    smed, sscale, _ = robust_location_scale(train_scores[:, None])
    model.score_median, model.score_scale = float(smed[0]), float(sscale[0])
    return model
