"""Scoring a fuzzed drop (lens_assets_tests/fuzz_drop.py) reads through the catalog's reader: it never crashes,
quarantines what ingest quarantines and scores the rest (n_scored + n_quarantined = n_files)."""

from __future__ import annotations

import numpy as np
import pytest

from lens_assets.science.schemas import quarantine_schema
from lens_assets_tests.fuzz_drop import KINDS, expected_outcomes, score_fuzz_drop, small_drop

PER_KIND = 2


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    return small_drop(tmp_path_factory.mktemp("fuzz"), per_kind=PER_KIND, seed=12)


def test_scoring_a_fuzzed_drop_quarantines_what_ingest_quarantines_and_scores_the_rest(drop):
    """One untrained member, mean fusion, temperature-1 calibrator: the plumbing, not the scores."""
    root, kinds = drop
    report = score_fuzz_drop(root, kinds)
    assert report.n_files == len(kinds) and report.adds_up  # n_scored + n_quarantined = n_files
    assert report.outcomes == expected_outcomes(kinds, accepted="scored")
    quarantine_schema().validate(report.quarantine)
    assert report.n_accepted == PER_KIND * sum(o == "ingested" for _, o in KINDS.values())
    scores = report.scores["score"].to_numpy()
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert list(report.scores["objid"]) == list(report.catalog["objid"])
