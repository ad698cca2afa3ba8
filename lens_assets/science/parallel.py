"""Process-parallel map with a progress bar, shared by simulation and ingestion."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.context
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


# Workers come from a forkserver: a single-threaded server process, started once per interpreter with the
# science stack imported, forks each worker. Forking the caller itself is unsafe here: a Dagster step process
# runs threads (and scoring has torch's thread pools initialised), and a fork copies locks held by threads
# that do not exist in the child, which can deadlock it. ``spawn`` where there is no forkserver (not POSIX).
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
# imported once by the forkserver, so forked workers start with them (an import that fails is skipped)
PRELOAD = ("numpy", "scipy.signal", "astropy.io.fits", "photutils.psf_matching", "lens_assets.science.ingest",
           "lens_assets.science.shards")


# the launch below is CPython's own (identical in 3.11 to 3.13); elsewhere workers import the main module as before
BARE_LAUNCH = START_METHOD == "forkserver" and sys.version_info[:2] in ((3, 11), (3, 12), (3, 13))
if BARE_LAUNCH:
    import io

    from multiprocessing import forkserver, popen_forkserver, spawn, util
    from multiprocessing.context import reduction, set_spawning_popen

    class _BarePopen(popen_forkserver.Popen):
        """Launches a forkserver worker whose preparation leaves out the parent's main module.

        A worker runs multiprocessing's ``spawn.prepare`` before its first task, and that imports the parent's
        ``__main__`` when the preparation names it (by path, or by module name unless it is a package's
        ``__main__``): under ``python -m lens_assets.demo`` every asset module (2.5 s per worker), under the
        ``dagster`` console script dagster's CLI (0.6 s), under a script that imports torch at its top, torch.
        ``_launch`` is CPython 3.11–3.13's, with the two keys that name the main module dropped; nothing global
        changes, so other threads and pools are unaffected.
        """

        def _launch(self, process_obj):
            prep_data = spawn.get_preparation_data(process_obj._name)
            prep_data.pop("init_main_from_name", None)
            prep_data.pop("init_main_from_path", None)
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep_data, buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            _parent_w = os.dup(w)  # the parent's sentinel for the child, as popen_forkserver keeps it
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = forkserver.read_signed(self.sentinel)

    class _BareForkServerProcess(multiprocessing.context.ForkServerProcess):
        """A forkserver worker that does not import the parent's main module (:class:`_BarePopen`)."""

        @staticmethod
        def _Popen(process_obj):
            return _BarePopen(process_obj)

    class _BareForkServerContext(multiprocessing.context.ForkServerContext):
        Process = _BareForkServerProcess


MAIN_MODULES = ("__main__", "__mp_main__")  # the script's name in this process, and in a worker that imported it


def _needs_main(fn, first_item) -> bool:
    """Whether a worker needs the main module to unpickle ``fn`` or a task like ``first_item``: their pickle names
    a global of ``__main__`` (a function or class defined in the script run). A false alarm only costs the
    worker the import."""
    import pickle

    for obj in (fn, first_item):  # the function first: when it names the main module, a large task is not pickled
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # the pool will raise it where it happens, with its own message
            return True
        if any(name.encode() in data for name in MAIN_MODULES):
            return True
    return False


def _context(*, import_main: bool = True):
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (the first pool)
        if not import_main and BARE_LAUNCH:
            return _BareForkServerContext()
    return ctx


def _pool(workers: int, fn=None, first_item=None) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes started by :data:`START_METHOD`; ``fn`` and its items must pickle
    (module-level functions, plain data). With the forkserver, the workers import the parent's main module only
    when ``fn`` or ``first_item`` refers to something defined there (:func:`_needs_main`); with spawn they always
    do. The tasks of a pool are of one kind: a later task that carries an object of the main module when the
    first does not fails to unpickle in the worker (``BrokenProcessPool``)."""
    import_main = fn is None or _needs_main(fn, first_item)
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(import_main=import_main))


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
        with _pool(workers, fn, items[0]) as pool:
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
        with _pool(workers, fn, items[0]) as pool:
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
