"""S3Storage against a real S3-compatible server (moto_server in its own process), reached over HTTP.

Nothing is patched: boto3 talks to ``http://127.0.0.1:<port>`` through ``endpoint_url``
and every check on the bucket lists it with a separate boto3 client.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from lens_assets.resources.s3_storage import ChecksumMismatch, S3Storage, parse_s3_url
from lens_assets_tests.helpers import MOTO_SERVER, start_moto, stop_moto

BUCKET = "lens-test"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server process on a free port with an empty bucket; yields its endpoint URL."""
    if not MOTO_SERVER.exists():
        pytest.skip(f"{MOTO_SERVER} not installed (pip install 'moto[server]')")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        nowhere = str(tmp_path_factory.mktemp("aws") / "none")
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
        try:
            _client(endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            stop_moto(proc)


def _client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_server):
    """A boto3 client of its own (not S3Storage's) for looking at the bucket."""
    return _client(s3_server)


@pytest.fixture
def prefix():
    """Each test writes under a prefix of its own in the shared bucket."""
    return f"t-{uuid.uuid4().hex[:10]}/data"


@pytest.fixture
def make_storage(s3_server, tmp_path, prefix):
    """``make_storage("cache-a")``: an S3Storage on this test's prefix with its own (initially empty) cache."""

    def make(cache: str = "cache", url_root: str | None = None) -> S3Storage:
        return S3Storage(root=str(tmp_path / cache), url_root=url_root or f"s3://{BUCKET}/{prefix}",
                         endpoint_url=s3_server)

    return make


def _keys(bucket, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` with its bytes, straight from the server."""
    out = {}
    for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = bucket.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


# ---------------------------------------------------------------- URLs and keys (no server needed)

@pytest.mark.parametrize("url, expected", [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/data", ("bucket", "data")),
    ("s3://bucket/lens/data/", ("bucket", "lens/data")),
    ("s3://my.bucket-1/a/b/c", ("my.bucket-1", "a/b/c")),
])
def test_parse_s3_url_splits_bucket_and_prefix(url, expected):
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", ["data", "/abs/data", "s3://", "s3:/bucket", "S3://bucket", "http://bucket/x",
                                 "s3:///prefix", ""])
def test_parse_s3_url_rejects_anything_else_with_the_setting_named(url):
    with pytest.raises(ValueError, match=r"LENS_DATA_ROOT=.* is not an s3://bucket\[/prefix\] URL"):
        parse_s3_url(url)


def test_url_and_key_with_and_without_a_prefix(tmp_path):
    with_prefix = S3Storage(root=str(tmp_path), url_root="s3://b/lens/data/")
    assert with_prefix.bucket == "b"
    assert with_prefix.key() == "lens/data"
    assert with_prefix.key("raw", "sdss", "x.fits") == "lens/data/raw/sdss/x.fits"
    assert with_prefix.url("catalog", "sdss", "cutout_catalog.parquet") == \
        "s3://b/lens/data/catalog/sdss/cutout_catalog.parquet"
    bare = S3Storage(root=str(tmp_path), url_root="s3://b")
    assert bare.key() == ""
    assert bare.key("inbox", "des", "d1") == "inbox/des/d1"
    assert bare.url("inbox", "des", "d1") == "s3://b/inbox/des/d1"
    # local paths stay under the cache
    assert with_prefix.path("raw", "sdss") == tmp_path.resolve() / "raw" / "sdss"


# ---------------------------------------------------------------- writes land in the bucket, pulls bring them back

def test_writes_land_in_the_bucket_under_the_prefix_and_a_fresh_cache_pulls_them_back(make_storage, bucket, prefix):
    a = make_storage("cache-a")
    df = pd.DataFrame({"objid": ["x", "y", "z"], "label": [1, 0, -1], "flux": [1.5, 2.5, float("nan")]})
    a.write_parquet(df, "catalog", "sdss", "cutout_catalog.parquet")
    a.write_text('{"ok": true}\n', "calibrators", "sdss", "calibrator.json")
    with a.staged_dir("models") as staged:
        (staged / "member-0").mkdir()
        (staged / "member-0" / "weights.pt").write_bytes(os.urandom(3000))
        (staged / "ensemble.json").write_text("{}")
        a.publish_dir(staged, "models", "sdss")

    remote = _keys(bucket, prefix + "/")
    assert set(remote) == {"catalog/sdss/cutout_catalog.parquet", "calibrators/sdss/calibrator.json",
                           "models/sdss/member-0/weights.pt", "models/sdss/ensemble.json"}
    assert not _keys(bucket, prefix + "/tmp/")  # staging stays local
    for rel, body in remote.items():
        assert a.path(rel).read_bytes() == body

    b = make_storage("cache-b")
    assert not b.path().exists()
    got = b.pull("catalog", "sdss", "cutout_catalog.parquet")
    assert got == b.path("catalog", "sdss", "cutout_catalog.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(got), df)
    assert b.pull("calibrators", "sdss", "calibrator.json").read_text() == '{"ok": true}\n'
    models = b.pull("models", "sdss")
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file()) == \
        ["ensemble.json", "member-0/weights.pt"]
    for rel, body in remote.items():
        assert b.path(rel).read_bytes() == body


def test_storage_without_a_prefix_writes_at_the_bucket_root(make_storage, bucket, s3_server):
    name = f"bare-{uuid.uuid4().hex[:8]}"
    bucket.create_bucket(Bucket=name)
    s = make_storage(url_root=f"s3://{name}")
    s.write_text("hi", "reports", "sdss", "note.txt")
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=name).get("Contents", [])]
    assert keys == ["reports/sdss/note.txt"]
    assert s.list_dirs("reports") == ["sdss"]
    fresh = make_storage("fresh", url_root=f"s3://{name}")
    assert fresh.pull("reports", "sdss").joinpath("note.txt").read_text() == "hi"


def test_pull_of_a_missing_object_or_folder_gives_its_local_path_and_no_files(make_storage):
    s = make_storage()
    assert s.pull("catalog", "sdss", "cutout_catalog.parquet") == s.path("catalog", "sdss", "cutout_catalog.parquet")
    assert not s.path("catalog", "sdss", "cutout_catalog.parquet").exists()
    assert s.pull("raw", "sdss") == s.path("raw", "sdss")
    assert not s.path("raw", "sdss").exists()


def test_push_of_nothing_is_a_clear_error(make_storage):
    s = make_storage()
    with pytest.raises(FileNotFoundError, match=r"nothing to push to s3://"):
        s.push("raw", "sdss", "nope")


# ---------------------------------------------------------------- pull: only what changed, and what the bucket lost

def _put(bucket, prefix, rel, body: bytes):
    bucket.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=body)


def _age(path: Path, seconds: float = 100.0) -> float:
    """Set ``path``'s mtime ``seconds`` into the past (so a rewrite is visible whatever the clock resolution)."""
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path.stat().st_mtime


def test_pull_downloads_only_changed_objects_and_removes_files_the_bucket_no_longer_has(make_storage, bucket, prefix):
    for name in ("a.fits", "b.fits", "c.fits"):
        _put(bucket, prefix, f"raw/sdss/sim-1/{name}", name.encode() * 100)
    _put(bucket, prefix, "raw/sdss/sim-1-x/other.fits", b"sibling")  # same prefix, another folder
    s = make_storage()
    local = s.pull("raw", "sdss", "sim-1")
    assert sorted(p.name for p in local.iterdir()) == ["a.fits", "b.fits", "c.fits"]
    assert not s.path("raw", "sdss", "sim-1-x").exists()
    before = {n: _age(local / n) for n in ("a.fits", "b.fits", "c.fits")}

    s.pull("raw", "sdss", "sim-1")  # nothing changed: nothing is downloaded again
    assert {n: (local / n).stat().st_mtime for n in before} == before

    _put(bucket, prefix, "raw/sdss/sim-1/b.fits", b"changed")
    bucket.delete_object(Bucket=BUCKET, Key=f"{prefix}/raw/sdss/sim-1/c.fits")
    _put(bucket, prefix, "raw/sdss/sim-1/sub/d.fits", b"new")
    (local / "stray.fits").write_bytes(b"only here")
    s.pull("raw", "sdss", "sim-1")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
        ["a.fits", "b.fits", "sub/d.fits"]
    assert (local / "a.fits").stat().st_mtime == before["a.fits"]  # unchanged object: not downloaded
    assert (local / "b.fits").read_bytes() == b"changed"
    assert (local / "b.fits").stat().st_mtime > before["b.fits"]
    assert (local / "sub" / "d.fits").read_bytes() == b"new"
    assert not list(local.rglob(".*.part"))


def test_pull_of_one_object_downloads_it_only_when_its_etag_changed(make_storage, bucket, prefix):
    _put(bucket, prefix, "catalog/sdss/cutout_catalog.parquet", b"v1")
    s = make_storage()
    f = s.pull("catalog", "sdss", "cutout_catalog.parquet")
    assert f.read_bytes() == b"v1"
    t = _age(f)
    s.pull("catalog", "sdss", "cutout_catalog.parquet")
    assert f.stat().st_mtime == t
    _put(bucket, prefix, "catalog/sdss/cutout_catalog.parquet", b"v2")
    s.pull("catalog", "sdss", "cutout_catalog.parquet")
    assert f.read_bytes() == b"v2" and f.stat().st_mtime > t


def test_pull_after_own_push_downloads_nothing(make_storage):
    s = make_storage()
    f = s.write_text("calibrated", "calibrators", "sdss", "calibrator.json")
    with s.staged_dir("sim") as staged:
        for i in range(3):
            (staged / f"{i}.fits").write_bytes(bytes([i]) * 500)
        d = s.publish_dir(staged, "raw", "sdss", "sim-1")
    ages = {p: _age(p) for p in [f, *d.iterdir()]}
    s.pull("calibrators", "sdss", "calibrator.json")
    s.pull("raw", "sdss")
    assert {p: p.stat().st_mtime for p in ages} == ages


# ---------------------------------------------------------------- publish_dir mirrors the folder

def test_publish_dir_replacing_a_folder_deletes_remote_objects_gone_locally(make_storage, bucket, prefix):
    s = make_storage()
    _put(bucket, prefix, "raw/sdss/sim-1-x/keep.fits", b"sibling folder, same prefix")
    _put(bucket, prefix, "raw/sdss/sim-1.fits", b"sibling object, same prefix")
    with s.staged_dir("v1") as staged:
        for name in ("a.fits", "b.fits", "nested/c.fits"):
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).write_bytes(name.encode())
        s.publish_dir(staged, "raw", "sdss", "sim-1")
    assert set(_keys(bucket, f"{prefix}/raw/sdss/sim-1/")) == {"a.fits", "b.fits", "nested/c.fits"}

    with s.staged_dir("v2") as staged:
        (staged / "b.fits").write_bytes(b"b v2")
        (staged / "e.fits").write_bytes(b"e")
        s.publish_dir(staged, "raw", "sdss", "sim-1")
    assert _keys(bucket, f"{prefix}/raw/sdss/sim-1/") == {"b.fits": b"b v2", "e.fits": b"e"}
    assert set(_keys(bucket, f"{prefix}/raw/sdss/")) == {"sim-1/b.fits", "sim-1/e.fits", "sim-1-x/keep.fits",
                                                          "sim-1.fits"}
    assert sorted(p.name for p in s.path("raw", "sdss", "sim-1").iterdir()) == ["b.fits", "e.fits"]
    assert list(s.path("tmp").iterdir()) == []

    # another cache that still holds v1 is brought to v2 by a pull
    other = make_storage("other")
    other.path("raw", "sdss", "sim-1", "nested").mkdir(parents=True)
    other.path("raw", "sdss", "sim-1", "nested", "c.fits").write_bytes(b"old")
    other.pull("raw", "sdss", "sim-1")
    assert sorted(p.relative_to(other.path("raw", "sdss", "sim-1")).as_posix()
                  for p in other.path("raw", "sdss", "sim-1").rglob("*") if p.is_file()) == ["b.fits", "e.fits"]


def test_publish_dir_deletes_more_than_a_thousand_gone_objects(make_storage, bucket, prefix):
    """delete_objects takes at most 1000 keys per call: the mirror must batch."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    for i in range(40):
        _put(bucket, prefix, f"shards/sdss/old-{i:05d}.bin", b"x")
    if time.monotonic() - t0 > 4:
        pytest.skip("this S3 server is too slow here for a 1000+ object test")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: _put(bucket, prefix, f"shards/sdss/old-{i:05d}.bin", b"x"), range(40, 1005)))
    s = make_storage()
    with s.staged_dir("shards") as staged:
        (staged / "new.bin").write_bytes(b"y")
        s.publish_dir(staged, "shards", "sdss")
    assert [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/shards/").get("Contents", [])] \
        == [f"{prefix}/shards/sdss/new.bin"]


# ---------------------------------------------------------------- list_dirs and exists

def test_list_dirs_gives_only_the_immediate_folders_sorted(make_storage, bucket, prefix):
    for rel in ("inbox/sdss/d2/x.fits", "inbox/des/d1/_COMPLETE", "inbox/des/d1/a.fits", "inbox/des/d1/sub/deep.fits",
                "inbox/des/d1-x/a.fits", "inbox/des/d0/a.fits", "inbox/.hidden/a", "inbox/loose.txt",
                "inboxy/other/a"):
        _put(bucket, prefix, rel, b"1")
    s = make_storage()
    assert s.list_dirs("inbox") == ["des", "sdss"]
    assert s.list_dirs("inbox", "des") == ["d0", "d1", "d1-x"]
    assert s.list_dirs("inbox", "des", "d1") == ["sub"]
    assert s.list_dirs("inbox", "hsc") == []
    assert s.list_dirs("nothing", "here") == []
    assert not s.path("inbox").exists()  # listing does not download


def test_exists_tells_an_object_and_a_folder_from_siblings_with_the_same_prefix(make_storage, bucket, prefix):
    _put(bucket, prefix, "inbox/des/d1-x/_COMPLETE", b"")
    _put(bucket, prefix, "inbox/des/d1-x/a.fits", b"1")
    _put(bucket, prefix, "inbox/des/d2/a.fits", b"1")
    _put(bucket, prefix, "inbox/des/d2/_COMPLETE.tmp", b"")
    _put(bucket, prefix, "catalog/sdss/cutout_catalog.parquet.bak", b"")
    s = make_storage()
    assert not s.exists("inbox", "des", "d1")
    assert not s.exists("inbox", "des", "d1", "_COMPLETE")
    assert s.exists("inbox", "des", "d1-x")
    assert s.exists("inbox", "des", "d1-x", "_COMPLETE")
    assert s.exists("inbox", "des", "d2")  # a folder
    assert s.exists("inbox", "des")
    assert not s.exists("inbox", "des", "d2", "_COMPLETE")
    assert not s.exists("inbox", "des", "d")
    assert not s.exists("catalog", "sdss", "cutout_catalog.parquet")
    _put(bucket, prefix, "inbox/des/d1/_COMPLETE", b"")
    assert s.exists("inbox", "des", "d1", "_COMPLETE") and s.exists("inbox", "des", "d1")
    assert not s.path("inbox").exists()  # exists() asks the bucket, not the cache


# ---------------------------------------------------------------- the inbox and the sensor over S3

def test_a_complete_s3_drop_gives_one_run_request_and_an_incomplete_one_none(make_storage, bucket, prefix, tmp_path):
    from lens_assets.inbox import COMPLETE_MARKER, publish_drop, simulate_drop
    from lens_assets.partitions import scoring_key
    from lens_assets.sensors.inbox import inbox_tick

    producer = make_storage("producer")
    truth = simulate_drop(producer, "sdss", "2026-11-21-a", n=6, seed=3)
    assert len(truth) == 6
    remote = _keys(bucket, f"{prefix}/inbox/sdss/2026-11-21-a/")
    assert COMPLETE_MARKER in remote and len([k for k in remote if k.endswith(".fits")]) == 6
    assert not _keys(bucket, f"{prefix}/tmp")  # the simulation's scratch folder is not published

    # files pushed, no _COMPLETE yet: the sensor waits for it
    src = tmp_path / "incoming"
    src.mkdir()
    for k in [k for k in remote if k.endswith(".fits")][:2]:
        (src / k).write_bytes(remote[k])
    shutil.copytree(src, producer.path("inbox", "sdss", "2026-11-21-b"))
    producer.push("inbox", "sdss", "2026-11-21-b")
    assert len(_keys(bucket, f"{prefix}/inbox/sdss/2026-11-21-b/")) == 2

    import json

    producer.write_text(json.dumps({"survey": "sdss", "version": "v1"}), "promoted", "sdss", "promotion.json")
    sensor_side = make_storage("sensor")  # the sensor sees only the bucket (the promotion record included)
    instance = dg.DagsterInstance.ephemeral()
    result = inbox_tick(sensor_side, instance, None, limit=10)
    assert [(r.run_key, r.partition_key) for r in result.run_requests] == \
        [("sdss|2026-11-21-a", scoring_key("sdss", "2026-11-21-a"))]
    assert result.run_requests[0].tags == {"lens/survey": "sdss", "lens/drop": "2026-11-21-a",
                                           "lens/promoted_version": "v1"}
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [["2026-11-21-a"]]
    assert not sensor_side.path("inbox").exists()

    # next tick with the cursor: nothing new; once _COMPLETE lands, the second drop is requested
    again = inbox_tick(sensor_side, instance, result.cursor, limit=10)
    assert again.run_requests == []
    publish_drop(producer, "sdss", "2026-11-21-c", sorted(src.iterdir()))
    with pytest.raises(FileExistsError, match=r"s3://.*/inbox/sdss/2026-11-21-c is already complete"):
        publish_drop(make_storage("late"), "sdss", "2026-11-21-c", sorted(src.iterdir()))
    later = inbox_tick(sensor_side, instance, again.cursor, limit=10)
    assert [r.run_key for r in later.run_requests] == ["sdss|2026-11-21-c"]


# ---------------------------------------------------------------- configuration from the environment

def test_storage_from_env_gives_an_s3_storage_with_its_cache_under_LENS_CACHE_DIR(
        s3_server, bucket, prefix, tmp_path, monkeypatch):
    from lens_assets.definitions import storage_from_env

    monkeypatch.setenv("LENS_DATA_ROOT", f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LENS_S3_ENDPOINT_URL", s3_server)
    s = storage_from_env()
    assert isinstance(s, S3Storage)
    assert (s.bucket, s.key(), s.endpoint_url) == (BUCKET, prefix, s3_server)
    assert s.root_path == (tmp_path / "cache" / BUCKET / prefix).resolve()
    s.write_text("x", "reports", "sdss", "note.txt")  # reaches the local server, not AWS
    assert _keys(bucket, f"{prefix}/reports/") == {"sdss/note.txt": b"x"}
    assert s.path("reports", "sdss", "note.txt").read_text() == "x"

    monkeypatch.setenv("LENS_DATA_ROOT", "s3:///nobucket")
    with pytest.raises(ValueError, match="is not an s3://bucket"):
        storage_from_env()


# ---------------------------------------------------------------- an asset round trip over S3

def _materialize(assets, storage, run_config):
    return dg.materialize(assets, partition_key="sdss", resources={"storage": storage}, run_config=run_config,
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=True)


def test_simulated_cutouts_and_cutout_catalog_round_trip_through_the_bucket(make_storage, bucket, prefix):
    from lens_assets.assets.catalog import cutout_catalog
    from lens_assets.assets.simulation import simulated_cutouts

    writer = make_storage("writer")
    result = _materialize([simulated_cutouts, cutout_catalog], writer,
                          {"ops": {"simulated_cutouts": {"config": {"n_cutouts": 6, "seed": 1, "workers": 1}},
                                   "cutout_catalog": {"config": {"workers": 1}}}})
    assert result.success
    remote = _keys(bucket, f"{prefix}/")
    fits = sorted(k for k in remote if k.startswith("raw/sdss/") and k.endswith(".fits"))
    assert len([k for k in fits if k.startswith("raw/sdss/sim-physical-1/")]) == 6
    assert len([k for k in fits if k.startswith("raw/sdss/sim-heldout-1/")]) == 1  # n_cutouts // 5
    for k in fits:
        assert writer.path(k).read_bytes() == remote[k]
    assert {"catalog/sdss/cutout_catalog.parquet", "catalog/sdss/quarantine.parquet"} <= set(remote)
    assert not [k for k in remote if k.startswith("tmp/")]
    first = pd.read_parquet(writer.path("catalog", "sdss", "cutout_catalog.parquet"))
    assert sorted(first["source_file"]) == fits and len(first) == 7
    # the metadata names where the files live for people and lineage, not the run worker's local copies
    (mat,) = result.asset_materializations_for_node("cutout_catalog")
    assert mat.metadata["path"].value == f"s3://{BUCKET}/{prefix}/catalog/sdss/cutout_catalog.parquet"
    (sim,) = result.asset_materializations_for_node("simulated_cutouts")
    assert sim.metadata["path"].value == f"s3://{BUCKET}/{prefix}/raw/sdss/sim-physical-1"

    # another machine: empty cache, pulls raw/ from the bucket and writes the same catalog back
    reader = make_storage("reader")
    again = _materialize([cutout_catalog, simulated_cutouts.to_source_asset()], reader,
                         {"ops": {"cutout_catalog": {"config": {"workers": 1}}}})
    assert again.success
    assert sorted(p.relative_to(reader.root_path).as_posix() for p in reader.path("raw").rglob("*.fits")) == fits
    second = pd.read_parquet(reader.pull("catalog", "sdss", "cutout_catalog.parquet"))
    pd.testing.assert_frame_equal(second.sort_values("objid").reset_index(drop=True),
                                  first.sort_values("objid").reset_index(drop=True))
    in_bucket = pd.read_parquet(io.BytesIO(
        bucket.get_object(Bucket=BUCKET, Key=f"{prefix}/catalog/sdss/cutout_catalog.parquet")["Body"].read()))
    pd.testing.assert_frame_equal(in_bucket, second)


def test_a_partly_failed_delete_is_an_error_naming_the_keys():
    """delete_objects returns HTTP 200 with per-key Errors (e.g. AccessDenied): the mirror must not pass."""
    from lens_assets.resources.s3_storage import check_deleted

    check_deleted({"Deleted": [{"Key": "a"}]}, "b")  # all deleted: nothing raised
    errors = [{"Key": f"p/k{i}", "Code": "AccessDenied", "Message": "Access Denied"} for i in range(7)]
    with pytest.raises(OSError, match=r"7 stale object\(s\) could not be deleted.*s3://b/p/k0: AccessDenied "
                                      r"Access Denied.*…$"):
        check_deleted({"Deleted": [], "Errors": errors}, "b")


@pytest.mark.slow  # the graph and two training jobs over S3
def test_a_training_job_on_another_disk_pulls_its_inputs_and_pushes_checkpoints_it_resumes_from(
        make_storage, bucket, prefix, tmp_path):
    """The ECS data path on one machine: the job runs the remote entry point with a cache of its own, pulls
    shards and splits from the bucket, pushes its checkpoints there, and a retry on a fresh disk resumes."""
    import shutil

    from lens_assets.assets.catalog import cutout_catalog
    from lens_assets.assets.shards import dataset_splits, psf_matched_shards
    from lens_assets.assets.simulation import simulated_cutouts
    from lens_assets.assets.training import lens_classifier
    from lens_assets.resources.launchers import LocalSubprocessLauncher

    storage = make_storage("orchestrator")
    job_cache = tmp_path / "job-disk"
    launcher = LocalSubprocessLauncher(shares_filesystem=False, env={"LENS_CACHE_DIR": str(job_cache)})

    def run(assets, epochs, storage=storage):
        ops = {"simulated_cutouts": {"config": {"n_cutouts": 60, "n_heldout": 0, "seed": 2, "workers": 1}},
               "cutout_catalog": {"config": {"workers": 1}}, "psf_matched_shards": {"config": {"workers": 1}},
               "dataset_splits": {"config": {"min_groups_per_stratum": 2}},
               "lens_classifier": {"config": {"members": ["resnet10t"], "epochs": epochs, "batch_size": 16,
                                              "patience": 5}}}
        result = dg.materialize(assets, partition_key="sdss", resources={"storage": storage, "launcher": launcher},
                                run_config={"ops": {k: v for k, v in ops.items() if k in {
                                    a.key.path[-1] for a in assets if isinstance(a, dg.AssetsDefinition)}}},
                                instance=dg.DagsterInstance.ephemeral(), raise_on_error=True)
        (mat,) = result.asset_materializations_for_node("lens_classifier")
        return {k: v.value for k, v in mat.metadata.items()}

    graph = [simulated_cutouts, cutout_catalog, psf_matched_shards, dataset_splits]
    meta = run([*graph, lens_classifier], epochs=2)
    assert meta["resnet10t/epochs_run"] == 2 and meta["resnet10t/resumed_after_epochs"] == 0
    job_store = job_cache / "store"
    assert (job_store / "shards" / "sdss" / "manifest.json").read_bytes() == \
        storage.path("shards", "sdss", "manifest.json").read_bytes()  # pulled from the bucket into its own disk
    remote = _keys(bucket, f"{prefix}/models/sdss/resnet10t/")
    assert {"best.ckpt", "last.ckpt", "run.json"} <= set(remote)
    ensemble = json.loads(storage.path("models", "sdss", "ensemble.json").read_text())
    (member,) = ensemble["members"]
    assert member["checkpoint"] == "models/sdss/resnet10t/best.ckpt"
    assert hashlib.sha256(remote["best.ckpt"]).hexdigest() == member["sha256"] == meta["resnet10t/checkpoint_sha256"]
    assert meta["resnet10t/checkpoint"] == storage.url("models", "sdss", "resnet10t", "best.ckpt")
    assert meta["resnet10t/checkpoint"].startswith("s3://")
    assert storage.path(member["checkpoint"]).read_bytes() == remote["best.ckpt"]  # pulled back to the orchestrator

    shutil.rmtree(job_cache)  # the retried task lands on a fresh disk: only the bucket remembers
    fresh = make_storage("orchestrator-2")  # and so does the orchestrator
    meta = run([*[a.to_source_asset() for a in graph], lens_classifier], epochs=3, storage=fresh)
    assert meta["resnet10t/resumed_after_epochs"] == 2 and meta["resnet10t/epochs_run"] == 3
    # the orchestrator pulled only the shard manifest (for the lineage), not the shards the job trains on
    assert sorted(p.name for p in fresh.path("shards", "sdss").iterdir()) == ["manifest.json"]
    assert any(p.suffix == ".h5" for p in (job_cache / "store" / "shards" / "sdss").iterdir())


def test_a_launcher_on_another_disk_with_local_storage_is_a_clear_failure(tmp_path):
    from lens_assets.assets.training import remote_store
    from lens_assets.resources.launchers import EcsLauncher
    from lens_assets.resources.storage import LocalStorage

    with pytest.raises(dg.Failure, match=r"EcsLauncher runs training where .* cannot be read: set "
                                         r"LENS_DATA_ROOT=s3://bucket/prefix"):
        remote_store(LocalStorage(root=str(tmp_path)), EcsLauncher(cluster="c", task_definition="t"))


# ---------------------------------------------------------------- publish order, kills mid-publish, verified pulls

def _shard_folder(folder: Path, version: str, n_shards: int) -> dict[str, bytes]:
    """A shard-like folder: ``shard-NNNNN.h5`` data files, ``rows.parquet`` and a ``manifest.json`` with their
    sha256 (as build_shards writes it); returns every file's bytes."""
    files = {f"shard-{i:05d}.h5": f"{version} shard {i}".encode() * 100 for i in range(n_shards)}
    files["rows.parquet"] = f"{version} rows".encode()
    manifest = {"version": version, "rows_table": "rows.parquet",
                "rows_table_sha256": hashlib.sha256(files["rows.parquet"]).hexdigest(),
                "shards": [{"file": k, "rows": 1, "sha256": hashlib.sha256(v).hexdigest()}
                           for k, v in files.items() if k.endswith(".h5")]}
    files["manifest.json"] = json.dumps(manifest).encode()
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _bucket_state_is_consistent(bucket, prefix: str, folder: str) -> None:
    """The manifest in the bucket names only objects that are there."""
    objects = _keys(bucket, f"{prefix}/{folder}/")
    if "manifest.json" in objects:
        named = [e["file"] for e in json.loads(objects["manifest.json"])["shards"]]
        assert set(named) <= set(objects), f"manifest names missing objects {sorted(set(named) - set(objects))}"


class _Killed(BaseException):
    """Stands for the process dying: nothing after it runs (no cleanup catches a BaseException here)."""


def test_a_folder_publish_uploads_data_first_and_the_manifest_last_then_deletes_stale_objects(make_storage, bucket,
                                                                                               prefix):
    s = make_storage()
    calls = []
    client = s.client
    real_upload, real_delete = client.upload_file, client.delete_objects
    client.upload_file = lambda f, b, k, **kw: (calls.append(("put", k.rsplit("/", 1)[-1])),
                                                real_upload(f, b, k, **kw))[1]
    client.delete_objects = lambda **kw: (calls.append(("delete", len(kw["Delete"]["Objects"]))),
                                          real_delete(**kw))[1]
    with s.staged_dir("v1") as staged:
        _shard_folder(staged, "v1", 3)
        s.publish_dir(staged, "shards", "sdss")
    with s.staged_dir("v2") as staged:
        _shard_folder(staged, "v2", 1)
        calls.clear()
        s.publish_dir(staged, "shards", "sdss")
    assert calls == [("put", "rows.parquet"), ("put", "shard-00000.h5"), ("put", "manifest.json"), ("delete", 2)]
    _bucket_state_is_consistent(bucket, prefix, "shards/sdss")


@pytest.mark.parametrize("kill_after", range(6))
def test_a_publish_killed_mid_way_leaves_the_old_version_or_a_clear_error_never_a_half_published_one(
        make_storage, bucket, prefix, kill_after):
    """v1 (3 shards) is replaced by v2 (2 shards); the publisher dies after ``kill_after`` S3 calls (4 uploads,
    then the delete of the stale shard; 5: not killed). The bucket's manifest never names a missing object, and
    a fresh cache pulls a complete version (each file matching its manifest) or fails naming the object, never
    taking a bad file as good."""
    s = make_storage()
    with s.staged_dir("v1") as staged:
        v1 = _shard_folder(staged, "v1", 3)
        s.publish_dir(staged, "shards", "sdss")
    counter = {"n": 0}
    client = s.client
    real_upload, real_delete = client.upload_file, client.delete_objects

    def counted(real):
        def call(*args, **kwargs):
            if counter["n"] == kill_after:
                raise _Killed()
            counter["n"] += 1
            return real(*args, **kwargs)
        return call

    client.upload_file, client.delete_objects = counted(real_upload), counted(real_delete)
    with pytest.raises(_Killed) if kill_after < 5 else contextlib.nullcontext():
        with s.staged_dir("v2") as staged:
            v2 = _shard_folder(staged, "v2", 2)
            s.publish_dir(staged, "shards", "sdss")
    _bucket_state_is_consistent(bucket, prefix, "shards/sdss")
    reader = make_storage(f"reader-{kill_after}")
    try:
        local = reader.pull("shards", "sdss")
    except ChecksumMismatch as err:  # v1's manifest, a shard already overwritten by v2
        assert re.search(r"s3://lens-test/.*/shards/sdss/(shard-0000\d\.h5|rows\.parquet): sha256 [0-9a-f]{64}, but "
                         r"s3://.*/manifest\.json expects [0-9a-f]{64}", str(err)), str(err)
        assert not reader.path("shards", "sdss", "manifest.json").exists()  # nothing taken as good
        return
    got = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
    version = json.loads(got["manifest.json"])["version"]
    expected = {"v1": v1, "v2": v2}[version]
    assert {k: v for k, v in got.items() if k in expected} == expected  # a whole version, nothing mixed
    assert version == ("v2" if kill_after >= 4 else "v1")  # the manifest is the 4th call


def test_a_pulled_shard_whose_sha256_differs_from_the_manifest_is_an_error_naming_it_and_is_not_kept(
        make_storage, bucket, prefix):
    s = make_storage()
    with s.staged_dir("v1") as staged:
        files = _shard_folder(staged, "v1", 2)
        s.publish_dir(staged, "shards", "sdss")
    reader = make_storage("reader")
    reader.pull("shards", "sdss")
    good = reader.path("shards", "sdss", "shard-00001.h5").read_bytes()
    assert good == files["shard-00001.h5"]
    _put(bucket, prefix, "shards/sdss/shard-00001.h5", b"truncated")
    expected = hashlib.sha256(files["shard-00001.h5"]).hexdigest()
    got = hashlib.sha256(b"truncated").hexdigest()
    with pytest.raises(ChecksumMismatch, match=rf"s3://{BUCKET}/{prefix}/shards/sdss/shard-00001\.h5: sha256 {got}, "
                                               rf"but s3://{BUCKET}/{prefix}/shards/sdss/manifest\.json expects "
                                               rf"{expected}"):
        reader.pull("shards", "sdss")
    folder = reader.path("shards", "sdss")
    assert (folder / "shard-00001.h5").read_bytes() == good  # the cached good copy stays, the bad one is gone
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rows.parquet", "shard-00000.h5",
                                                         "shard-00001.h5"]
    fresh = make_storage("fresh")
    with pytest.raises(ChecksumMismatch, match=r"shard-00001\.h5: sha256"):
        fresh.pull("shards", "sdss")
    assert not fresh.path("shards", "sdss", "shard-00001.h5").exists()
    assert not fresh.path("shards", "sdss", "manifest.json").exists()
