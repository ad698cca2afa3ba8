"""The cluster track's figures: Bologna metrics per model and set, recall by arcs, PU against full labels.

``scores`` is the classifier's long table: one row per (model, field) with
``model``, ``set`` (``test`` or a held-out family's name), ``label``, ``logit``,
``n_arcs`` (lensed background sources, each making one or more arcs; a group counts
its members) and ``arc_sb`` (lenses' truth). Ranking figures use the logit; recall
by number of lensed sources and by arc surface brightness is taken at each
(model, set)'s operating point of FPR ≤ 0.1 (the plan's; TPR10 beside it counts its
non-lenses, which are few in a cluster sample). :func:`report_markdown` also sets
each model's AUROC against ``track_a``'s on the same set: the colour ablation
(``track_a_no_colour``) and PU learning from few labels (``pu_<n>``) against full
labels.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..metrics import (bologna_metrics, bootstrap_interval, expected_calibration_error, fnr_by_bins,
                       threshold_at_n_false_positives)

__all__ = ["ARC_COUNT_BINS", "ARC_SB_BINS", "cluster_figures", "threshold_at_fpr", "report_markdown", "HEADLINE"]

ARC_COUNT_BINS = (("1", 0.5, 1.5), ("2", 1.5, 2.5), ("3+", 2.5, math.inf))  # lensed background sources
ARC_SB_BINS = (("lt_24", -math.inf, 24.0), ("24_25", 24.0, 25.0), ("ge_25", 25.0, math.inf))  # mag/arcsec²
HEADLINE = ("auroc", "auprc", "tpr0", "tpr10", "tpr_at_fpr_0.1", "ece")


def threshold_at_fpr(labels, scores, max_fpr: float) -> float:
    """The lowest score threshold (a lens counts when its score is strictly above it) whose FPR is ≤ ``max_fpr``:
    :func:`..metrics.threshold_at_n_false_positives` with ``floor(max_fpr × non-lenses)`` false positives."""
    n_neg = int((np.asarray(labels) == 0).sum())
    return threshold_at_n_false_positives(labels, scores, int(math.floor(max_fpr * n_neg)))


def cluster_figures(scores: pd.DataFrame, *, n_boot: int = 500, seed: int = 0) -> dict:
    """``{model: {set: figures}}``: the Bologna figures (with counts and a bootstrap 95% interval of AUROC),
    recall per number of lensed sources (``recall_sources_<bin>``) and per arc surface brightness
    (``recall_arc_sb_<bin>``) at FPR ≤ 0.1; a set without both classes has ``{"n_lenses": ..., "n_nonlenses":
    ...}`` alone."""
    out: dict = {}
    for (model, name), part in scores.groupby(["model", "set"], sort=True):
        y, s = part["label"].to_numpy(int), part["logit"].to_numpy(float)
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos == 0 or n_neg == 0:
            out.setdefault(model, {})[name] = {"n_lenses": n_pos, "n_nonlenses": n_neg}
            continue
        f = {k: v for k, v in bologna_metrics(y, s).items() if k in HEADLINE}
        # calibration of the probability the model reports (its calibrator's, or P(lens) = g / c for PU models)
        f["ece"] = expected_calibration_error(y, part["prob"].to_numpy(float)) if "prob" in part else float("nan")
        f.update(n_lenses=n_pos, n_nonlenses=n_neg)
        f["auroc_ci"] = list(bootstrap_interval(y, s, "auroc", n_boot=n_boot, seed=seed))
        thr = threshold_at_fpr(y, s, 0.1)
        for col, bins, key in (("n_arcs", ARC_COUNT_BINS, "sources"), ("arc_sb", ARC_SB_BINS, "arc_sb")):
            for bin_name, v in fnr_by_bins(y, s, part[col].to_numpy(float), bins, threshold=thr).items():
                f[f"recall_{key}_{bin_name}"] = 1.0 - v["fnr"] if v["n_lenses"] else float("nan")
                f[f"n_lenses_{key}_{bin_name}"] = int(v["n_lenses"])
        out.setdefault(model, {})[name] = f
    return out


def _cell(f: dict, key: str) -> str:
    v = f.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "no objects"
    if key == "auroc" and "auroc_ci" in f:
        return f"{v:.3f} [{f['auroc_ci'][0]:.3f}, {f['auroc_ci'][1]:.3f}]"
    return f"{v:.3f}"


def report_markdown(figures: dict, *, survey: str, notes: list[str] | None = None) -> str:
    """The report page: one table per figure group, models × sets, three decimals; empty bins say so."""
    lines = [f"# Cluster report — {survey}", ""]
    lines += [f"- {n}" for n in notes or []]
    lines += ["", "## Bologna figures (logit ranking; AUROC with its bootstrap 95% interval)", "",
              "| model | set | lenses | non-lenses | AUROC | AUPRC | TPR0 | TPR10 | TPR at FPR 0.1 | ECE |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for model, sets in figures.items():
        for name, f in sets.items():
            cells = [_cell(f, k) for k in HEADLINE] if "auroc" in f else ["no objects of one class"] * len(HEADLINE)
            lines.append(f"| {model} | {name} | {f['n_lenses']} | {f['n_nonlenses']} | " + " | ".join(cells) + " |")
    if "track_a" in figures:
        lines += ["", "## AUROC against track_a (full labels, every feature) on the same set", "",
                  "| model | set | AUROC | track_a | difference |", "|---|---|---|---|---|"]
        for model, sets in figures.items():
            for name, f in sets.items():
                ref = figures["track_a"].get(name, {})
                if model != "track_a" and "auroc" in f and "auroc" in ref:
                    lines.append(f"| {model} | {name} | {f['auroc']:.3f} | {ref['auroc']:.3f} | "
                                 f"{f['auroc'] - ref['auroc']:+.3f} |")
    lines += ["", "## Recall at FPR ≤ 0.1 by lensed sources and by arc surface brightness (mag/arcsec²)", "",
              "| model | set | " + " | ".join(f"{b[0]} sources" for b in ARC_COUNT_BINS) + " | "
              + " | ".join(f"SB {b[0]}" for b in ARC_SB_BINS) + " |",
              "|---|---|" + "---|" * (len(ARC_COUNT_BINS) + len(ARC_SB_BINS))]
    for model, sets in figures.items():
        for name, f in sets.items():
            if "auroc" not in f:
                continue
            cells = []
            for key, bins in (("sources", ARC_COUNT_BINS), ("arc_sb", ARC_SB_BINS)):
                for b in bins:
                    n = f[f"n_lenses_{key}_{b[0]}"]
                    cells.append(f"{f[f'recall_{key}_{b[0]}']:.3f} ({n})" if n else "no objects")
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
