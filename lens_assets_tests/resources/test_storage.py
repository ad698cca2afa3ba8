"""LocalStorage: published folders and files are replaced whole, even when the writer dies mid-way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lens_assets.resources.storage import LocalStorage
from lens_assets.science import fileio
from lens_assets.science.fileio import sha256_file
from lens_assets_tests.helpers import make_sdss_shards


def _folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_publish_dir_never_leaves_a_moment_without_the_destination(storage, monkeypatch):
    """Every filesystem step of replacing a published folder is watched: after each one the folder exists
    and is the old version or the new one, whole."""
    with storage.staged_dir("v1") as staged:
        (staged / "a.txt").write_text("v1 a")
        (staged / "b.txt").write_text("v1 b")
        storage.publish_dir(staged, "shards", "sdss")
    dest = storage.path("shards", "sdss")
    old = _folder(dest)
    seen = []

    def watch(fn):
        def step(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append(_folder(dest) if dest.is_dir() else None)
            return out
        return step

    monkeypatch.setattr(os, "replace", watch(os.replace))
    monkeypatch.setattr(os, "rename", watch(os.rename))
    monkeypatch.setattr(shutil, "rmtree", watch(shutil.rmtree))
    monkeypatch.setattr(fileio, "exchange_dirs", watch(fileio.exchange_dirs))
    import lens_assets.resources.storage as storage_module
    monkeypatch.setattr(storage_module, "exchange_dirs", watch(storage_module.exchange_dirs))
    with storage.staged_dir("v2") as staged:
        (staged / "a.txt").write_text("v2 a")
        (staged / "c.txt").write_text("v2 c")
        new = _folder(staged)
        storage.publish_dir(staged, "shards", "sdss")
    assert seen, "publish_dir made no filesystem step"
    assert all(state in (old, new) for state in seen), [s and sorted(s) for s in seen]
    assert _folder(dest) == new
    assert list(storage.path("tmp").iterdir()) == []  # the old folder is gone, nothing left staged


def test_write_text_and_write_parquet_replace_the_file_whole_or_not_at_all(storage, monkeypatch):
    storage.write_text('{"v": 1}', "models", "des", "ensemble.json")
    storage.write_parquet(pd.DataFrame({"x": [1, 2]}), "catalog", "des", "t.parquet")

    def dies_half_way(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        raise OSError(f"{self}: disk full")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text('{"v": 2, "long": "' + "x" * 100 + '"}', "models", "des", "ensemble.json")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda self, path, **kw: (Path(path).write_bytes(b"PAR1"),
                                                                               1 / 0))
    with pytest.raises(ZeroDivisionError):
        storage.write_parquet(pd.DataFrame({"x": [3]}), "catalog", "des", "t.parquet")
    assert json.loads(storage.path("models", "des", "ensemble.json").read_text()) == {"v": 1}
    assert pd.read_parquet(storage.path("catalog", "des", "t.parquet"))["x"].tolist() == [1, 2]
    assert sorted(p.name for p in storage.path("models", "des").iterdir()) == ["ensemble.json"]
    assert sorted(p.name for p in storage.path("catalog", "des").iterdir()) == ["t.parquet"]


# ------------------------------------------------------------ a shard build killed with SIGKILL

BUILD_AND_PUBLISH = r'''
import os, signal, sys
from pathlib import Path
import pandas as pd
from lens_assets.resources import storage as storage_module
from lens_assets.resources.storage import LocalStorage
from lens_assets.science import fileio
from lens_assets.science.shards import build_shards, shard_settings
from lens_assets.science.surveys import get_survey

root, kill_at, version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
storage = LocalStorage(root=str(root / "data"))
dest = storage.path("shards", "sdss")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_replace, real_exchange = os.replace, storage_module.exchange_dirs
publishing = False

def replace(src, dst, *a, **kw):
    real_replace(src, dst, *a, **kw)
    if kill_at == "build" and Path(dst).name == "shard-00001.h5":  # mid-build: two shards done in staging
        die()
    if kill_at == "publish" and publishing:  # right after the first step that touches the published folder
        die()

def exchange(a, b):
    real_exchange(a, b)
    if kill_at == "publish":
        die()

os.replace = replace
storage_module.exchange_dirs = exchange
survey = get_survey("sdss")
catalog = pd.read_parquet(root / "catalog.parquet")
if version == "v2":
    catalog = catalog.iloc[::-1]  # other row order: other shards
with storage.staged_dir("shards-sdss") as staged:
    build_shards(catalog, survey, root=root, out_dir=staged, settings=shard_settings(survey, rows_per_shard=4),
                 workers=1, progress=False)
    publishing = True
    storage.publish_dir(staged, "shards", "sdss")
print("published")
'''


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_sdss_shards(root, n=12, seed=5).to_parquet(root / "catalog.parquet")
    return root


def _run(root: Path, kill_at: str, version: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[2]),
                                                                    os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-c", BUILD_AND_PUBLISH, str(root), kill_at, version],
                          capture_output=True, text=True, env=env, timeout=240)


def _complete_version(folder: Path) -> dict:
    """The manifest of ``folder`` after checking that every file it names is there with its sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        assert sha256_file(folder / entry["file"]) == entry["sha256"], entry["file"]
    if "rows_table_sha256" in manifest:
        assert sha256_file(folder / manifest["rows_table"]) == manifest["rows_table_sha256"]
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == sorted(["manifest.json", "rows.parquet", *(e["file"] for e in manifest["shards"])])
    return manifest


@pytest.mark.parametrize("kill_at", ["build", "publish"])
def test_a_shard_build_killed_mid_way_leaves_nothing_or_the_old_version_whole(shard_root, tmp_path, kill_at):
    root = tmp_path / "r"
    shutil.copytree(shard_root, root)
    dest = LocalStorage(root=str(root / "data")).path("shards", "sdss")
    # no version yet: a killed first build leaves nothing (or, killed after its publish, the new one whole)
    first = _run(root, kill_at, "v1")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    if kill_at == "build":
        assert not dest.exists()
    else:
        _complete_version(dest)
    done = _run(root, "never", "v1")
    assert done.returncode == 0 and "published" in done.stdout, done.stderr[-3000:]
    v1 = _complete_version(dest)
    # a second version killed mid-way: the first stays whole, or the second is there whole
    second = _run(root, kill_at, "v2")
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert dest.is_dir(), f"{dest} is missing after a kill during {kill_at}"
    now = _complete_version(dest)
    assert now["sha256"] == v1["sha256"] if kill_at == "build" else now["sha256"] != v1["sha256"]


def test_url_of_a_local_path_is_the_url_of_its_parts_and_a_path_outside_the_root_is_given_as_it_is(tmp_path):
    store = LocalStorage(root=str(tmp_path / "root"))
    (tmp_path / "root" / "a").mkdir(parents=True)
    assert store.url_of(store.path("a", "b.fits")) == store.url("a", "b.fits")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "root" / "a")  # a link from outside into the root resolves into it
    assert store.url_of(tmp_path / "link" / "c.json") == store.url("a", "c.json")
    assert store.url_of(tmp_path / "elsewhere" / "d.txt") == str(tmp_path / "elsewhere" / "d.txt")
