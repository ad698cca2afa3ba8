"""Storage resource: the mechanics of the files under ``LENS_DATA_ROOT`` (default ``data/``).

Which path each asset's files have is :mod:`lens_assets.layout`'s business: it
gives the parts (``layout.catalog_table("des")``) that every method here takes.
Assets read and write local paths (``storage.path(*parts)``): h5py, parquet and
astropy need files. ``pull`` makes a local copy current before reading and
``push`` publishes after writing; both are no-ops here, and ``S3Storage``
(``resources/s3_storage.py``, chosen when ``LENS_DATA_ROOT`` is ``s3://...``)
implements them against a bucket with this directory as its cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from lens_assets.science.fileio import atomic_path, exchange_dirs, write_text_atomic

DEFAULT_DATA_ROOT = "data"


def default_data_root() -> str:
    return os.environ.get("LENS_DATA_ROOT") or DEFAULT_DATA_ROOT


class LocalStorage(dg.ConfigurableResource):
    """Files under a local directory ``root`` (relative paths resolve against the working directory).

    Paths are given as parts relative to the root (:mod:`lens_assets.layout` names
    them); ``tmp/`` holds the staging folders of atomic replacement.
    """

    root: str = DEFAULT_DATA_ROOT

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def path(self, *parts: str) -> Path:
        return self.root_path.joinpath(*parts)

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root_path))

    def url_of(self, path: Path) -> str:
        """:meth:`url` of a file or folder under the root given by its local path (one written or pulled); a path
        that is not under the root (a link out of it) is given as it is."""
        for p in (Path(path), Path(path).resolve()):  # as given, then with links resolved (as relative() does)
            if p.is_relative_to(self.root_path):
                return self.url(*p.relative_to(self.root_path).parts)
        return str(path)

    def url(self, *parts: str) -> str:
        """Where ``parts`` lives for people and lineage: a local path here, ``s3://...`` on S3."""
        return str(self.path(*parts))

    def pull(self, *parts: str) -> Path:
        """Make the local copy of the file or folder ``parts`` current; returns its local path."""
        return self.path(*parts)

    def push(self, *parts: str) -> None:
        """Publish the local file or folder ``parts`` (a folder is mirrored: what is gone locally goes)."""

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the folders directly under ``parts`` (sorted; empty when it does not exist)."""
        base = self.path(*parts)
        if not base.is_dir():
            return []
        return sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))

    def exists(self, *parts: str) -> bool:
        return self.path(*parts).exists()

    def write_text(self, text: str, *parts: str) -> Path:
        """Write ``text`` to ``parts`` atomically and publish it."""
        dest = write_text_atomic(self.path(*parts), text)
        self.push(*parts)
        return dest

    def staging_dir(self, name: str) -> Path:
        """A fresh empty directory on the same filesystem, for building a directory before publishing it."""
        d = self.path("tmp", f"{name}-{uuid.uuid4().hex[:12]}")
        d.mkdir(parents=True)
        return d

    @contextmanager
    def staged_dir(self, name: str):
        """A staging directory that is removed if the block raises (nothing half-built is left in tmp/)."""
        staged = self.staging_dir(name)
        try:
            yield staged
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def publish_dir(self, staged: Path, *parts: str) -> Path:
        """Replace the directory ``parts`` with ``staged``: a reader sees the old folder or the new one, never
        a half-written one and never none.

        A new folder is one ``os.replace``; an existing one is swapped with ``staged``
        in one ``renameat2(RENAME_EXCHANGE)`` (Linux), after which ``staged`` holds the
        old folder and is removed. The path stays the same real directory, so paths
        stored relative to the data root keep working (a versioned folder behind a
        symlink would change what ``resolve()`` gives). Where the exchange is not
        supported the old folder is renamed aside first, leaving a moment without
        one; that is warned about.
        """
        dest = self.path(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            os.replace(staged, dest)
        else:
            try:
                exchange_dirs(staged, dest)
                shutil.rmtree(staged)  # the old folder now
            except NotImplementedError as err:
                warnings.warn(f"{dest}: {err}; replacing it by renaming the old folder aside, which leaves a "
                              "moment where it does not exist", RuntimeWarning, stacklevel=2)
                old = self.path("tmp", f"old-{uuid.uuid4().hex[:12]}")
                os.replace(dest, old)
                os.replace(staged, dest)
                shutil.rmtree(old)
        self.push(*parts)
        return dest

    def write_parquet(self, df, *parts: str) -> Path:
        """Write ``df`` to ``parts`` via a temporary name and an atomic rename."""
        dest = self.path(*parts)
        with atomic_path(dest) as tmp:
            df.to_parquet(tmp, index=False)
        self.push(*parts)
        return dest
