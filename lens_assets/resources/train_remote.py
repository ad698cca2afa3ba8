"""Entry point of a training job whose disk is not the orchestrator's (an ECS task): ``python -m
lens_assets.resources.train_remote`` under Dagster Pipes.

The asset passes the store (``s3://bucket/prefix``, endpoint, region) and the keys
of the shards, the splits file and the member's model folder. The job pulls them
into its own cache (``LENS_CACHE_DIR``, default a temporary folder), including any
checkpoints of an earlier attempt so a retried task resumes, trains with
:func:`lens_assets.ml.train.train`, and mirrors the model folder back to the
store after every epoch and at the end. Credentials are the task's own (its IAM
role, or the usual AWS environment variables).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lens_assets.resources.s3_storage import S3Storage
from lens_assets.science.shards import MANIFEST_FILE


class S3Sync:
    """Pulls a training job's inputs from the store into a local cache and pushes its model folder back."""

    def __init__(self, extras: dict):
        store = extras.get("storage") or {}
        if not str(store.get("url_root", "")).startswith("s3://"):
            raise ValueError(f"extras storage {store!r}: a remote training job needs an s3:// store "
                             "(LENS_DATA_ROOT=s3://bucket/prefix)")
        cache = os.environ.get("LENS_CACHE_DIR") or tempfile.mkdtemp(prefix="lens-train-")
        self.storage = S3Storage(root=str(Path(cache) / "store"), url_root=store["url_root"],
                                 endpoint_url=store.get("endpoint_url"), region_name=store.get("region_name"))
        self.keys = extras["keys"]

    def pull_inputs(self) -> tuple[Path, Path, Path]:
        shards = self.storage.pull(*self.keys["shards"])
        splits = self.storage.pull(*self.keys["splits"])
        for what, path in (("shards", shards / MANIFEST_FILE), ("splits", splits)):
            if not path.exists():
                raise FileNotFoundError(f"{self.storage.url(*self.keys[what])}: not in the store")
        out = self.storage.pull(*self.keys["out"])  # checkpoints of an earlier attempt, if any
        out.mkdir(parents=True, exist_ok=True)
        return shards, splits, out

    def push_outputs(self) -> None:
        self.storage.push(*self.keys["out"])


def main() -> None:
    from lens_assets.ml.train import pipes_main

    pipes_main(sync_factory=S3Sync)


if __name__ == "__main__":
    main()
