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


MAIN_SCRIPT = '''
import os, sys
with open(sys.argv[1], "a") as f:  # every process that imports this main module leaves a line
    f.write(f"{os.getpid()}\\n")


def in_main(x):
    return x * 2


if __name__ == "__main__":
    from lens_assets.science.parallel import bounded_imap, parallel_map

    fn = in_main if sys.argv[2] == "main" else abs
    out = parallel_map(fn, [-1, -2, -3, -4], workers=2, progress=False)
    out += list(bounded_imap(fn, [-5, -6], workers=2, progress=False))
    print(out)
'''


def _run_main_script(tmp_path, fn: str) -> tuple[str, list[str]]:
    import subprocess
    import sys

    script, log = tmp_path / f"main_{fn}.py", tmp_path / f"imports_{fn}.log"
    script.write_text(MAIN_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(log), fn], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), log.read_text().split()


def test_workers_do_not_import_the_main_module(tmp_path):
    """A worker would import the parent's main module before its first task (the ``dagster`` command, the demo,
    a script importing torch: seconds and hundreds of MB per worker of every pool). A library function's workers
    skip it: the script's top level runs once, in the parent, over two pools of two workers."""
    out, imports = _run_main_script(tmp_path, "abs")
    assert out == "[1, 2, 3, 4, 5, 6]"
    assert len(imports) == 1


def test_workers_of_a_function_defined_in_main_import_it(tmp_path):
    """A function defined in the main module can only be found there: its workers import the main module, as
    multiprocessing does (the parent and 2 + 2 workers)."""
    out, imports = _run_main_script(tmp_path, "main")
    assert out == "[-2, -4, -6, -8, -10, -12]"
    assert len(imports) == 5
