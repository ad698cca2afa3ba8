"""Stratified, sky-grouped train/val/test splits.

* Objects closer on the sky than a linking length share a group
  (friends-of-friends), and a group never spans two splits, so duplicate or
  neighbouring observations cannot leak between train and test.
* Groups are stratified on seven factors: redshift, magnitude, seeing, PSF FWHM,
  pixel scale, survey, label. A stratum with too few groups to split is merged
  into a coarser one by dropping factors from the least important end
  (:data:`MERGE_ORDER`), never crashing; what merged is reported.
* ``pretrain:*`` rows, unlabeled rows and held-out simulation families never
  enter the supervised splits; they are counted by reason. A simulated file is
  held out by its family's name (``exclude_families``) or by its own
  ``SIMROLE`` (``sim_role`` ``heldout`` or ``pairs``, :data:`HELDOUT_ROLES`),
  so a held-out drop stays out even where nothing else records what it was.
* The validation split has two halves (column ``val_role``, :data:`VAL_ROLES`):
  ``stop`` rows serve early stopping and checkpoint choice, ``calibrate`` rows
  fit the fusion weights and the calibrator, so calibration is fit on data the
  members were not selected on. Sky groups stay whole; the assignment is a
  function of the table alone (:func:`assign_val_roles`), so a table written
  before the column existed gets the same halves.
* :func:`cross_split_pairs` checks a split table for leaks from its positions
  and ``split`` column alone (a KD-tree search for cross-split pairs within the
  linking length), so it does not trust the grouping that made the splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["SPLITS", "FACTORS", "MERGE_ORDER", "SplitResult", "sky_groups", "stratify_factors", "make_splits",
           "balance_table", "split_checks", "cross_split_pairs", "VAL_ROLES", "assign_val_roles", "val_roles",
           "val_role_checks", "require_both_labels", "HELDOUT_ROLES", "has_role"]

SPLITS = ("train", "val", "test")
FACTORS = ("redshift", "magnitude", "seeing", "psf_fwhm", "pixel_scale", "survey", "label")
# dropped first to last when a stratum is too small; label is the last to go
MERGE_ORDER = ("psf_fwhm", "pixel_scale", "magnitude", "redshift", "seeing", "survey", "label")
MIXED_LABEL = 2  # the label class of a sky group with both lenses and non-lenses
HELDOUT_ROLES = ("heldout", "pairs")  # SIMROLE values kept out of the splits (fits_writer.SIM_ROLES)
VAL_ROLES = ("stop", "calibrate")  # halves of the val split: early stopping / checkpoint choice, fusion + calibration


@dataclass
class SplitResult:
    table: pd.DataFrame  # objid, split, sky_group, stratum, stratum_level, label, val_role
    excluded: dict  # reason -> count
    merged: list = field(default_factory=list)  # (original stratum, merged into, n groups)


def _close_pairs(ra_deg, dec_deg, *, link_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of objects at most ``link_arcsec`` apart on the sphere, and their separations (arcsec).

    Positions become unit vectors; the angular link maps to the chord 2 sin(θ/2), so a KD-tree radius query is
    exact on the sphere (no RA wrap at 0/360, no cos δ squeeze near the poles).
    """
    from scipy.spatial import cKDTree

    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    xyz = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    chord = 2.0 * np.sin(np.radians(link_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(xyz).query_pairs(chord, output_type="ndarray").reshape(-1, 2)
    d = np.linalg.norm(xyz[pairs[:, 0]] - xyz[pairs[:, 1]], axis=1)
    return pairs, np.degrees(2.0 * np.arcsin(np.clip(d / 2.0, 0.0, 1.0))) * 3600.0


def sky_groups(ra_deg: np.ndarray, dec_deg: np.ndarray, *, link_arcsec: float) -> np.ndarray:
    """Friends-of-friends group id per object: chains of pairs closer than ``link_arcsec`` share an id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs, _ = _close_pairs(ra_deg, dec_deg, link_arcsec=link_arcsec)
    n = len(np.asarray(ra_deg))
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def cross_split_pairs(table: pd.DataFrame, *, link_arcsec: float, n_examples: int = 5) -> dict:
    """Leaks found from positions and the ``split`` column alone, independently of ``sky_group``.

    ``table`` has one row per split row: ``objid``, ``split``, ``ra``, ``dec`` (deg). Every pair of rows at most
    ``link_arcsec`` apart whose splits differ is a leak: the criterion that links a sky group, so splits made
    from a correct grouping have none, and a sky group spans two splits exactly when one of its links does
    (an objid with rows in two splits is one too, at separation 0). Returns ``n_pairs``,
    ``min_separation_arcsec`` (of the cross-split pairs; NaN without any) and ``examples`` (the
    ``n_examples`` closest pairs).
    """
    missing = [c for c in ("objid", "split", "ra", "dec") if c not in table.columns]
    if missing:
        raise ValueError(f"cross_split_pairs needs columns {missing}; the table has {list(table.columns)}")
    bad = table[~(np.isfinite(table["ra"]) & np.isfinite(table["dec"]))]
    if len(bad):
        raise ValueError(f"cross_split_pairs: {len(bad)} rows have no finite ra/dec, e.g. objid "
                         f"{bad['objid'].iloc[0]!r} (ra={bad['ra'].iloc[0]}, dec={bad['dec'].iloc[0]})")
    pairs, sep = _close_pairs(table["ra"].to_numpy(), table["dec"].to_numpy(), link_arcsec=link_arcsec)
    split = table["split"].to_numpy()
    cross = split[pairs[:, 0]] != split[pairs[:, 1]]
    pairs, sep = pairs[cross], sep[cross]
    order = np.argsort(sep, kind="stable")[:n_examples]
    objid = table["objid"].to_numpy()
    examples = [{"objid_a": str(objid[i]), "split_a": str(split[i]), "objid_b": str(objid[j]),
                 "split_b": str(split[j]), "separation_arcsec": float(s)}
                for (i, j), s in zip(pairs[order], sep[order])]
    return {"n_pairs": int(len(pairs)), "min_separation_arcsec": float(sep.min()) if len(sep) else float("nan"),
            "examples": examples}


def _quantile_bins(values: pd.Series, n_bins: int) -> pd.Series:
    """Quantile bin index of each value; -1 (missing) and NaN are their own bin 'na'."""
    v = pd.to_numeric(values, errors="coerce").astype(float)
    missing = v.isna() | (v == -1.0)
    out = pd.Series("na", index=values.index, dtype=object)
    if (~missing).sum() >= n_bins:
        ranks = v[~missing].rank(method="first")
        out[~missing] = pd.qcut(ranks, n_bins, labels=False).astype(int).astype(str)
    elif (~missing).any():
        out[~missing] = "0"
    return out


def stratify_factors(catalog: pd.DataFrame, *, reference_band: str, n_bins: int = 3) -> pd.DataFrame:
    """The seven stratification factors of each row, as strings (binned where continuous)."""
    z = catalog["z_spec"].where(catalog["z_spec"] >= 0, catalog["z_phot"])
    return pd.DataFrame({
        "redshift": _quantile_bins(z, n_bins),
        "magnitude": _quantile_bins(catalog[f"mag_{reference_band}"], n_bins),
        "seeing": _quantile_bins(catalog["seeing"], n_bins),
        "psf_fwhm": _quantile_bins(catalog["psf_fwhm"], n_bins),
        "pixel_scale": catalog["pixel_scale"].round(3).astype(str),
        "survey": catalog["survey"].astype(str),
        "label": catalog["label"].astype(int).astype(str),
    }, index=catalog.index)


def _key(row_factors: pd.DataFrame, level: int) -> pd.Series:
    """Stratum key keeping the first ``level`` factors of FACTORS minus the dropped ones."""
    keep = [f for f in FACTORS if f not in MERGE_ORDER[:len(FACTORS) - level]]
    if not keep:
        return pd.Series("all", index=row_factors.index)
    return row_factors[keep].astype(str).agg("|".join, axis=1).map(lambda s: s)


def has_role(catalog: pd.DataFrame, *roles: str) -> pd.Series:
    """Rows whose file's ``SIMROLE`` (catalog column ``sim_role``) is one of ``roles``; none in a catalog
    ingested before the column existed."""
    if "sim_role" not in catalog:
        return pd.Series(False, index=catalog.index)
    return catalog["sim_role"].isin(roles)


def make_splits(catalog: pd.DataFrame, *, reference_band: str, fractions=(0.70, 0.15, 0.15), seed: int = 0,
                link_arcsec: float = 10.0, n_bins: int = 3, min_groups_per_stratum: int = 10,
                exclude_families: tuple[str, ...] = ("heldout",)) -> SplitResult:
    """Assign every eligible catalog row to train/val/test; see the module docstring."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    excluded = {
        "pretrain": catalog["label_source"].str.startswith("pretrain:"),
        "unlabeled": catalog["label"] < 0,
        "heldout_family": catalog["sim_family"].isin(exclude_families),
        # the file's own SIMROLE: held out whatever its family is called or whoever simulated it
        "heldout_role": has_role(catalog, *HELDOUT_ROLES),
    }
    drop = np.zeros(len(catalog), bool)
    counts = {}
    for reason, mask in excluded.items():
        mask = mask.to_numpy() & ~drop
        counts[reason] = int(mask.sum())
        drop |= mask
    cat = catalog.loc[~drop].sort_values("objid").reset_index(drop=True)
    if cat.empty:
        raise ValueError("no catalog rows are eligible for supervised splits "
                         f"(excluded: {counts})")
    groups = sky_groups(cat["ra"].to_numpy(), cat["dec"].to_numpy(), link_arcsec=link_arcsec)
    factors = stratify_factors(cat, reference_band=reference_band, n_bins=n_bins)
    first = pd.Series(np.arange(len(cat))).groupby(groups).transform("min").to_numpy()
    group_factors = factors.iloc[first].reset_index(drop=True)  # a group takes its first member's stratum
    # a group holding lenses and non-lenses (a lens and its twin share a sky position) is its own label class,
    # so such groups are spread over the splits among themselves and every split keeps the lens fraction
    group_label = _group_label_class(pd.DataFrame({"sky_group": groups, "label": cat["label"].to_numpy()}))
    group_factors.loc[(group_label == MIXED_LABEL).reindex(groups).to_numpy(), "label"] = "mixed"

    level = np.full(len(cat), len(FACTORS))
    key = _key(group_factors, len(FACTORS))
    merged = []
    for lvl in range(len(FACTORS), 0, -1):
        n_groups = pd.Series(groups).groupby(key.to_numpy()).nunique()
        small = key.isin(n_groups[n_groups < min_groups_per_stratum].index) & (level == lvl)
        if not small.any():
            continue
        coarser = _key(group_factors, lvl - 1)
        for old, new in sorted(set(zip(key[small], coarser[small]))):
            merged.append((old, new, int(n_groups[old])))
        key = key.where(~small, coarser)
        level = np.where(small, lvl - 1, level)

    rng = np.random.default_rng(seed)
    split_of_group: dict[int, str] = {}
    sizes = pd.Series(groups).value_counts()
    targets = np.asarray(fractions)
    # carried across strata, per label, so rounding leftovers cancel instead of piling up in one split
    overall: dict[int, np.ndarray] = {}
    for stratum in sorted(key.unique()):
        members = np.unique(groups[(key == stratum).to_numpy()])
        order = rng.permutation(members)
        assigned = np.zeros(3)
        for g in order:
            n = sizes[g]
            seen = overall.setdefault(int(group_label[g]), np.zeros(3))
            # the split furthest behind its share, in this stratum and over all strata of this label together;
            # ties at random
            best = _furthest_behind(targets, n, assigned, seen)
            s = int(best[0] if len(best) == 1 else rng.choice(best))
            assigned[s] += n
            seen[s] += n
            split_of_group[int(g)] = SPLITS[s]
    table = pd.DataFrame({"objid": cat["objid"], "split": [split_of_group[int(g)] for g in groups],
                          "sky_group": groups, "stratum": key.to_numpy(), "stratum_level": level,
                          "label": cat["label"].astype(int)})
    table["val_role"] = assign_val_roles(table)
    return SplitResult(table=table, excluded=counts, merged=merged)


def balance_table(table: pd.DataFrame, catalog: pd.DataFrame, *, reference_band: str, n_bins: int = 3) -> pd.DataFrame:
    """Share of each split's rows in each bin of each factor (rows: factor/bin, columns: splits)."""
    cat = catalog.set_index("objid").loc[table["objid"]].reset_index()
    f = stratify_factors(cat, reference_band=reference_band, n_bins=n_bins)
    rows = []
    for factor in FACTORS:
        shares = pd.crosstab(f[factor].to_numpy(), table["split"].to_numpy(), normalize="columns")
        for b, r in shares.iterrows():
            rows.append({"factor": factor, "bin": b, **{s: float(r.get(s, 0.0)) for s in SPLITS}})
    return pd.DataFrame(rows)


def split_checks(table: pd.DataFrame, *, tolerance: float = 0.02) -> dict:
    """The three split invariants: label fractions agree, no objid or sky group in two splits.

    The label-fraction tolerance is ``tolerance`` or one object's share of the
    smallest split, whichever is larger (a split of 40 objects cannot be closer
    than 1/40). An empty split has no label fraction to agree: the fractions do
    not agree, and ``empty_splits`` names it.
    """
    counts = table["split"].value_counts()
    empty = [s for s in SPLITS if int(counts.get(s, 0)) == 0]
    fractions = table.groupby("split")["label"].mean()
    spread = float(fractions.max() - fractions.min()) if len(fractions) else 0.0
    allowed = max(tolerance, 1.0 / max(1, int(counts.min()))) if len(counts) else tolerance
    objid_splits = table.groupby("objid")["split"].nunique()
    group_splits = table.groupby("sky_group")["split"].nunique()
    return {
        "label_fraction": {s: float(fractions.get(s, float("nan"))) for s in SPLITS},
        "label_fraction_spread": spread, "label_fraction_allowed": allowed,
        "label_fractions_agree": bool(spread <= allowed) and not empty, "empty_splits": empty,
        "objids_in_two_splits": int((objid_splits > 1).sum()),
        "sky_groups_across_splits": int((group_splits > 1).sum()),
        "counts": {s: int(counts.get(s, 0)) for s in SPLITS},
    }


def _furthest_behind(targets: np.ndarray, n: int, *counts: np.ndarray) -> np.ndarray:
    """Indices of the bins furthest behind their target shares once ``n`` more rows are placed, summing each
    tally's deficit ``targets * (total + n) - tally`` over ``counts`` (ties: every best index, in order)."""
    score = sum(targets * (c.sum() + n) - c for c in counts)
    return np.flatnonzero(np.isclose(score, score.max()))


def _group_label_class(table: pd.DataFrame) -> pd.Series:
    """Per sky group: 0 (non-lenses only), 1 (lenses only) or MIXED_LABEL (both)."""
    by_group = table.groupby("sky_group")["label"]
    lo, hi = by_group.min(), by_group.max()
    return lo.where(lo == hi, MIXED_LABEL).astype(int)


def _stable_hash(values) -> np.ndarray:
    """A uint64 per value from sha256 of its string form: the same in every process and on every machine."""
    import hashlib

    return np.array([int.from_bytes(hashlib.sha256(str(v).encode()).digest()[:8], "big") for v in values],
                    dtype=np.uint64)


def assign_val_roles(table: pd.DataFrame, *, calibrate_fraction: float = 0.5) -> pd.Series:
    """``val_role`` of each row of a splits table: "stop" or "calibrate" on val rows, "" elsewhere.

    Reads ``split``, ``sky_group`` and ``label``. A sky group is never divided. Within
    each label class of groups (non-lens, lens, mixed) the groups are taken in the
    order of a hash of their ``sky_group`` id and each goes to the half furthest
    behind its share of rows, in that class and over all val rows together (as
    :func:`make_splits` assigns splits); a tie goes to "stop", so a val split of one
    sky group still leaves training something to early-stop on. So the halves
    keep the val split's lens fraction, and each holds lenses and non-lenses
    whenever the val split has two sky groups with lenses and two with non-lenses.
    """
    if not 0.0 < calibrate_fraction < 1.0:
        raise ValueError(f"calibrate_fraction must be in (0, 1), got {calibrate_fraction}")
    missing = [c for c in ("split", "sky_group", "label") if c not in table]
    if missing:
        raise ValueError(f"a splits table needs columns {missing} to assign val_role; it has {list(table.columns)}")
    roles = pd.Series("", index=table.index, dtype=object)
    val = table[table["split"] == "val"]
    if val.empty:
        return roles
    group_class = _group_label_class(val)
    sizes = val.groupby("sky_group").size()
    groups = group_class.index.to_numpy()
    keys = _stable_hash(groups)
    targets = np.array([1.0 - calibrate_fraction, calibrate_fraction])
    overall = np.zeros(2)
    role_of_group = {}
    for cls in sorted(group_class.unique()):
        in_class = group_class.to_numpy() == cls
        order = np.argsort(keys[in_class], kind="stable")
        assigned = np.zeros(2)
        for g in groups[in_class][order]:
            n = sizes[g]
            r = int(_furthest_behind(targets, n, assigned, overall)[0])
            assigned[r] += n
            overall[r] += n
            role_of_group[g] = VAL_ROLES[r]
    roles[val.index] = val["sky_group"].map(role_of_group).to_numpy()
    return roles


def val_roles(table: pd.DataFrame, *, source: str) -> pd.Series:
    """The table's ``val_role`` column, checked; computed by :func:`assign_val_roles` when a table written before
    the column existed lacks it (a warning says so). ``source`` names the table in messages."""
    import logging

    if "val_role" not in table:
        logging.getLogger(__name__).warning(
            f"{source}: no val_role column (a splits table from before the validation split had halves); "
            "computing it from sky_group and label as dataset_splits does")
        return assign_val_roles(table)
    roles = table["val_role"].fillna("").astype(str)
    bad = (table["split"] == "val") & ~roles.isin(VAL_ROLES)
    if bad.any():
        first = table.loc[bad].iloc[0]
        raise ValueError(f"{source}: val_role is {roles[bad].iloc[0]!r} for val row {first['objid']!r} "
                         f"({int(bad.sum())} such rows); val rows need one of {list(VAL_ROLES)}")
    return roles


def require_both_labels(labels, *, what: str) -> None:
    """ValueError naming ``what`` unless ``labels`` hold lenses (1) and non-lenses (0)."""
    y = np.asarray(labels, dtype=int)
    n_lenses = int((y == 1).sum())
    if n_lenses == 0 or n_lenses == len(y):
        raise ValueError(f"{what} has {n_lenses} lenses and {len(y) - n_lenses} non-lenses; it needs both "
                         "(enlarge the validation split: more objects or a larger val fraction)")


def val_role_checks(table: pd.DataFrame, *, source: str = "splits table") -> dict:
    """Rows, lenses and lens fraction of each half of the val split, and whether both halves hold both labels."""
    roles = val_roles(table, source=source)
    out = {}
    for role in VAL_ROLES:
        y = table.loc[(table["split"] == "val") & (roles == role), "label"]
        out[role] = {"n": int(len(y)), "n_lenses": int((y == 1).sum()),
                     "lens_fraction": float(y.mean()) if len(y) else float("nan")}
    out["both_labels_in_each_half"] = all(0 < out[r]["n_lenses"] < out[r]["n"] for r in VAL_ROLES)
    return out
