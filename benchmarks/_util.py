"""Shared benchmark plumbing: timing, a results table, and a JSON record under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import os

RESULTS = Path(__file__).parent / "results"


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def cores() -> int:
    return len(os.sched_getaffinity(0))


def report(name: str, rows: list[tuple[str, str]], record: dict) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {name} ({platform.processor() or platform.machine()}, {cores()} cores) ==")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=float))
    print(f"  (written to {RESULTS / (name + '.json')})")
