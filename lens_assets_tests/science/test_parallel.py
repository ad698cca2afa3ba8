"""Process pools (lens_assets.science.parallel): workers are never forked from the calling process."""

from __future__ import annotations

import os
import pickle
import threading

from lens_assets.science import parallel
from lens_assets.science.families import load_family
from lens_assets.science.parallel import bounded_imap, parallel_map
from lens_assets.science.shards import shard_settings
from lens_assets.science.surveys import get_survey


def _parent_pid(_):
    return os.getppid()


def test_pool_workers_are_not_children_forked_from_this_process_while_a_thread_holds_a_lock():
    """A fork copies locks held by other threads (Dagster's, torch's) into a child where no thread will ever
    release them; workers come from a forkserver (or spawn) instead: their parent is not this process, and a
    lock held here while the pool starts is of no concern to them."""
    assert parallel.START_METHOD in ("forkserver", "spawn")
    lock, release = threading.Lock(), threading.Event()
    holder = threading.Thread(target=lambda: (lock.acquire(), release.wait(30), lock.release()))
    holder.start()
    try:
        parents = parallel_map(_parent_pid, range(4), workers=2, progress=False)
        parents += list(bounded_imap(_parent_pid, range(4), workers=2, progress=False))
    finally:
        release.set()
        holder.join()
    assert os.getpid() not in parents


def test_worker_functions_and_their_tasks_pickle():
    """forkserver and spawn send the function and each item by pickle: every pool worker is a module-level
    function, and its task arguments are plain data."""
    from lens_assets.ml.score import read_and_match
    from lens_assets.science.ingest import _ingest_one
    from lens_assets.science.shards import process_batch
    from lens_assets.science.simulation import _simulate_and_write, _simulate_pair_and_write

    survey = get_survey("sdss")
    settings = shard_settings(survey)
    tasks = [(_ingest_one, ("x.fits", "x.fits", "sdss")),
             (process_batch, ([{"objid": "a", "source_file": "a.fits"}], "/data", settings)),
             (read_and_match, (["/data/a.fits"], ["a.fits"], settings)),
             (_simulate_and_write, (survey, load_family("baseline"), 0, 1, "/out", True, "train")),
             (_simulate_pair_and_write, (survey, load_family("baseline"), 0, 1, "/out"))]
    for fn, task in tasks:
        assert pickle.loads(pickle.dumps(fn)) is fn
        assert pickle.loads(pickle.dumps(task)) == task
