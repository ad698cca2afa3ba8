"""Process-parallel map with a progress bar, shared by simulation and ingestion."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["parallel_map", "resolve_workers"]


def resolve_workers(workers: int) -> int:
    """``workers <= 0`` means every core this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _pool(workers: int) -> ProcessPoolExecutor:
    """Forked workers on Linux (they start without re-importing the science stack), spawned elsewhere."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method))


def parallel_map(fn: Callable[[T], R], items: Sequence[T] | Iterable[T], *, workers: int = 1,
                 progress: bool = True, desc: str = "", unit: str = "it", chunksize: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes, in order, with a tqdm bar.

    One worker runs in this process (no pool start-up). Worker processes are
    forked on Linux so they start without re-importing the science stack.
    An exception in ``fn`` propagates; nothing is skipped.
    """
    items = list(items)
    workers = min(resolve_workers(workers), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, file=sys.stderr,
               mininterval=1.0, dynamic_ncols=True)
    try:
        if workers == 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update(1)
            return out
        chunksize = chunksize or max(1, min(16, len(items) // (workers * 8) or 1))
        with _pool(workers) as pool:
            out = []
            for r in pool.map(fn, items, chunksize=chunksize):
                out.append(r)
                bar.update(1)
            return out
    finally:
        bar.close()


def bounded_imap(fn: Callable[[T], R], items: Sequence[T], *, workers: int = 1, max_in_flight: int | None = None,
                 progress: bool = True, desc: str = "", unit: str = "it", weights: Sequence[int] | None = None):
    """Yield ``fn(x)`` in order with at most ``max_in_flight`` results pending: memory stays bounded.

    ``weights`` (e.g. rows per task) advance the progress bar instead of one per task.
    """
    from collections import deque

    items = list(items)
    weights = list(weights) if weights is not None else [1] * len(items)
    workers = min(resolve_workers(workers), max(1, len(items)))
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, disable=not progress, file=sys.stderr, mininterval=1.0,
               dynamic_ncols=True)
    try:
        if workers == 1:
            for x, wgt in zip(items, weights):
                yield fn(x)
                bar.update(wgt)
            return
        limit = max_in_flight or 2 * workers
        with _pool(workers) as pool:
            pending: deque = deque()
            it = iter(zip(items, weights))
            for x, wgt in it:
                pending.append((pool.submit(fn, x), wgt))
                if len(pending) >= limit:
                    break
            while pending:
                fut, wgt = pending.popleft()
                result = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((pool.submit(fn, nxt[0]), nxt[1]))
                yield result
                bar.update(wgt)
    finally:
        bar.close()
