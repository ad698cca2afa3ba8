import os

import pytest

# Tests never touch the user's data/ or .dagster_home/.
os.environ.setdefault("DAGSTER_HOME", "")


@pytest.fixture
def storage(tmp_path):
    from lens_assets.resources.storage import LocalStorage

    return LocalStorage(root=str(tmp_path / "data"))
