"""A cluster field (``OBJTYPE = 'cluster_field'``) read as a galaxy cutout is ``objtype_mismatch``: in the catalog's
ingest and in the galaxy scoring reader (``candidate_scores``), while the cluster track reads it.

The files are valid DES galaxy cutouts, one of them carrying the cluster field's
``OBJTYPE``: the keyword alone decides.
"""

import numpy as np
import pytest

from lens_assets.science.fits_contract import BandHDUs
from lens_assets.science.fits_writer import write_cutout
from lens_assets.science.ingest import ingest_files, read_one
from lens_assets.science.surveys import get_survey

SURVEY = get_survey("des")


def cutout(path, objid: str, **primary):
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:64, :64] - 31.5
    bands = {b: BandHDUs(image=(50 * np.exp(-(x**2 + y**2) / 18) + rng.normal(0, 1, (64, 64))).astype(np.float32),
                         header={"BUNIT": "nanomaggy", "PIXSCALE": 0.263, "PSFFWHM": 1.0},
                         variance=np.ones((64, 64), np.float32), psf=None)
             for b in SURVEY.band_names}
    write_cutout(path, {"OBJID": objid, "RA": 10.0, "DEC": -20.0, "SURVEY": "des", **primary}, bands)
    return path


@pytest.fixture
def files(tmp_path):
    return [cutout(tmp_path / "a_galaxy.fits", "gal-1"),
            cutout(tmp_path / "b_field.fits", "field-1", OBJTYPE="cluster_field"),
            cutout(tmp_path / "c_field_upper.fits", "field-2", OBJTYPE="CLUSTER_FIELD "),
            cutout(tmp_path / "d_other.fits", "gal-2", OBJTYPE="galaxy")]


def test_the_catalog_quarantines_a_cluster_field_as_objtype_mismatch(files, tmp_path):
    result = ingest_files(files, SURVEY, root=tmp_path, workers=1, progress=False)
    assert sorted(result.catalog["objid"]) == ["gal-1", "gal-2"]
    q = result.quarantine.set_index("source_file")
    assert sorted(q.index) == ["b_field.fits", "c_field_upper.fits"]
    assert set(q["reason"]) == {"objtype_mismatch"} and q.loc["b_field.fits", "objid"] == "field-1"
    assert q.loc["b_field.fits", "message"].startswith("b_field.fits: OBJTYPE is 'cluster_field'; a cluster field "
                                                       "is not a galaxy cutout")
    assert result.catalog.shape[0] + len(q) == len(files)


def test_the_galaxy_scoring_reader_quarantines_it_and_the_cluster_reader_reads_it(files):
    from lens_assets.ml.score import read_and_match
    from lens_assets.science.shards import shard_settings

    outcomes, _ = read_and_match(([str(p) for p in files], [p.name for p in files], shard_settings(SURVEY)))
    reasons = [q["reason"] if q else None for _, q in outcomes]
    assert reasons == [None, "objtype_mismatch", "objtype_mismatch", None]
    row, q, cut = read_one(files[1], "b_field.fits", SURVEY, cluster=True)  # arc_segments, cluster_candidates
    assert q is None and row["objid"] == "field-1" and cut.primary["OBJTYPE"] == "cluster_field"
