"""A fuzzed drop (every kind of damage in lens_assets_tests/fuzz_drop.py, three files each): ingest never
crashes, every file is ingested or quarantined, and each kind gets the outcome the contract expects (scoring a fuzzed
drop: lens_assets_tests/ml/test_fuzz_drop_scoring.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from lens_assets.science.schemas import catalog_schema, quarantine_schema
from lens_assets_tests.fuzz_drop import (DES, FIRST_OBJID, KINDS, expected_outcomes, ingest_fuzz_drop,
                                         small_drop)

PER_KIND = 3


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    return small_drop(tmp_path_factory.mktemp("fuzz"), per_kind=PER_KIND, seed=11)


def test_the_drop_spans_every_kind_at_least_twelve_of_them_damage(drop):
    _, kinds = drop
    assert Counter(kinds.values()) == {k: PER_KIND for k in KINDS}
    assert sum(outcome != "ingested" for _, outcome in KINDS.values()) >= 12


def test_ingesting_a_fuzzed_drop_never_crashes_and_every_file_is_accounted_for(drop):
    root, kinds = drop
    report = ingest_fuzz_drop(root, kinds)
    assert report.crashes == []
    assert report.n_files == len(kinds) and report.adds_up
    assert report.outcomes == expected_outcomes(kinds, accepted="ingested")
    catalog_schema(DES).validate(report.catalog)
    quarantine_schema().validate(report.quarantine)
    objids = report.catalog["objid"]
    assert (objids.str.len() == 81).sum() == PER_KIND  # the CONTINUE OBJIDs, read in full
    assert FIRST_OBJID in set(objids)  # the file every duplicate_objid file repeats
    hierarch = report.catalog[report.catalog["source_file"].str.contains("hierarch_cards")]
    assert (hierarch["z_phot"] == 0.42).all()  # HIERARCH Z_PHOT, as astropy reads it
    missing = report.catalog[report.catalog["source_file"].str.contains("missing_band")]
    assert missing["band_flags"].str.contains("z:missing").all() and (missing["n_bands_present"] == 4).all()
    inf = report.quarantine[report.quarantine["source_file"].str.contains("inf_image")]
    assert inf["message"].str.contains("non-finite").all() and not inf["message"].str.contains("% NaN").any()
