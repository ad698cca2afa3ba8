"""Which cluster model scores a survey's drops of cluster fields: ``clusters/models/<survey>/manifest.json``.

``cluster_classifier`` writes the track-A models and their calibrators to
``clusters/models/<survey>/`` (rewritten by every retrain) and what it trained on
to ``training.json``; ``cluster_report``, when every one of its gate checks passes
for the model it judges (``scoring_model``, default ``track_a``), then calls
:func:`write_cluster_manifest`, which copies the model, its sidecar and its
calibrator into ``clusters/models/<survey>/vetted/<version>/`` (one folder,
published whole, as ``promoted_model`` copies the galaxy ensemble) and writes the
manifest pointing at the copies: the model scoring uses, the sha256 of its booster,
sidecar and calibrator, the training features table's sha256 (the training manifest
of the cluster track) and the ``arc_segments`` settings of ``training.json``, so that
a drop is read and segmented exactly as the training fields were. A retrain never
touches the vetted copies, and a model that fails a gate leaves the previous
manifest (and the copies it names) in place. A cluster model is
scoring-ready when its manifest exists, i.e. once it has passed the cluster
report's gates (the galaxy track's promotion gates are separate); ``cluster_candidates`` reads the model only through
:func:`load_cluster_model`, which checks every file against the manifest, and
``survey_inbox_sensor`` holds a survey's cluster drops until it has one.

Like :mod:`lens_assets.model_registry` this module asks :mod:`lens_assets.layout`
for paths; it imports no dagster (errors are plain exceptions with the file,
the field and the value), so producers and the sensor can read it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import shutil

from lens_assets import layout
from lens_assets.science.fileio import sha256_file

__all__ = ["MANIFEST_KEYS", "write_cluster_manifest", "load_cluster_manifest", "cluster_manifest_version",
           "load_cluster_model", "LIGHT_METHODS"]

LIGHT_METHODS = ("median", "model")  # arc_segments' ways of removing the cluster's light
MANIFEST_KEYS = ("survey", "model", "model_file", "model_sha256", "model_meta_file", "model_meta_sha256",
                 "calibrator_file", "calibrator_sha256", "version", "features_file", "features_sha256", "bands",
                 "field_size_px", "light", "nsigma", "code_version")


def _sidecar(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The ``<member>.meta.json`` beside a track-A model file (``TrackAModel.save``)."""
    name = parts[-1]
    return (*parts[:-1], name[: -len(".json")] + ".meta.json")


def _version(model_sha: str, meta_sha: str, calibrator_sha: str) -> str:
    return hashlib.sha256(f"{model_sha}\n{meta_sha}\n{calibrator_sha}\n".encode()).hexdigest()[:16]


def write_cluster_manifest(storage, survey: str, *, field_size_px: int, light: str, nsigma: float,
                           code_version: str, model: str = "track_a", bands=None,
                           features_sha256: str | None = None, trained_sha256: dict | None = None) -> dict:
    """Copy the model files ``cluster_classifier`` has written (``model``, its sidecar and its calibrator) into
    ``clusters/models/<survey>/vetted/<version>/``, write ``clusters/models/<survey>/manifest.json`` naming the
    copies, and return it.

    ``field_size_px``, ``light``, ``nsigma``: the ``arc_segments`` settings of the
    training fields. ``bands``: default the survey's. ``features_sha256``: the
    features table the model was trained on (``cluster_classifier``'s
    ``training.json``); default the sha256 of the current
    ``clusters/features/<survey>/cluster_features.parquet``. ``version`` is made of
    the copies' sha256, so a copy is what the manifest records even when a retrain
    rewrites the trained files meanwhile. ``trained_sha256``: {relative path: sha256} of the trained files as
    ``training.json`` recorded them; a copy that differs is refused (``ValueError``: the files were rewritten by
    a retrain after the one the settings and features describe).
    """
    from lens_assets.science.surveys import get_survey

    spec = get_survey(survey)
    if light not in LIGHT_METHODS:
        raise ValueError(f"light {light!r} is not one of {list(LIGHT_METHODS)}")
    if not (isinstance(field_size_px, int) and field_size_px > 0):
        raise ValueError(f"field_size_px must be a positive integer, got {field_size_px!r}")
    if not (float(nsigma) > 0):
        raise ValueError(f"nsigma must be positive, got {nsigma!r}")
    bands = list(spec.band_names if bands is None else bands)
    trained = {"model": layout.cluster_model_file(survey, model),
               "model_meta": _sidecar(layout.cluster_model_file(survey, model)),
               "calibrator": layout.cluster_calibrator_file(survey, model)}
    features = layout.cluster_features_table(survey)
    sha = {}
    with storage.staged_dir(f"cluster-vetted-{survey}") as staged:
        for key, parts in trained.items():
            path = storage.pull(*parts)
            if not path.exists():
                raise FileNotFoundError(f"{storage.url(*parts)} does not exist: materialize cluster_classifier for "
                                        f"{survey} first")
            shutil.copyfile(path, staged / parts[-1])
            sha[key] = sha256_file(staged / parts[-1])  # the copy's: what scoring will check
            expected = (trained_sha256 or {}).get(layout.relative(parts), sha[key])
            if sha[key] != expected:
                record = layout.relative(layout.cluster_training_doc(survey))
                raise ValueError(f"{storage.url(*parts)}: sha256 {sha[key][:16]} differs from {expected[:16]} in "
                                 f"{record}: the file was rewritten after training.json (a cluster_classifier run "
                                 "in progress?); materialize cluster_report again once cluster_classifier has "
                                 "finished")
        if features_sha256 is None:
            path = storage.pull(*features)
            if not path.exists():
                raise FileNotFoundError(f"{storage.url(*features)} does not exist: materialize cluster_features for "
                                        f"{survey} first")
            features_sha256 = sha256_file(path)
        version = _version(sha["model"], sha["model_meta"], sha["calibrator"])
        folder = layout.cluster_vetted_dir(survey, version)
        storage.publish_dir(staged, *folder)
    vetted = {"model": layout.cluster_vetted_model_file(survey, version, model),
              "model_meta": _sidecar(layout.cluster_vetted_model_file(survey, version, model)),
              "calibrator": layout.cluster_vetted_calibrator_file(survey, version, model)}
    assert all(vetted[k][:-1] == folder and vetted[k][-1] == trained[k][-1] for k in trained)  # the copies' names
    doc = {
        "survey": spec.name, "model": model,
        "model_file": layout.relative(vetted["model"]), "model_sha256": sha["model"],
        "model_meta_file": layout.relative(vetted["model_meta"]), "model_meta_sha256": sha["model_meta"],
        "calibrator_file": layout.relative(vetted["calibrator"]), "calibrator_sha256": sha["calibrator"],
        "version": version,
        "features_file": layout.relative(features), "features_sha256": features_sha256,
        "bands": bands, "field_size_px": int(field_size_px), "light": light, "nsigma": float(nsigma),
        "code_version": code_version, "trained_model_file": layout.relative(trained["model"]),
    }
    storage.write_text(json.dumps(doc, indent=2), *layout.cluster_manifest(survey))
    return doc


def load_cluster_manifest(storage, survey: str) -> dict | None:
    """The survey's cluster manifest, or None when it has none (no cluster model is scoring-ready)."""
    path = storage.pull(*layout.cluster_manifest(survey))
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    missing = [k for k in MANIFEST_KEYS if k not in doc]
    if missing:
        raise ValueError(f"{storage.url(*layout.cluster_manifest(survey))} lacks {missing}: materialize "
                         "cluster_classifier again")
    return doc


def cluster_manifest_version(storage, survey: str) -> str | None:
    """The manifest's ``version`` (hash of the model, its sidecar and its calibrator), or None without one."""
    doc = load_cluster_manifest(storage, survey)
    return doc["version"] if doc else None


def load_cluster_model(storage, survey: str):
    """(manifest, TrackAModel, Calibrator) of the survey's scoring-ready cluster model, each file checked against
    the manifest's sha256. ``LookupError`` when the survey has no manifest; ``ValueError`` when a file changed."""
    from lens_assets.science.calibration import Calibrator
    from lens_assets.science.clusters.track_a import TrackAModel

    doc = load_cluster_manifest(storage, survey)
    where = storage.url(*layout.cluster_manifest(survey))
    if doc is None:
        raise LookupError(f"{where} does not exist: no cluster model of {survey} is scoring-ready (materialize "
                          "cluster_report: it writes the manifest when its model passes every gate)")
    for key in ("model", "model_meta", "calibrator"):
        rel = doc[f"{key}_file"]
        path = storage.pull(*rel.split("/"))
        got = sha256_file(path) if path.exists() else "missing"
        if got != doc[f"{key}_sha256"]:
            raise ValueError(f"{storage.url(*rel.split('/'))}: sha256 {got[:16]} differs from "
                             f"{key}_sha256 {doc[f'{key}_sha256'][:16]} in {where}; materialize cluster_classifier "
                             "and cluster_report again")
    model = TrackAModel.load(storage.path(*doc["model_file"].split("/")))
    calibrator = Calibrator.from_dict(json.loads(storage.path(*doc["calibrator_file"].split("/")).read_text()))
    return doc, model, calibrator
