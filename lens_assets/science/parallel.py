"""Process-parallel map with a progress bar, shared by simulation and ingestion."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.context
import os
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
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


# Workers come from a forkserver: a single-threaded server process, started once per interpreter with the
# science stack imported, forks each worker. Forking the caller itself is unsafe here: a Dagster step process
# runs threads (and scoring has torch's thread pools initialised), and a fork copies locks held by threads
# that do not exist in the child, which can deadlock it. ``spawn`` where there is no forkserver (not POSIX).
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
# imported once by the forkserver, so forked workers start with them (an import that fails is skipped)
PRELOAD = ("numpy", "scipy.signal", "astropy.io.fits", "photutils.psf_matching", "lens_assets.science.ingest",
           "lens_assets.science.shards")


@contextmanager
def _main_hidden():
    """``sys.modules["__main__"]`` replaced by an empty module for the block.

    A forkserver or spawn worker imports the parent's main module before it runs anything (multiprocessing's
    ``spawn.prepare``): the ``dagster`` command, ``python -m lens_assets.demo`` or a script that imports torch,
    1 to 2.5 s of imports and hundreds of MB in every worker of every pool. A worker started while the main
    module is hidden imports only what its tasks need. Hidden for the milliseconds a worker takes to start.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


if START_METHOD == "forkserver":
    class _BareForkServerProcess(multiprocessing.context.ForkServerProcess):
        """A forkserver worker that does not import the parent's main module (:func:`_main_hidden`)."""

        def start(self):
            with _main_hidden():
                super().start()

    class _BareForkServerContext(multiprocessing.context.ForkServerContext):
        Process = _BareForkServerProcess


def _defined_in_main(fn) -> bool:
    """Whether ``fn`` (or the function a ``functools.partial`` wraps) lives in ``__main__``: its workers need the
    main module to find it."""
    while hasattr(fn, "func"):
        fn = fn.func
    return getattr(fn, "__module__", None) == "__main__"


def _context(*, import_main: bool = True):
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (the first pool)
        if not import_main:
            return _BareForkServerContext()
    return ctx


def _pool(workers: int, fn=None) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes started by :data:`START_METHOD`; ``fn`` and its items must pickle
    (module-level functions, plain data). Unless ``fn`` is defined in ``__main__``, the workers do not import the
    main module (:func:`_main_hidden`): tasks must not carry objects defined there."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(import_main=fn is None or
                                                                        _defined_in_main(fn)))


def parallel_map(fn: Callable[[T], R], items: Sequence[T] | Iterable[T], *, workers: int = 1,
                 progress: bool = True, desc: str = "", unit: str = "it", chunksize: int | None = None,
                 item_size: Callable[[T], int] | None = None) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes, in order, with a tqdm bar.

    One worker runs in this process (no pool start-up). Worker processes are
    forked by a forkserver that has the science stack imported (:data:`START_METHOD`).
    An exception in ``fn`` propagates; nothing is skipped. ``item_size``: how many ``unit`` an item holds (a task
    of several objects), so the bar counts objects, not tasks.
    """
    items = list(items)
    workers = min(resolve_workers(workers), max(1, len(items)))
    sizes = [item_size(x) for x in items] if item_size else [1] * len(items)
    bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress, file=sys.stderr,
               mininterval=1.0, dynamic_ncols=True)
    try:
        if workers == 1:
            out = []
            for x, n in zip(items, sizes):
                out.append(fn(x))
                bar.update(n)
            return out
        chunksize = chunksize or max(1, min(16, len(items) // (workers * 8) or 1))
        with _pool(workers, fn) as pool:
            out = []
            for r, n in zip(pool.map(fn, items, chunksize=chunksize), sizes):
                out.append(r)
                bar.update(n)
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
        with _pool(workers, fn) as pool:
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
