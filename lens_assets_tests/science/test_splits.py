"""Stratified, sky-grouped train/val/test splits (lens_assets.science.splits).

Catalogs here are synthetic pandas DataFrames holding only the columns that
``make_splits`` / ``stratify_factors`` read; positions are spread over most of
the sky so that no two unrelated objects fall within the 10" linking length
unless a test puts them there.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.splits import (FACTORS, MERGE_ORDER, SPLITS, VAL_ROLES, assign_val_roles, balance_table,
                                        cross_split_pairs, make_splits, require_both_labels, sky_groups, split_checks,
                                        stratify_factors, val_role_checks, val_roles)

REF = "r"
ARCSEC = 1.0 / 3600.0


# --------------------------------------------------------------------------- helpers


def make_catalog(n: int, *, seed: int = 0, lens_fraction: float = 0.3, prefix: str = "obj",
                 label_source: str = "sim:lenstronomy", sim_family: str = "baseline") -> pd.DataFrame:
    """``n`` labeled rows with every column the splitter reads; ~half the redshifts are photometric only."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.1, 1.5, n)
    spec = rng.random(n) < 0.5
    return pd.DataFrame({
        "objid": [f"{prefix}-{i:06d}" for i in range(n)],
        "ra": rng.uniform(0.0, 360.0, n),
        "dec": np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n))),  # uniform on the sphere, |dec| < 64 deg
        "label": (rng.random(n) < lens_fraction).astype(int),
        "label_source": label_source,
        "sim_family": sim_family,
        "z_spec": np.where(spec, z, -1.0),
        "z_phot": np.where(spec, -1.0, z),
        f"mag_{REF}": rng.uniform(17.0, 23.0, n),
        "seeing": rng.uniform(0.8, 2.0, n),
        "psf_fwhm": rng.uniform(0.8, 2.0, n),
        "pixel_scale": 0.396,
        "survey": "sdss",
    })


def with_pairs(catalog: pd.DataFrame, n_pairs: int, *, seed: int = 1, sep_arcsec: float = 1.0) -> pd.DataFrame:
    """``catalog`` plus ``n_pairs`` duplicate observations: ``dup-NNNN-a`` / ``dup-NNNN-b``, ``sep_arcsec`` apart."""
    rng = np.random.default_rng(seed)
    a = make_catalog(n_pairs, seed=seed + 100)
    ra = rng.uniform(0.0, 360.0, n_pairs)
    dec = rng.uniform(-60.0, 60.0, n_pairs)
    a["ra"], a["dec"] = ra, dec
    a["objid"] = [f"dup-{i:04d}-a" for i in range(n_pairs)]
    b = a.copy()
    b["objid"] = [f"dup-{i:04d}-b" for i in range(n_pairs)]
    b["dec"] = dec + sep_arcsec * ARCSEC
    # the second observation has its own measured seeing / magnitude, as a real re-observation would
    b["seeing"] = rng.uniform(0.8, 2.0, n_pairs)
    b[f"mag_{REF}"] = a[f"mag_{REF}"] + rng.normal(0.0, 0.05, n_pairs)
    return pd.concat([catalog, a, b], ignore_index=True)


def split_of(result) -> pd.Series:
    return result.table.set_index("objid")["split"]


# --------------------------------------------------------------------------- 1. sky groups


def test_sky_groups_link_close_pairs_only():
    dec0 = 20.0
    ra = np.array([50.0, 50.0, 120.0, 120.0])
    dec = np.array([dec0, dec0 + 5 * ARCSEC, dec0, dec0 + 20 * ARCSEC])
    g = sky_groups(ra, dec, link_arcsec=10.0)
    assert g[0] == g[1], "5\" apart must share a group at a 10\" link"
    assert g[2] != g[3], "20\" apart must not share a group at a 10\" link"
    assert len({g[0], g[2], g[3]}) == 3


def test_sky_groups_use_true_angular_separation_not_delta_ra():
    # at dec 60 a 16" step in RA is 8" on the sky
    dec = 60.0
    ra = np.array([10.0, 10.0 + 16 * ARCSEC, 10.0 + 32 * ARCSEC])
    g = sky_groups(ra, np.full(3, dec), link_arcsec=10.0)
    assert len(set(g)) == 1
    g = sky_groups(ra, np.full(3, dec), link_arcsec=7.0)
    assert len(set(g)) == 3


def test_sky_groups_chain_is_one_group():
    # A-B and B-C are 8" apart, A-C is 16": friends-of-friends joins all three
    ra = np.array([200.0, 200.0, 200.0, 201.0])
    dec = np.array([-30.0, -30.0 + 8 * ARCSEC, -30.0 + 16 * ARCSEC, -30.0])
    g = sky_groups(ra, dec, link_arcsec=10.0)
    assert g[0] == g[1] == g[2]
    assert g[3] != g[0]
    # the chain is broken if the link is shorter than each step
    g = sky_groups(ra, dec, link_arcsec=7.0)
    assert len(set(g)) == 4


@pytest.mark.parametrize("dec", [0.0, 45.0, -70.0])
def test_sky_groups_across_ra_wrap(dec):
    # 359.999 and 0.0005 deg are 0.0015 deg = 5.4" apart in RA (less on the sky away from the equator)
    ra = np.array([359.999, 0.0005, 180.0])
    g = sky_groups(ra, np.array([dec, dec, dec]), link_arcsec=10.0)
    assert g[0] == g[1]
    assert g[2] != g[0]


def test_sky_groups_across_ra_wrap_respect_the_link():
    ra = np.array([359.999, 0.0005])
    assert len(set(sky_groups(ra, np.zeros(2), link_arcsec=3.0))) == 2  # 5.4" > 3"


def test_sky_groups_single_object():
    assert list(sky_groups(np.array([1.0]), np.array([2.0]), link_arcsec=10.0)) == [0]


# --------------------------------------------------------------------------- 2. determinism, fractions, coverage


def test_splits_are_deterministic_and_seed_dependent():
    cat = make_catalog(2000, seed=3)
    r1 = make_splits(cat, reference_band=REF, seed=7)
    r2 = make_splits(cat, reference_band=REF, seed=7)
    pd.testing.assert_frame_equal(r1.table, r2.table)
    assert r1.excluded == r2.excluded and r1.merged == r2.merged

    # the catalog's row order does not matter (rows are sorted by objid first)
    shuffled = cat.sample(frac=1.0, random_state=11).reset_index(drop=True)
    pd.testing.assert_frame_equal(make_splits(shuffled, reference_band=REF, seed=7).table, r1.table)

    r3 = make_splits(cat, reference_band=REF, seed=8)
    s1, s3 = split_of(r1), split_of(r3).loc[split_of(r1).index]
    assert (s1 != s3).mean() > 0.1, "another seed must give a different assignment"


def test_split_fractions_and_every_row_in_exactly_one_split():
    cat = make_catalog(2000, seed=5)
    result = make_splits(cat, reference_band=REF, seed=0)
    table = result.table
    assert list(table.columns[:5]) == ["objid", "split", "sky_group", "stratum", "stratum_level"]
    assert len(table) == len(cat)
    assert table["objid"].is_unique
    assert set(table["objid"]) == set(cat["objid"])
    assert table["split"].isin(SPLITS).all() and table["split"].notna().all()
    share = table["split"].value_counts(normalize=True)
    for split, target in zip(SPLITS, (0.70, 0.15, 0.15)):
        assert abs(share[split] - target) <= 0.02, (split, share.to_dict())
    assert result.excluded == {"pretrain": 0, "unlabeled": 0, "heldout_family": 0, "heldout_role": 0}
    # stratum levels are between 0 (everything) and len(FACTORS) (all seven factors)
    assert table["stratum_level"].between(0, len(FACTORS)).all()
    assert (table["stratum_level"] == len(FACTORS)).mean() > 0.5


def test_custom_fractions_are_respected():
    cat = make_catalog(2000, seed=6)
    share = make_splits(cat, reference_band=REF, fractions=(0.5, 0.25, 0.25)).table["split"].value_counts(
        normalize=True)
    for split, target in zip(SPLITS, (0.5, 0.25, 0.25)):
        assert abs(share[split] - target) <= 0.02, share.to_dict()


def test_fractions_hold_when_every_stratum_has_ten_groups():
    # 100 strata of exactly min_groups_per_stratum (10) groups: continuous factors missing ('na'),
    # one pixel scale per stratum, so nothing is merged
    n_strata, per = 100, 10
    rng = np.random.default_rng(0)
    n = n_strata * per
    cat = pd.DataFrame({
        "objid": [f"obj-{i:05d}" for i in range(n)], "ra": rng.uniform(0, 360, n),
        "dec": np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n))), "label": 0, "label_source": "sim:x",
        "sim_family": "baseline", "z_spec": -1.0, "z_phot": -1.0, f"mag_{REF}": np.nan, "seeing": -1.0,
        "psf_fwhm": -1.0, "pixel_scale": np.repeat(0.2 + 0.001 * np.arange(n_strata), per), "survey": "sdss"})
    result = make_splits(cat, reference_band=REF, seed=0)
    assert result.merged == [] and result.table["stratum"].nunique() == n_strata
    share = result.table["split"].value_counts(normalize=True)
    for split, target in zip(SPLITS, (0.70, 0.15, 0.15)):
        assert abs(share[split] - target) <= 0.02, share.to_dict()  # fails: val 0.20, test 0.10


# --------------------------------------------------------------------------- 3. leak freedom


def test_duplicate_observations_never_leak_across_splits():
    cat = with_pairs(make_catalog(1600, seed=2), 200)
    result = make_splits(cat, reference_band=REF, seed=4)
    table = result.table
    assert len(table) == 2000

    # no sky group spans two splits
    assert (table.groupby("sky_group")["split"].nunique() == 1).all()
    # each duplicate pair is one sky group and lands in one split
    dup = table[table["objid"].str.startswith("dup-")].copy()
    dup["pair"] = dup["objid"].str[:8]
    assert len(dup) == 400
    per_pair = dup.groupby("pair").agg(n=("objid", "size"), groups=("sky_group", "nunique"),
                                       splits=("split", "nunique"))
    assert len(per_pair) == 200
    assert (per_pair["n"] == 2).all() and (per_pair["groups"] == 1).all() and (per_pair["splits"] == 1).all()
    # pairs are spread over the splits, not all dumped in one
    assert dup.groupby("pair")["split"].first().nunique() == 3

    checks = split_checks(table)
    assert checks["objids_in_two_splits"] == 0
    assert checks["sky_groups_across_splits"] == 0
    assert sum(checks["counts"].values()) == 2000


def test_split_checks_detect_leaks():
    """The checks themselves must notice a leak (else a zero proves nothing)."""
    table = pd.DataFrame({"objid": ["a", "a", "b", "c"], "split": ["train", "test", "train", "val"],
                          "sky_group": [0, 0, 1, 1], "label": [1, 1, 0, 0]})
    checks = split_checks(table)
    assert checks["objids_in_two_splits"] == 1
    assert checks["sky_groups_across_splits"] == 2
    assert checks["counts"] == {"train": 2, "val": 1, "test": 1}


def test_an_empty_split_fails_label_fraction_agreement():
    """Train and test with the same lens fraction agree; without a val split there is nothing to agree with, and
    the check names the empty split instead of passing on the two it has."""
    table = pd.DataFrame({"objid": list("abcdef"), "split": ["train"] * 4 + ["test"] * 2,
                          "sky_group": range(6), "label": [1, 0, 1, 0, 1, 0]})
    checks = split_checks(table)
    assert checks["label_fraction_spread"] == 0.0
    assert checks["empty_splits"] == ["val"] and not checks["label_fractions_agree"]
    table.loc[[2, 3], "split"] = "val"  # one lens and one non-lens in each split
    checks = split_checks(table)
    assert checks["empty_splits"] == [] and checks["label_fractions_agree"]


def _with_positions(table, catalog):
    return table.merge(catalog[["objid", "ra", "dec"]], on="objid", how="left", validate="many_to_one")


def _clustered_sky(seed: int) -> pd.DataFrame:
    """Rows with random splits: a uniform sky, a patch straddling RA = 0/360 and caps at both poles, the
    patches dense enough (80 points within ~70") that many pairs fall on either side of a 6" link."""
    rng = np.random.default_rng(seed)
    n = 80
    ra = np.concatenate([rng.uniform(0.0, 360.0, n), np.mod(rng.uniform(-0.006, 0.006, n), 360.0),
                         rng.uniform(0.0, 360.0, 2 * n)])
    dec = np.concatenate([np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n))), rng.uniform(-0.006, 0.006, n),
                          90.0 - rng.uniform(0.0, 0.02, n), -90.0 + rng.uniform(0.0, 0.02, n)])
    return pd.DataFrame({"objid": [f"o{i:04d}" for i in range(len(ra))], "ra": ra, "dec": dec,
                         "split": rng.choice(SPLITS, len(ra))})


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_split_pairs_equal_a_brute_force_count_with_astropy(seed):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    table = _clustered_sky(seed)
    link = 6.0
    coords = SkyCoord(table["ra"].to_numpy() * u.deg, table["dec"].to_numpy() * u.deg)
    sep = coords[:, None].separation(coords[None, :]).arcsec  # every pair, O(n^2)
    i, j = np.triu_indices(len(table), k=1)
    split = table["split"].to_numpy()
    leak = (sep[i, j] <= link) & (split[i] != split[j])
    expected = {(table["objid"][a], table["objid"][b]): sep[a, b] for a, b in zip(i[leak], j[leak])}
    # the data hold leaks across RA = 0/360 and across the poles (RAs far apart), and near misses beyond the link
    ra, dec = table["ra"].to_numpy(), table["dec"].to_numpy()
    far_in_ra = np.abs(ra[i[leak]] - ra[j[leak]]) > 90.0
    assert (far_in_ra & (np.abs(dec[i[leak]]) < 1.0)).sum() > 0 and (far_in_ra & (dec[i[leak]] > 89.9)).sum() > 0
    assert (far_in_ra & (dec[i[leak]] < -89.9)).sum() > 0
    assert ((sep[i, j] > link) & (sep[i, j] < 3 * link)).sum() > len(expected)

    found = cross_split_pairs(table, link_arcsec=link, n_examples=10**6)
    assert found["n_pairs"] == len(expected)
    got = {(e["objid_a"], e["objid_b"]): e["separation_arcsec"] for e in found["examples"]}
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value == pytest.approx(expected[key], abs=1e-6), key
    assert found["min_separation_arcsec"] == pytest.approx(min(expected.values()), abs=1e-6)
    assert [e["separation_arcsec"] for e in found["examples"]] == sorted(got.values())  # closest first
    assert len(cross_split_pairs(table, link_arcsec=link)["examples"]) == 5


def test_correct_splits_have_no_cross_split_pairs():
    cat = with_pairs(make_catalog(400, seed=3), 60, sep_arcsec=4.0)
    table = make_splits(cat, reference_band=REF, seed=1).table
    found = cross_split_pairs(_with_positions(table, cat), link_arcsec=10.0)
    assert found["n_pairs"] == 0 and found["examples"] == [] and np.isnan(found["min_separation_arcsec"])


@pytest.mark.parametrize("relabel_group", [False, True], ids=["sky_group_kept", "sky_group_relabelled"])
def test_cross_split_pairs_catch_a_tampered_split_whatever_sky_group_says(relabel_group):
    cat = with_pairs(make_catalog(400, seed=3), 60, sep_arcsec=4.0)
    table = make_splits(cat, reference_band=REF, seed=1).table
    ib = table.index[table["objid"] == "dup-0007-b"][0]
    split_a = table.loc[table["objid"] == "dup-0007-a", "split"].item()
    table.at[ib, "split"] = next(s for s in SPLITS if s != split_a)
    if relabel_group:
        table.at[ib, "sky_group"] = table["sky_group"].max() + 1
    # the grouping's own column sees the leak only while it still says the two share a group
    assert split_checks(table)["sky_groups_across_splits"] == (0 if relabel_group else 1)
    found = cross_split_pairs(_with_positions(table, cat), link_arcsec=10.0)
    assert found["n_pairs"] == 1 and found["min_separation_arcsec"] == pytest.approx(4.0, abs=1e-6)
    (example,) = found["examples"]
    assert {example["objid_a"], example["objid_b"]} == {"dup-0007-a", "dup-0007-b"}
    assert {example["split_a"], example["split_b"]} == {split_a, table.at[ib, "split"]}
    # pairs farther apart than the link are no leak
    assert cross_split_pairs(_with_positions(table, cat), link_arcsec=3.0)["n_pairs"] == 0


def test_cross_split_pairs_count_an_objid_in_two_splits_at_zero_separation():
    table = pd.DataFrame({"objid": ["a", "a", "b"], "split": ["train", "test", "train"],
                          "ra": [10.0, 10.0, 50.0], "dec": [5.0, 5.0, 5.0]})
    found = cross_split_pairs(table, link_arcsec=10.0)
    assert found["n_pairs"] == 1 and found["min_separation_arcsec"] == 0.0


def test_cross_split_pairs_reject_missing_columns_and_positions():
    with pytest.raises(ValueError, match=r"cross_split_pairs needs columns \['ra', 'dec'\]"):
        cross_split_pairs(pd.DataFrame({"objid": ["a"], "split": ["train"]}), link_arcsec=10.0)
    table = pd.DataFrame({"objid": ["a", "b"], "split": ["train", "val"], "ra": [1.0, np.nan], "dec": [0.0, 0.0]})
    with pytest.raises(ValueError, match=r"1 rows have no finite ra/dec, e.g. objid 'b' \(ra=nan, dec=0.0\)"):
        cross_split_pairs(table, link_arcsec=10.0)


# --------------------------------------------------------------------------- 4. label balance


def _lens_fraction_by_split(result) -> pd.Series:
    return result.table.groupby("split")["label"].mean()


def test_label_fractions_close_to_the_catalogs():
    cat = make_catalog(3000, seed=0, lens_fraction=0.3)
    result = make_splits(cat, reference_band=REF, seed=0)
    overall = cat["label"].mean()
    assert 0.27 < overall < 0.33
    fractions = _lens_fraction_by_split(result)
    assert set(fractions.index) == set(SPLITS)
    for split in SPLITS:
        assert abs(fractions[split] - overall) <= 0.02, fractions.to_dict()
    checks = split_checks(result.table)
    for split in SPLITS:
        assert checks["label_fraction"][split] == pytest.approx(fractions[split])
    assert checks["label_fraction_spread"] == pytest.approx(fractions.max() - fractions.min())
    assert checks["label_fraction_allowed"] == pytest.approx(0.02)  # the smallest split has > 50 rows


def test_lens_twin_pairs_keep_every_split_at_the_catalogs_lens_fraction():
    # a physical population: 40% of the objects are a lens and its twin at one sky position, the rest single
    singles = make_catalog(1800, seed=3, lens_fraction=0.5)
    lens = make_catalog(600, seed=4, lens_fraction=1.0, prefix="pair-lens")
    twin = lens.copy()
    twin["objid"] = [o.replace("pair-lens", "pair-twin") for o in lens["objid"]]
    twin["label"] = 0
    cat = pd.concat([singles, lens, twin], ignore_index=True)
    result = make_splits(cat, reference_band=REF, seed=0)
    s = split_of(result)
    assert (s[lens["objid"]].to_numpy() == s[twin["objid"]].to_numpy()).all()  # a pair never straddles splits
    fractions = _lens_fraction_by_split(result)
    assert fractions.max() - fractions.min() <= 0.02, fractions.to_dict()
    assert split_checks(result.table)["label_fractions_agree"]


def test_label_fractions_agree_per_split_checks():
    cat = make_catalog(3000, seed=0, lens_fraction=0.3)
    result = make_splits(cat, reference_band=REF, seed=0)
    fractions = _lens_fraction_by_split(result)
    assert fractions.max() - fractions.min() <= 0.02, fractions.to_dict()
    assert split_checks(result.table)["label_fractions_agree"]


def test_label_fractions_disagreement_is_reported():
    table = pd.DataFrame({"objid": [f"o{i}" for i in range(300)], "sky_group": range(300),
                          "split": ["train"] * 100 + ["val"] * 100 + ["test"] * 100,
                          "label": [1] * 30 + [0] * 70 + [1] * 30 + [0] * 70 + [1] * 40 + [0] * 60})
    checks = split_checks(table)
    assert checks["label_fraction"] == pytest.approx({"train": 0.3, "val": 0.3, "test": 0.4})
    assert checks["label_fraction_spread"] == pytest.approx(0.1)
    assert not checks["label_fractions_agree"]
    # small splits are allowed one object's share
    small = table.groupby("split").head(20)
    assert split_checks(small)["label_fraction_allowed"] == pytest.approx(1 / 20)


# --------------------------------------------------------------------------- 5. tiny strata and catalogs


def test_single_object_stratum_is_merged_not_fatal():
    cat = make_catalog(500, seed=8)
    odd = make_catalog(1, seed=9, prefix="odd")
    odd["pixel_scale"] = 0.262  # the only object at this pixel scale
    cat = pd.concat([cat, odd], ignore_index=True)
    result = make_splits(cat, reference_band=REF, seed=0)
    row = result.table.set_index("objid").loc["odd-000000"]
    assert row["split"] in SPLITS
    # pixel_scale is dropped at level 7 - 2 = 5; before that the stratum is the object alone
    assert row["stratum_level"] <= len(FACTORS) - 1 - MERGE_ORDER.index("pixel_scale")
    assert "0.262" not in row["stratum"]
    merged_from = [old for old, new, n in result.merged if "0.262" in old]
    assert merged_from, result.merged
    assert all(n == 1 for old, new, n in result.merged if "0.262" in old)
    # every merge goes to a key with one factor fewer (or to 'all')
    for old, new, n in result.merged:
        assert new == "all" or new.count("|") == old.count("|") - 1
        assert 0 < n < 10


def test_tiny_catalog_of_five_rows():
    cat = make_catalog(5, seed=10)
    result = make_splits(cat, reference_band=REF, seed=0)
    assert len(result.table) == 5
    assert result.table["split"].isin(SPLITS).all()
    assert (result.table["stratum"] == "all").all() and (result.table["stratum_level"] == 0).all()
    assert result.merged
    checks = split_checks(result.table)
    assert checks["objids_in_two_splits"] == 0 and checks["sky_groups_across_splits"] == 0


def test_stratify_factors_bins_and_missing_values():
    cat = make_catalog(9, seed=0)
    cat["z_spec"] = [0.1, 0.2, 0.3, -1, -1, -1, 0.7, 0.8, 0.9]
    cat["z_phot"] = [-1, -1, -1, 0.4, 0.5, 0.6, -1, -1, -1]
    cat[f"mag_{REF}"] = [np.nan, np.nan, 20, 21, 22, 23, 24, 25, 26]
    cat["seeing"] = -1.0
    f = stratify_factors(cat, reference_band=REF)
    assert list(f.columns) == list(FACTORS)
    # z_spec where measured, z_phot otherwise: 0.1..0.9 in order -> three equal bins
    assert list(f["redshift"]) == ["0", "0", "0", "1", "1", "1", "2", "2", "2"]
    assert list(f["magnitude"][:2]) == ["na", "na"] and set(f["magnitude"][2:]) == {"0", "1", "2"}
    assert (f["seeing"] == "na").all()
    assert (f["pixel_scale"] == "0.396").all() and (f["survey"] == "sdss").all()


# --------------------------------------------------------------------------- 6. exclusions


def _mixed_catalog(seed: int = 12):
    base = make_catalog(300, seed=seed)
    pre = make_catalog(7, seed=seed + 1, prefix="pre", label_source="pretrain:galaxiesml")
    unl = make_catalog(11, seed=seed + 2, prefix="unl", label_source="none")
    unl["label"] = -1
    held = make_catalog(13, seed=seed + 3, prefix="held", sim_family="heldout")
    return pd.concat([base, pre, unl, held], ignore_index=True)


def test_exclusions_are_counted_and_never_split():
    cat = _mixed_catalog()
    result = make_splits(cat, reference_band=REF, seed=0)
    ids = set(result.table["objid"])
    assert not any(i.startswith(("pre-", "unl-", "held-")) for i in ids)
    assert ids == {f"obj-{i:06d}" for i in range(300)}
    assert result.excluded == {"pretrain": 7, "unlabeled": 11, "heldout_family": 13, "heldout_role": 0}
    assert (result.table["label"] >= 0).all()


def test_exclusion_reasons_do_not_double_count():
    cat = _mixed_catalog()
    # a pretrain row that is also unlabeled and heldout counts once, under its first reason
    cat.loc[cat["objid"] == "pre-000000", ["label", "sim_family"]] = [-1, "heldout"]
    # an unlabeled heldout row counts as unlabeled
    cat.loc[cat["objid"] == "unl-000000", "sim_family"] = "heldout"
    result = make_splits(cat, reference_band=REF, seed=0)
    assert result.excluded == {"pretrain": 7, "unlabeled": 11, "heldout_family": 13, "heldout_role": 0}
    assert sum(result.excluded.values()) == len(cat) - len(result.table)


def test_empty_exclude_families_admits_heldout_rows():
    cat = _mixed_catalog()
    result = make_splits(cat, reference_band=REF, seed=0, exclude_families=())
    assert result.excluded == {"pretrain": 7, "unlabeled": 11, "heldout_family": 0, "heldout_role": 0}
    held = {f"held-{i:06d}" for i in range(13)}
    assert held <= set(result.table["objid"])
    assert len(result.table) == 313


def test_a_file_held_out_by_its_simrole_stays_out_whatever_its_family_is_called():
    """SIMROLE heldout or pairs keeps a row out even when no exclude_families names its family (an earlier run's
    drop under another name); rows with role train, or none (real data, older files), are split."""
    cat = _mixed_catalog()
    cat["sim_role"] = ""
    renamed = cat["objid"].str.startswith("obj-") & (cat.index % 10 == 0)  # 30 training-looking rows
    cat.loc[renamed, "sim_family"] = "drop_of_last_week"
    cat.loc[renamed, "sim_role"] = np.where(cat.loc[renamed].index % 20 == 0, "heldout", "pairs")
    cat.loc[cat["objid"].str.startswith("held-"), "sim_role"] = "heldout"  # named and marked: counted once
    cat.loc[cat["objid"].str.startswith("obj-") & ~renamed, "sim_role"] = "train"
    result = make_splits(cat, reference_band=REF, seed=0)
    assert result.excluded == {"pretrain": 7, "unlabeled": 11, "heldout_family": 13, "heldout_role": 30}
    assert not set(result.table["objid"]) & set(cat.loc[renamed, "objid"])
    assert len(result.table) == 270 and sum(result.excluded.values()) == len(cat) - len(result.table)
    assert make_splits(cat.drop(columns="sim_role"), reference_band=REF, seed=0).excluded["heldout_role"] == 0


# --------------------------------------------------------------------------- 7. errors


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.5, 0.5), (0.6, 0.2, 0.1, 0.1), (0.8, 0.3, -0.1),
                                       (1.0, 0.0, 0.0)])
def test_bad_fractions_raise(fractions):
    cat = make_catalog(50)
    with pytest.raises(ValueError, match=r"fractions must be three positive numbers summing to 1, got "):
        make_splits(cat, reference_band=REF, fractions=fractions)


def test_no_eligible_rows_raise_with_counts():
    cat = _mixed_catalog()
    cat = cat[~cat["objid"].str.startswith("obj-")]
    with pytest.raises(ValueError, match=r"no catalog rows are eligible for supervised splits") as err:
        make_splits(cat, reference_band=REF)
    message = str(err.value)
    assert "'pretrain': 7" in message and "'unlabeled': 11" in message and "'heldout_family': 13" in message


# --------------------------------------------------------------------------- 8. balance table


def test_balance_table_shares_sum_to_one():
    cat = make_catalog(2000, seed=13)
    result = make_splits(cat, reference_band=REF, seed=0)
    bal = balance_table(result.table, cat, reference_band=REF)
    assert list(bal.columns) == ["factor", "bin", *SPLITS]
    assert list(dict.fromkeys(bal["factor"])) == list(FACTORS)
    sums = bal.groupby("factor")[list(SPLITS)].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-12)
    assert ((bal[list(SPLITS)] >= 0) & (bal[list(SPLITS)] <= 1)).all().all()
    # the label factor's shares are the label fractions of the splits
    label = bal[bal["factor"] == "label"].set_index("bin")
    fractions = _lens_fraction_by_split(result)
    for split in SPLITS:
        assert label.loc["1", split] == pytest.approx(fractions[split])
    # stratified: every factor's bins have similar shares in every split
    for split in ("val", "test"):
        assert (bal[split] - bal["train"]).abs().max() < 0.06


# --------------------------------------------------------------------------- 7. halves of the val split


def _realistic_table():
    return _realistic_table_once().copy()


@functools.lru_cache(maxsize=1)
def _realistic_table_once():
    """Singles, duplicate observations and lens/twin pairs at one sky position, split as dataset_splits does."""
    singles = with_pairs(make_catalog(1600, seed=30, lens_fraction=0.4), 150, seed=31)
    lens = make_catalog(200, seed=32, lens_fraction=1.0, prefix="pair-lens")
    twin = lens.copy()
    twin["objid"] = [o.replace("pair-lens", "pair-twin") for o in lens["objid"]]
    twin["label"] = 0
    return make_splits(pd.concat([singles, lens, twin], ignore_index=True), reference_band=REF, seed=0).table


def test_val_roles_split_the_val_split_in_halves_that_keep_sky_groups_whole_and_both_labels():
    table = _realistic_table()
    val = table["split"] == "val"
    assert (table.loc[~val, "val_role"] == "").all() and table.loc[val, "val_role"].isin(VAL_ROLES).all()
    assert (table[val].groupby("sky_group")["val_role"].nunique() == 1).all()
    pairs = table[table["objid"].str.startswith(("pair-", "dup-"))].groupby("sky_group")["val_role"].nunique()
    assert (pairs == 1).all()
    share = table.loc[val, "val_role"].value_counts(normalize=True)
    assert share["stop"] == pytest.approx(0.5, abs=0.02) and share["calibrate"] == pytest.approx(0.5, abs=0.02)
    checks = val_role_checks(table)
    assert checks["both_labels_in_each_half"]
    assert min(checks[r]["n_lenses"] for r in VAL_ROLES) > 50
    assert abs(checks["stop"]["lens_fraction"] - checks["calibrate"]["lens_fraction"]) <= 0.02, checks
    assert split_checks(table)["label_fractions_agree"]  # the three splits still agree


def test_val_roles_are_a_function_of_the_table_alone():
    table = _realistic_table()
    shuffled = table.drop(columns="val_role").sample(frac=1.0, random_state=3)
    pd.testing.assert_series_equal(assign_val_roles(shuffled).sort_index(), table["val_role"], check_names=False)
    # another process with another str-hash seed agrees (Python's own hash() of a string would not)
    import subprocess
    import sys

    code = ("import sys, pandas as pd; from lens_assets.science.splits import assign_val_roles; "
            "t = pd.read_json(sys.stdin); print(''.join(r[0] if r else '-' for r in assign_val_roles(t)))")
    here = "".join(r[0] if r else "-" for r in table["val_role"])
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=table[["split", "sky_group", "label"]].to_json(),
                             capture_output=True, text=True, env={**__import__("os").environ, "PYTHONHASHSEED": seed},
                             check=True).stdout.strip()
        assert out == here


def test_val_roles_calibrate_fraction_and_its_error():
    table = _realistic_table().drop(columns="val_role")
    roles = assign_val_roles(table, calibrate_fraction=0.25)
    assert (roles[table["split"] == "val"] == "calibrate").mean() == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match=r"calibrate_fraction must be in \(0, 1\), got 1.0"):
        assign_val_roles(table, calibrate_fraction=1.0)
    with pytest.raises(ValueError, match=r"needs columns \['sky_group'\] to assign val_role"):
        assign_val_roles(table.drop(columns="sky_group"))


def test_a_tiny_val_split_is_reported_when_a_half_lacks_a_label():
    table = pd.DataFrame({"objid": ["a", "b", "c", "d"], "split": ["train", "val", "val", "val"],
                          "sky_group": [0, 1, 2, 3], "label": [1, 1, 0, 0]})
    checks = val_role_checks(table)
    assert checks["stop"]["n"] + checks["calibrate"]["n"] == 3 and min(checks[r]["n"] for r in VAL_ROLES) == 1
    assert not checks["both_labels_in_each_half"]  # one lens: one half has none
    with pytest.raises(ValueError, match=r"t.parquet: the val split's calibrate half has 0 lenses and 1 non-lenses; "
                                         r"it needs both"):
        require_both_labels([0], what="t.parquet: the val split's calibrate half")


def test_val_roles_of_a_table_without_the_column_are_computed_and_bad_roles_are_errors(caplog):
    table = _realistic_table()
    with caplog.at_level("WARNING"):
        roles = val_roles(table.drop(columns="val_role"), source="old/dataset_splits.parquet")
    assert "old/dataset_splits.parquet: no val_role column" in caplog.text
    pd.testing.assert_series_equal(roles, table["val_role"], check_names=False)
    bad = table.copy()
    first_val = bad.index[bad["split"] == "val"][0]
    bad.loc[first_val, "val_role"] = "fit"
    with pytest.raises(ValueError, match=rf"s.parquet: val_role is 'fit' for val row '{bad.loc[first_val, 'objid']}' "
                                         r"\(1 such rows\); val rows need one of \['stop', 'calibrate'\]"):
        val_roles(bad, source="s.parquet")


def test_a_val_split_of_one_sky_group_is_the_stop_half():
    table = pd.DataFrame({"objid": ["a", "b", "c"], "split": ["train", "val", "val"], "sky_group": [0, 7, 7],
                          "label": [1, 1, 0]})
    assert list(assign_val_roles(table)) == ["", "stop", "stop"]  # training keeps rows to early-stop on
