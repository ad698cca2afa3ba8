"""science.clusters.scoring without dagster: the OBJTYPE check and the ranking of scored fields."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lens_assets.science.clusters.scoring import objtype_quarantine, rank_fields
from lens_assets.science.fits_contract import BandHDUs
from lens_assets.science.fits_writer import write_cutout


def _file(path, **primary):
    img = np.ones((8, 8), np.float32)
    write_cutout(path, {"OBJID": "o-1", "RA": 1.0, "DEC": 2.0, "SURVEY": "des", **primary},
                 {"g": BandHDUs(image=img, header={"BUNIT": "nanomaggy", "PIXSCALE": 0.263}, variance=None, psf=None)})
    return path


@pytest.mark.parametrize("objtype, shown", [(None, "absent (a galaxy cutout has none)"), ("galaxy", "'galaxy'")])
def test_a_file_that_is_not_a_cluster_field_is_an_objtype_mismatch_naming_file_keyword_and_value(tmp_path, objtype,
                                                                                                 shown):
    path = _file(tmp_path / "x.fits", **({} if objtype is None else {"OBJTYPE": objtype}))
    q = objtype_quarantine(path, "inbox/des/d/x.fits", survey="des")
    assert q["reason"] == "objtype_mismatch" and q["objid"] == "o-1" and len(q["source_sha256"]) == 64
    assert q["message"] == (f"inbox/des/d/x.fits: OBJTYPE is {shown}; every file of a drop of cluster fields must "
                            "have OBJTYPE = 'cluster_field'")


def test_a_gzipped_galaxy_cutout_is_an_objtype_mismatch_and_a_gzipped_field_is_not(tmp_path):
    import gzip
    import hashlib

    for stem, primary in (("galaxy", {}), ("field", {"OBJTYPE": "cluster_field"})):
        (tmp_path / f"{stem}.fits.gz").write_bytes(gzip.compress(_file(tmp_path / f"{stem}.fits", **primary)
                                                                 .read_bytes()))
    q = objtype_quarantine(tmp_path / "galaxy.fits.gz", "d/galaxy.fits.gz", survey="des")
    assert q["reason"] == "objtype_mismatch" and q["objid"] == "o-1"
    assert q["source_sha256"] == hashlib.sha256((tmp_path / "galaxy.fits.gz").read_bytes()).hexdigest()  # as stored
    assert objtype_quarantine(tmp_path / "field.fits.gz", "d/field.fits.gz", survey="des") is None


def test_a_cluster_field_or_an_unreadable_file_is_left_to_the_contract_reader(tmp_path):
    assert objtype_quarantine(_file(tmp_path / "c.fits", OBJTYPE="cluster_field"), "c.fits", survey="des") is None
    assert objtype_quarantine(_file(tmp_path / "u.fits", OBJTYPE=" Cluster_Field "), "u.fits", survey="des") is None
    (tmp_path / "b.fits").write_bytes(b"not a fits file")
    assert objtype_quarantine(tmp_path / "b.fits", "b.fits", survey="des") is None
    assert objtype_quarantine(tmp_path / "missing.fits", "missing.fits", survey="des") is None


def test_fields_are_ranked_by_score_then_logit_then_objid():
    fields = pd.DataFrame({"objid": ["a", "b", "c", "d"], "bcg_x_px": [1.0] * 4, "bcg_y_px": [2.0] * 4,
                           "ra": [0.0] * 4, "dec": [0.0] * 4, "source_file": list("abcd"), "source_sha256": ["0"] * 4})
    features = pd.DataFrame({"objid": ["a", "b", "c", "d"], "n_segments": [1, 2, 3, 4],
                             "colour_consistency": [0.1, 0.2, 0.3, 0.4], "tangential_alignment": [0.0] * 4})
    logits = {"a": 0.0, "b": 2.0, "c": 1.0, "d": 1.0}
    model = SimpleNamespace(logit=lambda X: np.array([logits[o] for o in X["objid"]]))
    step = SimpleNamespace(predict=lambda z: np.where(np.asarray(z) > 0.5, 0.9, 0.1))  # isotonic-like: ties
    table = rank_fields(fields, features, model=model, calibrator=step)
    # b, c, d share the score 0.9: b has the higher logit; c and d tie there too and go by objid
    assert table["objid"].tolist() == ["b", "c", "d", "a"] and table["rank"].tolist() == [1, 2, 3, 4]
    assert table["score"].tolist() == [0.9, 0.9, 0.9, 0.1] and table["n_segments"].tolist() == [2, 3, 4, 1]
    with pytest.raises(ValueError, match="one row per field, in the fields' order"):
        rank_fields(fields, features.iloc[::-1], model=model, calibrator=step)
