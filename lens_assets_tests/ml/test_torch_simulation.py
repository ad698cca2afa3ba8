"""Simulated cutouts written with the torch renderer: lenstronomy's files of the same objects, to its tolerance."""

import numpy as np
import pytest
from astropy.io import fits

from lens_assets.ml.torch_simulation import simulate_to_directory_torch
from lens_assets.science.families import load_family
from lens_assets.science.simulation import simulate_to_directory
from lens_assets.science.surveys import get_survey

DES = get_survey("des")
# truth keys derived from the noiseless light: they agree to the renderers' tolerance, not to the bit
LIGHT_KEYS = ("FLUXRAT", "ARCSNR")


def _hdus(path):
    with fits.open(path) as h:
        return {x.name: (x.header.copy(), None if x.data is None else np.array(x.data)) for x in h}


@pytest.mark.parametrize("family,seed", [("physical", 0), ("heldout", 2)])
def test_the_torch_files_are_lenstronomys_of_the_same_objects(tmp_path, family, seed):
    fam = load_family(family)
    ref, ref_s = simulate_to_directory(DES, fam, n_cutouts=6, seed=seed, out_dir=tmp_path / "lt", progress=False)
    out, out_s = simulate_to_directory_torch(DES, fam, n_cutouts=6, seed=seed, out_dir=tmp_path / "torch",
                                             progress=False, chunk=4)  # chunks of 4 and 2
    assert out_s > 0 and ref_s > 0
    assert list(out["objid"]) == list(ref["objid"]) and list(out["label"]) == list(ref["label"])
    assert list(out["kind"]) == list(ref["kind"]) and set(out["label"]) == {0, 1}
    np.testing.assert_allclose(out["flux_ratio"], ref["flux_ratio"], rtol=2e-3, atol=1e-5)
    for name in ref["file"]:
        a, b = _hdus(tmp_path / "lt" / name), _hdus(tmp_path / "torch" / name)
        assert a.keys() == b.keys()  # the same withheld variance maps and bands
        ha, hb = a["PRIMARY"][0], b["PRIMARY"][0]
        assert hb["LABELSRC"] == "sim:torch" and ha["LABELSRC"] == "sim:lenstronomy"
        same = [k for k in ha if k not in LIGHT_KEYS + ("LABELSRC",)]
        assert {k: hb[k] for k in same} == {k: ha[k] for k in same}
        for k in LIGHT_KEYS:
            if k in ha:
                assert hb[k] == pytest.approx(ha[k], rel=2e-3, abs=1e-4)
        for hdu, (_, data) in a.items():
            if hdu.startswith("IMAGE_"):  # the same noise draws: the pixels differ by the light's tolerance
                assert np.abs(b[hdu][1] - data).max() < 1e-3 * np.abs(data).max()
                assert b[hdu][1].shape == data.shape  # the same crops


def test_a_torch_file_does_not_depend_on_the_chunk_it_was_drawn_in(tmp_path):
    fam = load_family("physical")
    one, _ = simulate_to_directory_torch(DES, fam, n_cutouts=5, seed=1, out_dir=tmp_path / "a", progress=False,
                                         chunk=1)
    five, _ = simulate_to_directory_torch(DES, fam, n_cutouts=5, seed=1, out_dir=tmp_path / "b", progress=False,
                                          chunk=5)
    assert list(one["objid"]) == list(five["objid"])
    for name in one["file"]:
        a, b = _hdus(tmp_path / "a" / name), _hdus(tmp_path / "b" / name)
        for hdu, (_, data) in a.items():
            if data is not None:  # float32 light, padded to each batch's widest object: rounding at most
                np.testing.assert_allclose(b[hdu][1], data, rtol=0, atol=1e-5 * np.abs(data).max())


def test_the_torch_path_refuses_what_it_does_not_draw(tmp_path):
    with pytest.raises(ValueError, match="rendered by galsim"):
        simulate_to_directory_torch(DES, load_family("galsim"), n_cutouts=2, seed=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        simulate_to_directory_torch(DES, load_family("physical"), n_cutouts=2, seed=0, out_dir=tmp_path, chunk=0)
    with pytest.raises(ValueError, match="SIMROLE|role"):
        simulate_to_directory_torch(DES, load_family("physical"), n_cutouts=2, seed=0, out_dir=tmp_path,
                                    role="nonsense")


def test_one_rule_says_which_families_the_torch_renderer_draws(tmp_path):
    from lens_assets.assets.simulation import simulate_family
    from lens_assets.ml.torch_simulation import torch_refusal

    assert torch_refusal(load_family("physical")) is None and torch_refusal(load_family("baseline")) is None
    assert torch_refusal(load_family("galsim")) == "family 'galsim' is rendered by galsim"
    assert torch_refusal(load_family("cluster")) == "family 'cluster' draws cluster fields"
    # called directly, the family's own renderer never takes over from the one asked for: refused, not GalSim files
    with pytest.raises(ValueError, match="rendered by galsim"):
        simulate_family(DES, load_family("galsim"), renderer="torch", n_cutouts=2, seed=0, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
