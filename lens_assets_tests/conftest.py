import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never touch the user's data/ or .dagster_home/ (each test also gets a DAGSTER_HOME of its own below).
os.environ.setdefault("DAGSTER_HOME", "")


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
