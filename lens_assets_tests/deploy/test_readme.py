"""deploy/README.md: its links resolve, and it names every variable and every file of the deployment."""

from lens_assets_tests.deploy.conftest import DEPLOY, REPO, env_example
from lens_assets_tests.test_docs import broken_links

README = DEPLOY / "README.md"


def test_readme_links_resolve():
    assert broken_links(README, root=REPO) == []


def test_readme_names_every_variable_of_env_example():
    text = README.read_text()
    missing = [name for name in env_example() if f"`{name}`" not in text]
    assert not missing, f"deploy/README.md does not name {missing}"


def test_readme_names_every_file_of_the_deployment():
    text = README.read_text()
    ignored = {"README.md", ".gitignore", ".env.example", ".env"}  # .env: a local copy, never committed
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*")
             if p.is_file() and p.name not in ignored and "__pycache__" not in p.parts
             and not p.name.endswith(".dockerignore")]
    assert files
    missing = [f for f in files if f"({f})" not in text]
    assert not missing, f"deploy/README.md does not link {missing}"
    assert "(.env.example)" in text
