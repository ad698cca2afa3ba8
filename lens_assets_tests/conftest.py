import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never touch the user's data/ or .dagster_home/ (each test also gets a DAGSTER_HOME of its own below).
os.environ.setdefault("DAGSTER_HOME", "")


def _pin_xdist_worker_to_its_share_of_the_cpus() -> None:
    """Under pytest-xdist, worker k of n (and every process it starts: training jobs, pools) runs on every n-th
    CPU of the affinity mask from the k-th on. torch sizes its thread pool by that mask, so two workers no longer
    run two pools as large as the machine on the same cores (oversubscribed, each training costs about twice the
    CPU)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus, k = sorted(os.sched_getaffinity(0)), int(worker[2:])
    os.sched_setaffinity(0, cpus[k::count] or [cpus[k % len(cpus)]])


_pin_xdist_worker_to_its_share_of_the_cpus()  # before torch is imported (collection imports it)


# The test files that read the session's trained survey (``trained_survey``): under ``--dist loadfile`` they form one
# work unit, so the worker that builds the survey runs them all and no other worker sits waiting on its lock.
SHARED_SURVEY_FILES = ("lens_assets_tests/assets/test_evaluation.py", "lens_assets_tests/assets/test_scoring.py",
                       "lens_assets_tests/assets/test_training.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if "trained_survey" in getattr(item, "fixturenames", ()) and path not in SHARED_SURVEY_FILES:
            raise pytest.UsageError(f"{item.nodeid} uses trained_survey: add {path} to SHARED_SURVEY_FILES in "
                                    f"{Path(__file__).name} so that pytest-xdist runs it on the worker that builds it")


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the SHARED_SURVEY_FILES in one unit (scheduled where the first of them is
    collected); other modes are xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedSurveyOneUnit(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "trained_survey" if path in SHARED_SURVEY_FILES else path

    return SharedSurveyOneUnit(config, log)


@pytest.fixture(autouse=True)
def _dagster_home_of_its_own(tmp_path_factory, monkeypatch):
    """A fresh DAGSTER_HOME per test, whatever the environment (``make`` exports one): tests running in parallel
    never share an instance's SQLite files."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster_home")))


@pytest.fixture
def storage(tmp_path):
    from lens_assets.resources.storage import LocalStorage

    return LocalStorage(root=str(tmp_path / "data"))


@dataclass(frozen=True)
class TrainedSurvey:
    """The whole graph materialized once on a tiny SDSS survey (``helpers.trained_survey_run_config``).

    ``root`` is the storage root; ``run`` what the materialization reported (each node's materializations and the
    asset check evaluations, read like a dagster run result). Shared by every test of the session: read it, never
    change it; a test that writes takes ``trained_survey_copy``.
    """

    root: Path
    survey: str
    member: str
    run: object  # helpers.RunRecord

    def storage(self):
        from lens_assets.resources.storage import LocalStorage

        return LocalStorage(root=str(self.root))

    def copy_to(self, dest: Path) -> "TrainedSurvey":
        """A copy of the storage under ``dest``. What the code reads back names files relative to the storage
        root; ``run``'s paths, report.json's ``scores_path`` and the training summary still name the original's."""
        shutil.copytree(self.root, dest, symlinks=True)
        return TrainedSurvey(root=dest, survey=self.survey, member=self.member, run=self.run)


@pytest.fixture(scope="session")
def trained_survey(tmp_path_factory) -> TrainedSurvey:
    """Built once per test run: under pytest-xdist the first worker that needs it builds it in the run's shared
    temporary folder while the others wait on a file lock, then every worker reads the same files and record."""
    from filelock import FileLock

    from lens_assets_tests.helpers import (TRAINED_MEMBER, TRAINED_SURVEY, RunRecord, build_trained_survey)

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    home = base / "trained_survey"
    record, failed = home / "run.serdes", home / "FAILED"
    with FileLock(str(home) + ".lock"):
        if failed.exists():
            pytest.fail(f"building the shared trained survey failed in another worker:\n{failed.read_text()}")
        if not record.exists():
            home.mkdir(exist_ok=True)
            try:
                build_trained_survey(home / "data").write(record)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}")
                raise
    return TrainedSurvey(root=home / "data", survey=TRAINED_SURVEY, member=TRAINED_MEMBER, run=RunRecord.read(record))


@pytest.fixture
def trained_survey_copy(trained_survey, tmp_path) -> TrainedSurvey:
    """A private copy of the trained survey, for a test that rewrites, corrupts or re-materializes part of it."""
    return trained_survey.copy_to(tmp_path / "trained")
