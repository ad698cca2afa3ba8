"""Shared benchmark plumbing: timing, a results table, and a JSON record under benchmarks/results/."""

from __future__ import annotations

import json
import re
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import os

RESULTS = Path(__file__).parent / "results"


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


@contextmanager
def input_asinh(fn):
    """The members scale their input with ``fn`` (e.g. ``torch.asinh``) instead of ``module.asinh`` for the block:
    ``scale_input`` and ``colour_residual`` look ``module.asinh`` up at each call."""
    from lens_assets.ml import module

    kept = module.asinh
    module.asinh = fn
    try:
        yield
    finally:
        module.asinh = kept


def cores() -> int:
    return len(os.sched_getaffinity(0))


def plain(value):
    """``value`` as JSON can hold it: dicts, lists and tuples taken apart, numbers and strings kept, numpy scalars
    as numbers, anything else (e.g. a Dagster ``TableSchema`` in asset metadata, which refuses iteration) as its
    ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return [plain(v) for v in value]
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def report(name: str, rows: list[tuple[str, str]], record: dict) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {name} ({platform.processor() or platform.machine()}, {cores()} cores) ==")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(plain(record), indent=2))
    print(f"  (written to {RESULTS / (name + '.json')})")


def edit_toml_key(text: str, section: str, key: str, value: str) -> str:
    """``text`` (a family TOML) with ``key = ...`` in ``[section]`` replaced by ``key = value``."""
    lines, current, done = text.splitlines(), "", False
    for i, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]\s*", line)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"{re.escape(key)}\s*=", line):
            lines[i], done = f"{key} = {value}", True
            break
    if not done:
        raise KeyError(f"the family TOML has no {key} in [{section}]")
    return "\n".join(lines) + "\n"


def write_family(base: str, path: Path, edits, *, name: str | None = None) -> Path:
    """The packaged family ``base`` written to ``path`` with ``edits`` ((section, key, value) each, values as TOML
    text) and renamed to ``name`` when given, then loaded, so an edit the family refuses stops here."""
    from lens_assets.science.families import FAMILY_DIR, load_family

    text = (FAMILY_DIR / f"{base}.toml").read_text()
    if name is not None:
        text = text.replace(f'name = "{base}"', f'name = "{name}"', 1)
    for section, key, value in edits:
        text = edit_toml_key(text, section, key, value)
    Path(path).write_text(text)
    load_family(path)
    return Path(path)


def _knots(system) -> list:
    """A simulated non-lens's knots: its unlensed Gaussian components."""
    return [c for c in system.components if c.profile == "GAUSSIAN" and not c.lensed]


def knot_extent(system) -> float:
    """The largest distance (arcsec) of a simulated non-lens's knots from the centre: a ring's semi-major axis, to
    within the knots' spacing along it; NaN without knots."""
    import math

    return max((math.hypot(c.shape["center_x"], c.shape["center_y"]) for c in _knots(system)), default=float("nan"))


def knot_flux_share(system) -> float:
    """A simulated non-lens's knots' flux over its galaxy's (its first component), in the reference band."""
    galaxy = system.components[0]
    return sum(10 ** (-0.4 * (c.mag_ref - galaxy.mag_ref)) for c in _knots(system))
