import h5py
import numpy as np
import pytest

from lens_assets.ml.data import THETA_E_BALANCE_EDGES, ShardDataset, balance_weights, collate, row_truth
from lens_assets_tests.helpers import make_sdss_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_sdss_shards(root, n=20, seed=9, rows_per_shard=7)
    return root / "shards"


def _direct(shard_dir, ds, row):
    with h5py.File(shard_dir / ds.shard_names[ds.shard[row]]) as f:
        i = ds.index[row]
        return f["images"][i], f["variance"][i], float(f["label"][i]), float(f["label_confidence"][i])


def test_random_batches_equal_direct_reads_across_shards(shard_dir):
    ds = ShardDataset(shard_dir)
    assert len(ds) == 20 and len(ds.shard_names) == 3
    rows = [19, 3, 8, 4, 0, 13, 5]  # unsorted, spans all shards, has a contiguous run (3, 4, 5)
    batch = ds.__getitems__(rows)
    for j, r in enumerate(rows):
        img, var, label, conf = _direct(shard_dir, ds, r)
        np.testing.assert_array_equal(batch["image"][j], img)
        np.testing.assert_array_equal(batch["variance"][j], var)
        assert (batch["label"][j], batch["label_confidence"][j]) == (label, conf)
    single = ds[8]
    np.testing.assert_array_equal(single["image"], batch["image"][2])


def test_objids_select_and_order_rows(shard_dir):
    full = ShardDataset(shard_dir)
    chosen = list(full.objid[[5, 2, 17]])
    ds = ShardDataset(shard_dir, objids=chosen)
    assert list(ds.objid) == chosen
    np.testing.assert_array_equal(ds.__getitems__([0])["image"][0], full.__getitems__([5])["image"][0])


def test_dataloader_with_workers_yields_every_row_once(shard_dir):
    import torch

    ds = ShardDataset(shard_dir)
    ds.__getitems__([0])  # open handles in this process: they must not travel to the workers
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True, num_workers=2, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    labels, images = [], []
    for b in loader:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (5, 48, 48)
        labels.append(b["label"])
        images.append(b["image"].sum(dim=(1, 2, 3)))
    assert sum(len(x) for x in labels) == 20
    expected = ds.__getitems__(list(range(20)))
    assert sorted(torch.cat(images).tolist()) == pytest.approx(sorted(expected["image"].sum(axis=(1, 2, 3)).tolist()),
                                                     rel=1e-5)  # float32 sums in another order


def test_conditions_keep_every_band_flag_bit(shard_dir, tmp_path):
    """band_flags are uint16 in shard format 2 (bits up to 2048): the batch carries them whole, with fwhm_before."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    name = sorted(p.name for p in copy.glob("*.h5"))[0]
    with h5py.File(copy / name, "r+") as f:
        assert f["band_flags"].dtype == np.uint16
        f["band_flags"][0, :] = [2048 | 1, 1024, 256, 0, 4]
        fwhm = f["fwhm_before"][0]
    ds = ShardDataset(copy)
    row = next(i for i in range(len(ds)) if ds.shard_names[ds.shard[i]] == name and ds.index[i] == 0)
    batch = ds.__getitems__([row])
    assert batch["band_flags"][0].tolist() == [2049, 1024, 256, 0, 4]
    np.testing.assert_array_equal(batch["fwhm_before"][0], fwhm)


def test_a_cache_returns_the_same_arrays_and_reads_each_cached_row_once(shard_dir, monkeypatch):
    import pickle

    plain = ShardDataset(shard_dir)
    ds = ShardDataset(shard_dir, cache_bytes=12 * plain.row_bytes() + 1)  # room for the first 12 of 20 rows
    assert plain.row_bytes() == 2 * 4 * 5 * 48 * 48 and ds.cached_rows == 0
    read = []
    original = ShardDataset._read_arrays

    def counting(self, rows, image_out, variance_out, **kwargs):
        if self is ds:
            read.extend(int(r) for r in rows)
        return original(self, rows, image_out, variance_out, **kwargs)

    monkeypatch.setattr(ShardDataset, "_read_arrays", counting)
    batches = [[19, 3, 8, 3, 4, 0, 13, 5], [3, 8, 19, 11, 12], list(range(20))[::-1], [0, 19, 5]]
    for rows in batches:
        got, want = ds.__getitems__(rows), plain.__getitems__(rows)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    asked = [r for rows in batches for r in rows]
    # every row below 12 was read from the shards once (3 twice: it came twice in the batch that first asked for
    # it); every row from 12 on was read as often as it was asked for
    assert sorted(r for r in read if r < 12) == sorted([*range(12), 3])
    assert sorted(r for r in read if r >= 12) == sorted(r for r in asked if r >= 12)
    assert ds.cached_rows == 12
    ds._cache[2][11] = False  # a negative index must neither take nor read row 11's place (the last slot)
    np.testing.assert_array_equal(ds[-1]["image"], plain[19]["image"])
    assert not ds._cache[2][11]
    copy = pickle.loads(pickle.dumps(ds))  # a loader worker's copy streams
    assert copy.cache_bytes == 0 and copy.cached_rows == 0
    np.testing.assert_array_equal(copy.__getitems__([4])["image"], plain.__getitems__([4])["image"])


def _splits_table(shard_dir, labels):
    """20 rows: 8 train, 8 val (4 sky groups in each half, a lens and a non-lens in each), 4 test."""
    import pandas as pd

    objids = list(ShardDataset(shard_dir).objid)
    return pd.DataFrame({"objid": objids, "split": ["train"] * 8 + ["val"] * 8 + ["test"] * 4,
                         "sky_group": list(range(8)) + [8, 8, 9, 9, 10, 10, 11, 11] + list(range(12, 16)),
                         "label": labels,
                         "val_role": [""] * 8 + ["stop", "stop", "calibrate", "calibrate"] * 2 + [""] * 4})


def test_training_validation_rows_are_the_stop_half_of_the_val_split(shard_dir, tmp_path, caplog):
    from lens_assets.ml.data import training_datasets
    from lens_assets.science.splits import assign_val_roles

    labels = [1, 0] * 4 + [1, 1, 0, 0, 0, 0, 1, 1] + [0, 1, 0, 1]
    table = _splits_table(shard_dir, labels)
    table.to_parquet(tmp_path / "splits.parquet")
    data = training_datasets(shard_dir, tmp_path / "splits.parquet")
    assert list(data["val"].objid) == list(table.loc[table["val_role"] == "stop", "objid"])
    assert list(data["train"].objid) == list(table.loc[table["split"] == "train", "objid"])
    # a table written before val_role existed: the halves are computed as dataset_splits computes them
    table.drop(columns="val_role").to_parquet(tmp_path / "old.parquet")
    with caplog.at_level("WARNING"):
        old = training_datasets(shard_dir, tmp_path / "old.parquet")
    assert "old.parquet: no val_role column" in caplog.text
    stop = assign_val_roles(table) == "stop"
    assert 0 < stop.sum() < 8 and list(old["val"].objid) == list(table.loc[stop, "objid"])


def test_an_empty_stop_half_is_an_error_and_a_one_label_stop_half_a_warning(shard_dir, tmp_path, caplog):
    from lens_assets.ml.data import training_datasets

    table = _splits_table(shard_dir, [1, 0] * 4 + [0, 0, 1, 0, 0, 0, 1, 1] + [0, 1, 0, 1])
    table.to_parquet(tmp_path / "one_label.parquet")
    with caplog.at_level("WARNING"):
        training_datasets(shard_dir, tmp_path / "one_label.parquet")
    assert "one_label.parquet: the val split's stop half has 0 lenses and 4 non-lenses" in caplog.text
    table["val_role"] = table["val_role"].replace("stop", "calibrate")
    table.to_parquet(tmp_path / "no_stop.parquet")
    with pytest.raises(ValueError, match=r"no_stop.parquet: the val split's stop half is empty"):
        training_datasets(shard_dir, tmp_path / "no_stop.parquet")


def test_balance_weights_flatten_the_bins_by_alpha_and_leave_nan_rows_neutral():
    v = np.array([0.5] * 30 + [2.0] * 10 + [np.nan] * 5)  # two bins, 3:1
    assert np.array_equal(balance_weights(v, 0.0), np.ones(len(v)))
    w = balance_weights(v, 1.0)
    assert w.mean() == pytest.approx(1.0)
    assert w[:30].sum() == pytest.approx(w[30:40].sum())  # alpha 1: each occupied bin drawn equally often
    assert w[30] / w[0] == pytest.approx(3.0)  # share^-1: (10/40)^-1 over (30/40)^-1
    assert balance_weights(v, 0.5)[30] / balance_weights(v, 0.5)[0] == pytest.approx(3.0 ** 0.5)
    assert np.allclose(w[40:], w[:40].mean())  # no scene: the mean weight of the others
    rare = np.array([0.5] * 999 + [2.0])
    capped = balance_weights(rare, 1.0)
    assert capped[-1] / capped[0] == pytest.approx(10.0)  # 999x uncapped
    outside = balance_weights(np.array([0.01, 0.31, 50.0, 2.9]), 1.0)  # beyond the edges: the end bins
    assert outside[0] == outside[1] and outside[2] == outside[3]
    assert len(THETA_E_BALANCE_EDGES) == 11
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        balance_weights(v, -1.0)


def test_row_truth_is_the_catalogs_scene_theta_e_in_the_order_asked(tmp_path):
    catalog = make_sdss_shards(tmp_path, n=12, seed=3)
    shard_dir = tmp_path / "shards"
    objids = list(catalog["objid"])[::-1]
    got = row_truth(shard_dir, objids, "scene_theta_e")
    want = catalog.set_index("objid").loc[objids, "scene_theta_e"].to_numpy()
    assert np.allclose(got, np.where(want < 0, np.nan, want), equal_nan=True)  # the catalog's -1: missing
    lens = catalog.set_index("objid").loc[objids, "label"].to_numpy() == 1
    # independent priors (baseline): a lens's scene is its own theta_E, a non-lens has none
    assert np.allclose(got[lens], catalog.set_index("objid").loc[objids, "theta_e"].to_numpy()[lens], atol=1e-5)
    assert np.isnan(got[~lens]).all()
    assert np.isnan(row_truth(shard_dir, objids, "no_such_column")).all()


def test_available_memory_is_meminfo_or_less_where_a_cgroup_limit_leaves_less(tmp_path):
    from lens_assets.ml.data import available_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    host = 20000000 * 1024
    proc = tmp_path / "cgroup"
    GiB = 2**30

    def avail(root):
        return available_memory_bytes(meminfo=str(meminfo), cgroup_root=str(root), proc_cgroup=str(proc))

    assert avail(tmp_path / "none") == host  # no cgroup files: meminfo decides
    # cgroup v2: the process's group has no limit, its parent (an ECS task, a systemd slice) has 8 GiB
    v2 = tmp_path / "v2"
    group = v2 / "task" / "container"
    group.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    proc.write_text("0::/task/container\n")
    for d, limit, usage, inactive in ((v2, "max", 9 * GiB, 0), (v2 / "task", str(8 * GiB), 5 * GiB, GiB),
                                      (group, "max", 5 * GiB, GiB)):
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 123\ninactive_file {inactive}\n")
    assert avail(v2) == 8 * GiB - (5 * GiB - GiB)  # the parent's limit, its file cache not counted as used
    (v2 / "task" / "memory.max").write_text("max\n")
    assert avail(v2) == host
    (group / "memory.max").write_text(f"{2 * GiB}\n")
    (group / "memory.current").write_text(f"{3 * GiB}\n")  # over the limit but for file cache
    assert avail(v2) == 2 * GiB - (3 * GiB - GiB)
    proc.write_text("0::/elsewhere\n")  # a namespaced view: the mount is the group
    assert avail(v2) == host
    # cgroup v1: memory.stat's hierarchical limit counts the ancestors
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    proc.write_text("4:memory:/process_api/abc\n0::/\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{3 * GiB}\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
    (v1 / "memory.stat").write_text(f"hierarchical_memory_limit {4 * GiB}\ntotal_inactive_file {GiB}\n")
    assert avail(tmp_path / "v1") == 4 * GiB - 2 * GiB
    (v1 / "memory.stat").write_text(f"hierarchical_memory_limit {2**63 - 4096}\ntotal_inactive_file 0\n")
    assert avail(tmp_path / "v1") == host  # far above the host: meminfo decides
    (v1 / "memory.stat").write_text(f"hierarchical_memory_limit {GiB}\n")
    assert avail(tmp_path / "v1") == 0  # usage at the limit: nothing to cache


def test_the_layout_of_shards_is_their_survey_bands_and_image_shape(shard_dir):
    layout = ShardDataset(shard_dir).layout()
    first = ShardDataset(shard_dir)[0]["image"]
    assert layout["survey"] == "sdss" and layout["bands"] == ["u", "g", "r", "i", "z"]
    assert (layout["in_chans"], layout["img_size"]) == (first.shape[0], first.shape[-1])
