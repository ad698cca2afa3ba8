"""Small helpers the asset modules share: metadata rendering and reading back cutouts."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Iterable, Mapping

import dagster as dg
import numpy as np

OWNERS = ["team:lens-finding"]


def survey_asset(**kwargs):
    """``dg.asset`` partitioned per survey and owned by the lens-finding team, as every asset here is."""
    from lens_assets.partitions import survey_partitions

    return dg.asset(partitions_def=survey_partitions, owners=OWNERS, **kwargs)


def png_markdown(path: Path, *, alt: str) -> dg.MetadataValue:
    """A PNG inlined in markdown so the Dagster UI shows it in the materialization's metadata."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})\n\n`{path}`")


def path_metadata(storage, path: Path) -> dg.MetadataValue:
    """A file or folder the asset wrote, as metadata: where it lives for people and lineage (``s3://`` on S3
    storage), not the run worker's local copy."""
    return dg.MetadataValue.path(storage.url_of(path))


def counts_markdown(counts: Mapping[str, int], *, key: str, value: str = "count") -> dg.MetadataValue:
    rows = "\n".join(f"| {k} | {v} |" for k, v in counts.items())
    return dg.MetadataValue.md(f"| {key} | {value} |\n|---|---|\n{rows}\n")


def scan_inbox_folder(context, storage, root: Path, *, what: str) -> tuple[list[Path], dict]:
    """The FITS files under ``root`` (``find_fits``' list) and, from the same walk, what is there and not read:
    files whose names are not FITS cutout names and links to folders
    (:func:`~lens_assets.science.ingest.scan_folder`; the inbox markers in ``root`` aside). A warning naming those
    (the first 20) and saying why, and metadata ``n_unread_files`` and ``unread_files``, so that a drop of
    ``.fits.bz2`` files, say, does not pass as an empty one."""
    from lens_assets.layout import CLUSTER_MARKER, COMPLETE_MARKER
    from lens_assets.science.ingest import FITS_SUFFIXES, scan_folder

    files, unread = scan_folder(root, ignore=(COMPLETE_MARKER, CLUSTER_MARKER))
    if not unread:
        return files, {"n_unread_files": 0, "unread_files": "none"}
    names = [storage.url_of(p) for p in unread[:20]]
    more = len(unread) - len(names)
    links = sum(p.is_dir() for p in unread)  # links to folders (folders themselves are walked, not listed)
    why = " or ".join([*([f"their names do not end in {', '.join(FITS_SUFFIXES)} (any case)"]
                         if links < len(unread) else []),
                       *(["they are links to folders, which are not followed"] if links else [])])
    context.log.warning(f"{len(unread)} item(s) under {storage.url_of(root)} are not read as {what}: {why}: "
                        f"{', '.join(names)}" + (f" and {more} more" if more else ""))
    return files, {"n_unread_files": len(unread),
                   "unread_files": dg.MetadataValue.md("\n".join(f"- `{n}`" for n in names)
                                                       + (f"\n- … {more} more" if more else ""))}


def sha256_of_strings(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


def gallery_from_files(paths: list[Path], names: list[str], titles: list[str], survey, out: Path) -> Path:
    """Read cutouts through the FITS contract and draw them, in nanomaggies, as a colour gallery."""
    from lens_assets.science.fits_contract import read_cutout
    from lens_assets.science.plots import cutout_gallery

    images = []
    for p, name in zip(paths, names):
        c = read_cutout(Path(p).read_bytes(), name=name, survey=survey)
        images.append(c.image * c.nmgy_per_unit[:, None, None].astype(np.float32))
    return cutout_gallery(images, survey.band_names, titles, out)
