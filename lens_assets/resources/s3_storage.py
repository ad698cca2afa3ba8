"""S3 storage: the bucket is the truth, a local directory its cache (``LENS_DATA_ROOT=s3://bucket/prefix``).

Works with AWS S3 and S3-compatible servers (MinIO, moto, Ceph) through
``endpoint_url``. ``pull`` downloads what changed (by ETag) and removes local
files the bucket no longer has; ``push`` uploads and, for a folder, deletes
objects that are gone locally, so a published folder in the bucket is exactly
the local one.

Publishing a folder is ordered for readers of the bucket: the data objects
first, the index files (``manifest.json``, ``summary.json``) after them, and the
stale objects are deleted only once the new index is in place, so a manifest in
the bucket never names an object that is not there. Pulling a folder downloads
every changed object to a temporary name, checks each file its ``manifest.json``
lists against the manifest's sha256, and only then renames them into the cache
(the manifest last); a mismatch is a :class:`ChecksumMismatch` naming the
object, the expected and the received hash, and leaves the cache as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field, PrivateAttr

from lens_assets.resources.storage import LocalStorage
from lens_assets.science.fileio import sha256_file, tmp_name

__all__ = ["S3Storage", "parse_s3_url", "ChecksumMismatch", "INDEX_FILES"]

# written last in a folder and uploaded last: their presence means the files they describe are complete
INDEX_FILES = ("manifest.json", "summary.json")


class ChecksumMismatch(ValueError):
    """A pulled object's sha256 is not the one its folder's manifest records."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    bucket, _, prefix = url[5:].partition("/") if url.startswith("s3://") else ("", "", "")
    if not bucket:  # also s3:// and s3:///prefix
        raise ValueError(f"LENS_DATA_ROOT={url!r} is not an s3://bucket[/prefix] URL")
    return bucket, prefix.strip("/")


class S3Storage(LocalStorage):
    """Files in ``url`` (``s3://bucket/prefix``), cached under ``root``."""

    url_root: str = Field(description="s3://bucket/prefix")
    endpoint_url: str | None = Field(default=None, description="S3-compatible server; None for AWS")
    region_name: str | None = None
    _client = PrivateAttr(default=None)

    @property
    def bucket(self) -> str:
        return parse_s3_url(self.url_root)[0]

    def key(self, *parts: str) -> str:
        prefix = parse_s3_url(self.url_root)[1]
        return "/".join(p.strip("/") for p in (prefix, *parts) if p)

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region_name)
        return self._client

    # ETags of what was pulled or pushed, so unchanged objects are not downloaded again
    def _etag_path(self, key: str) -> Path:
        return self.root_path / ".s3etags" / (key.replace("/", "%2F") + ".json")

    def _etag(self, key: str) -> str | None:
        try:
            return json.loads(self._etag_path(key).read_text())["etag"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _set_etag(self, key: str, etag: str) -> None:
        p = self._etag_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"etag": etag}))

    def _objects(self, prefix: str):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            yield from page.get("Contents", [])

    def _download(self, key: str, etag: str, dest: Path) -> None:
        if dest.exists() and self._etag(key) == etag:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        self.client.download_file(self.bucket, key, str(tmp))
        os.replace(tmp, dest)
        self._set_etag(key, etag)

    def _local_of(self, key: str) -> Path:
        return self.root_path / key[len(self.key()):].lstrip("/")

    def pull(self, *parts: str) -> Path:
        local = self.path(*parts)
        key = self.key(*parts)
        listed = {o["Key"]: o["ETag"] for o in self._objects(key)}
        if key in listed:  # one object
            self._download(key, listed[key], local)
            return local
        inside = {k: e for k, e in listed.items() if k.startswith(key + "/")}
        changed = {k: e for k, e in inside.items() if not (self._local_of(k).exists() and self._etag(k) == e)}
        staged: dict[str, Path] = {}  # key -> its download under a temporary name beside its place
        try:
            for k in sorted(changed):
                dest = self._local_of(k)
                dest.parent.mkdir(parents=True, exist_ok=True)
                staged[k] = tmp_name(dest)
                self.client.download_file(self.bucket, k, str(staged[k]))
            self._verify_manifests(inside, staged)
        except BaseException:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
            raise
        for k in sorted(staged, key=lambda k: (k.rsplit("/", 1)[-1] in INDEX_FILES, -k.count("/"), k)):
            os.replace(staged[k], self._local_of(k))  # the index files last
            self._set_etag(k, changed[k])
        if local.is_dir():
            wanted = {self.root_path / k[len(self.key()):].lstrip("/") for k in inside}
            for f in [p for p in local.rglob("*") if p.is_file()]:
                if f not in wanted:
                    f.unlink()
        return local

    def push(self, *parts: str) -> None:
        local = self.path(*parts)
        key = self.key(*parts)
        if local.is_file():
            self.client.upload_file(str(local), self.bucket, key)
            self._set_etag(key, self.client.head_object(Bucket=self.bucket, Key=key)["ETag"])
            return
        if not local.is_dir():
            raise FileNotFoundError(f"{local}: nothing to push to {self.url(*parts)}")
        remote = {o["Key"] for o in self._objects(key + "/")}
        pushed = set()
        # data first, then the index files (deepest first): a manifest is uploaded after every object it names
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: (p.name in INDEX_FILES, -len(p.parts), p.as_posix()))
        for f in files:
            k = key + "/" + f.relative_to(local).as_posix()
            self.client.upload_file(str(f), self.bucket, k)
            pushed.add(k)
        # record what was uploaded, so pulling the folder back into this cache downloads nothing
        for o in self._objects(key + "/"):
            if o["Key"] in pushed:
                self._set_etag(o["Key"], o["ETag"])
        gone = sorted(remote - pushed)  # only now that the new index files are in place
        for i in range(0, len(gone), 1000):
            resp = self.client.delete_objects(Bucket=self.bucket,
                                              Delete={"Objects": [{"Key": k} for k in gone[i:i + 1000]]})
            check_deleted(resp, self.bucket)

    def _verify_manifests(self, inside: dict[str, str], staged: dict[str, Path]) -> None:
        """Check every file a ``manifest.json`` among ``inside`` lists: it is in the bucket and its bytes (the
        download in ``staged``, else the cached copy) have the manifest's sha256. Only manifests or files that
        changed are checked; an unchanged cached file was checked when it came."""
        for mkey in sorted(k for k in inside if k.rsplit("/", 1)[-1] == "manifest.json"):
            mpath = staged.get(mkey, self._local_of(mkey))
            try:
                manifest = json.loads(mpath.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise ChecksumMismatch(f"s3://{self.bucket}/{mkey}: unreadable manifest ({err})") from None
            entries = list(manifest.get("shards", [])) if isinstance(manifest, dict) else []
            if isinstance(manifest, dict) and manifest.get("rows_table_sha256"):
                entries.append({"file": manifest.get("rows_table", "rows.parquet"),
                                "sha256": manifest["rows_table_sha256"]})
            folder = mkey.rsplit("/", 1)[0]
            for entry in entries:
                if not (isinstance(entry, dict) and "file" in entry and "sha256" in entry):
                    continue
                k = f"{folder}/{entry['file']}"
                if k not in inside:
                    raise ChecksumMismatch(f"s3://{self.bucket}/{k}: named by s3://{self.bucket}/{mkey} but not in "
                                           "the bucket; the folder was not published completely")
                if mkey not in staged and k not in staged:
                    continue
                got = sha256_file(staged.get(k, self._local_of(k)))
                if got != entry["sha256"]:
                    raise ChecksumMismatch(
                        f"s3://{self.bucket}/{k}: sha256 {got}, but s3://{self.bucket}/{mkey} expects "
                        f"{entry['sha256']}; the object changed after its manifest (or a publish was cut "
                        "short): publish the folder again")

    def list_dirs(self, *parts: str) -> list[str]:
        prefix = self.key(*parts) + "/"
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                       Delimiter="/")
        for page in pages:
            names += [c["Prefix"][len(prefix):].rstrip("/") for c in page.get("CommonPrefixes", [])]
        return sorted(n for n in names if n and not n.startswith("."))

    def exists(self, *parts: str) -> bool:
        """True for an object ``parts`` or a folder with at least one object under ``parts/``."""
        key = self.key(*parts)
        for prefix in (key, key + "/"):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            hit = resp.get("Contents", [])
            if hit and (hit[0]["Key"] == key or hit[0]["Key"].startswith(key + "/")):
                return True
        return False


def check_deleted(response: dict, bucket: str) -> None:
    """``delete_objects`` answers 200 even when some keys were not deleted: raise naming them."""
    errors = response.get("Errors") or []
    if errors:
        shown = "; ".join(f"s3://{bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".rstrip()
                          for e in errors[:5])
        raise OSError(f"{len(errors)} stale object(s) could not be deleted while mirroring: {shown}"
                      + (" …" if len(errors) > 5 else ""))
