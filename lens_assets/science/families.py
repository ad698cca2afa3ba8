"""Simulation families: the priors of a simulated population, kept as data.

A family is a TOML file under ``science/families/`` (or any path) whose leaves are
priors: a plain number is a constant, a table with ``dist`` names a distribution.
``load_family("baseline")`` reads the packaged file; ``load_family(path)`` reads a
user's own. A family's ``population`` says how scenes are drawn: ``priors``
(the default: independent priors per parameter, the sections and keys of
``families/baseline.toml``), ``physical`` (the sky's relations in
:mod:`.population`, the sections and keys of ``families/physical.toml``) or
``cluster`` (cluster fields, :mod:`.clusters.fields`, ``families/cluster.toml``); an
unknown or missing key is an error naming it.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["Prior", "PriorDraws", "Family", "load_family", "available_families", "FAMILY_DIR", "NEGATIVE_TYPES",
           "CLUSTER_NEGATIVE_TYPES"]

FAMILY_DIR = Path(__file__).parent / "families"
DISTRIBUTIONS = ("uniform", "loguniform", "normal", "randint", "choice")
NEGATIVE_TYPES = ("plain", "companions", "merger", "ring", "spiral", "chance_alignment")
TWIN = "twin"  # the non-lens type made of a lens's own scene with the deflection switched off
PHYSICAL_NEGATIVE_TYPES = (TWIN, "companion_blob", "blue_core", "binary_nucleus", "star_beside", "ring", "spiral")
CLUSTER_NEGATIVE_TYPES = (TWIN, "interloper", "edge_on_spiral", "tidal", "radial_streak")
RENDERERS = ("lenstronomy", "galsim")
POPULATIONS = {  # population -> (reference file, sections, non-lens types)
    "priors": ("baseline.toml", ("lens", "lens_light", "source", "quasar", "psf", "noise", "negatives",
                                 "hard_negatives"), NEGATIVE_TYPES),
    "physical": ("physical.toml", ("cosmology", "deflector", "lens_light", "source", "quasar", "selection",
                                   "environment", "psf", "noise", "observation", "negatives", "mimics"),
                 PHYSICAL_NEGATIVE_TYPES),
    # cluster fields (science.clusters.fields)
    "cluster": ("cluster.toml", ("cosmology", "field", "halo", "bcg", "members", "sources", "group", "selection",
                                 "contaminants", "psf", "noise", "negatives", "mimics"), CLUSTER_NEGATIVE_TYPES),
}


@dataclass(frozen=True)
class Prior:
    """One prior. ``sample(rng)`` draws a value; constants ignore the generator."""

    dist: str
    params: Mapping[str, Any]
    where: str

    @classmethod
    def parse(cls, spec: Any, *, where: str) -> "Prior":
        if isinstance(spec, bool) or isinstance(spec, (int, float)):
            return cls("constant", {"value": spec}, where)
        if not isinstance(spec, Mapping) or "dist" not in spec:
            raise ValueError(f"{where}: a prior is a number or a table with 'dist'; got {spec!r}")
        dist = spec["dist"]
        params = {k: v for k, v in spec.items() if k != "dist"}
        needed = {"uniform": {"low", "high"}, "loguniform": {"low", "high"}, "normal": {"mean", "std"},
                  "randint": {"low", "high"}, "choice": {"values"}}
        if dist not in needed:
            raise ValueError(f"{where}: unknown dist {dist!r}; valid ones are {list(DISTRIBUTIONS)}")
        missing = needed[dist] - set(params)
        if missing:
            raise ValueError(f"{where}: dist {dist!r} needs {sorted(missing)}")
        if dist in ("uniform", "loguniform", "randint") and params["low"] > params["high"]:
            raise ValueError(f"{where}: low {params['low']} > high {params['high']}")
        if dist == "loguniform" and params["low"] <= 0:
            raise ValueError(f"{where}: loguniform needs low > 0, got {params['low']}")
        if dist == "choice" and "p" in params:
            p = np.asarray(params["p"], dtype=float)
            if len(p) != len(params["values"]) or (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-9):
                raise ValueError(f"{where}: choice p {params['p']} must be non-negative, sum to 1 and match values")
        return cls(dist, params, where)

    def sample(self, rng: np.random.Generator):
        p = self.params
        if self.dist == "constant":
            return p["value"]
        if self.dist == "uniform":
            return float(rng.uniform(p["low"], p["high"]))
        if self.dist == "loguniform":
            return float(np.exp(rng.uniform(np.log(p["low"]), np.log(p["high"]))))
        if self.dist == "normal":
            x = float(rng.normal(p["mean"], p["std"]))
            return float(np.clip(x, p.get("low", -np.inf), p.get("high", np.inf)))
        if self.dist == "randint":
            return int(rng.integers(p["low"], p["high"] + 1))
        values = p["values"]
        return values[int(rng.choice(len(values), p=p.get("p")))]

    @property
    def mean(self) -> float:
        """Mean of a numeric prior (for summaries and tests)."""
        p = self.params
        if self.dist == "constant":
            return float(p["value"])
        if self.dist in ("uniform", "randint"):
            return (p["low"] + p["high"]) / 2
        if self.dist == "loguniform":
            return (p["high"] - p["low"]) / math.log(p["high"] / p["low"])
        if self.dist == "normal":
            return float(p["mean"])
        raise TypeError(f"{self.where}: a choice prior has no mean")


class PriorDraws:
    """Drawing from a family's ``sections`` of priors and its ``negative_weights`` (shared by every renderer's
    family type)."""

    def prior(self, section: str, key: str) -> Prior:
        try:
            return self.sections[section][key]
        except KeyError:
            raise KeyError(f"family {self.name}: no prior [{section}] {key}") from None

    def draw(self, section: str, key: str, rng: np.random.Generator):
        return self.prior(section, key).sample(rng)

    def draw_negative_type(self, rng: np.random.Generator) -> str:
        names = list(self.negative_weights)
        w = np.array([self.negative_weights[n] for n in names], dtype=float)
        return names[int(rng.choice(len(names), p=w / w.sum()))]


@dataclass(frozen=True)
class Family(PriorDraws):
    """A named simulation family: sections of priors plus the non-lens type weights."""

    name: str
    description: str
    lens_fraction: float
    sections: Mapping[str, Mapping[str, Prior]]
    negative_weights: Mapping[str, float]
    sha256: str
    population: str = "priors"
    renderer: str = "lenstronomy"  # 'galsim': rendered by lens_assets.ml.render_galsim from its own priors
    path: str = ""  # the TOML file it was read from



def available_families() -> list[str]:
    return sorted(p.stem for p in FAMILY_DIR.glob("*.toml"))


def _reference_keys(population: str) -> dict[str, set[str]]:
    file, sections, _ = POPULATIONS[population]
    ref = tomllib.loads((FAMILY_DIR / file).read_text())
    return {s: set(ref[s]) for s in sections}


def load_family(name_or_path: str | Path) -> Family:
    """Read a family by packaged name (``baseline``, ``heldout``) or from a TOML path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = FAMILY_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ValueError(f"unknown simulation family {str(name_or_path)!r}; "
                             f"valid families are {available_families()} or a path to a .toml file")
    raw_bytes = path.read_bytes()
    try:
        raw = tomllib.loads(raw_bytes.decode())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    where = path.name
    renderer = raw.get("renderer", "lenstronomy")
    if renderer not in RENDERERS:
        raise ValueError(f"{where}: renderer {renderer!r} is not one of {list(RENDERERS)}")
    if renderer != "lenstronomy":  # another code's priors: its renderer reads and validates them
        for key in ("name", "lens_fraction"):
            if key not in raw:
                raise ValueError(f"{where}: missing {key!r}")
        return Family(name=str(raw["name"]), description=str(raw.get("description", "")),
                      lens_fraction=float(raw["lens_fraction"]), sections={}, negative_weights={},
                      sha256=hashlib.sha256(raw_bytes).hexdigest(), population="", renderer=renderer,
                      path=str(path))
    population = raw.get("population", "priors")
    if population not in POPULATIONS:
        raise ValueError(f"{where}: population {population!r} is not one of {sorted(POPULATIONS)}")
    _, required, negative_types = POPULATIONS[population]
    for key in ("name", "lens_fraction", *required):
        if key not in raw:
            raise ValueError(f"{where}: missing {key!r}")
    if not 0.0 <= raw["lens_fraction"] <= 1.0:
        raise ValueError(f"{where}: lens_fraction must be in [0, 1], got {raw['lens_fraction']}")
    ref = _reference_keys(population)
    sections: dict[str, dict[str, Prior]] = {}
    for section in required:
        if section == "negatives":
            continue
        got = set(raw[section])
        if got != ref[section]:
            raise ValueError(f"{where}: [{section}] has unknown keys {sorted(got - ref[section])} "
                             f"and lacks {sorted(ref[section] - got)}")
        sections[section] = {k: Prior.parse(v, where=f"{where} [{section}] {k}") for k, v in raw[section].items()}
    neg = raw["negatives"]
    unknown = set(neg) - set(negative_types)
    if unknown:
        raise ValueError(f"{where}: [negatives] has unknown types {sorted(unknown)}; valid are {list(negative_types)}")
    weights = {t: float(neg.get(t, 0.0)) for t in negative_types}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"{where}: [negatives] weights must be >= 0 with a positive sum, got {weights}")
    return Family(name=str(raw["name"]), description=str(raw.get("description", "")),
                  lens_fraction=float(raw["lens_fraction"]), sections=sections,
                  negative_weights={k: v for k, v in weights.items() if v > 0},
                  sha256=hashlib.sha256(raw_bytes).hexdigest(), population=population, path=str(path))
