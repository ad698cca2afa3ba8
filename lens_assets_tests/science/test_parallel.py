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
from dataclasses import dataclass

with open(sys.argv[1], "a") as f:  # every process that imports this main module leaves a line
    f.write(f"{os.getpid()}\\n")


def in_main(x):
    return x * 2


@dataclass
class Job:
    x: int


def nested(x):  # runs in a worker, where this module is __mp_main__, and starts a pool of its own
    from lens_assets.science.parallel import parallel_map

    return sum(parallel_map(in_main, [x, x], workers=2, progress=False))


if __name__ == "__main__":
    from lens_assets.science.parallel import bounded_imap, parallel_map

    fn, items = {"lib": (abs, [-1, -2, -3, -4]), "main": (in_main, [-1, -2, -3, -4]),
                 "item": (repr, [Job(1), Job(2), Job(3), Job(4)]), "nested": (nested, [1, 2])}[sys.argv[2]]
    out = parallel_map(fn, items, workers=2, progress=False)
    out += list(bounded_imap(fn, items[:2], workers=2, progress=False))
    print(out)
'''


def _run_main_script(tmp_path, mode: str) -> tuple[str, list[str]]:
    import subprocess
    import sys

    script, log = tmp_path / f"main_{mode}.py", tmp_path / f"imports_{mode}.log"
    script.write_text(MAIN_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(log), mode], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), log.read_text().split()


def test_workers_do_not_import_the_main_module(tmp_path):
    """A worker would import the parent's main module before its first task (the demo, the ``dagster`` command, a
    script importing torch: seconds and hundreds of MB per worker of every pool). A library function's workers
    skip it: the script's top level runs once, in the parent, over two pools of two workers."""
    out, imports = _run_main_script(tmp_path, "lib")
    assert out == "[1, 2, 3, 4, 1, 2]"
    assert len(imports) == 1


def test_workers_import_the_main_module_when_a_task_needs_it(tmp_path):
    """A function, or a task's object, defined in the main module can only be found there: those workers import
    it (the parent and at least one worker of each pool), and a worker that starts a pool of its own with a
    function of the script (there named ``__mp_main__``) gets it too."""
    for mode, expected in (("main", "[-2, -4, -6, -8, -2, -4]"),
                           ("item", "['Job(x=1)', 'Job(x=2)', 'Job(x=3)', 'Job(x=4)', 'Job(x=1)', 'Job(x=2)']"),
                           ("nested", "[4, 8, 4, 8]")):
        out, imports = _run_main_script(tmp_path, mode)
        assert out == expected, mode
        assert len(imports) >= 3, mode
