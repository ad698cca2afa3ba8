"""The layers of docs/design.md: science never imports dagster or torch; ml never imports dagster
(except dagster_pipes)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lens_assets"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer,forbidden", [("science", {"dagster", "torch", "lightning", "timm", "dagster_pandera"}),
                                             ("ml", {"dagster", "dagster_pandera", "dagster_aws"})])
def test_layers_import_only_downwards(layer, forbidden):
    offenders = {str(p.relative_to(PKG)): sorted(_imports(p) & forbidden) for p in (PKG / layer).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def _lens_assets_modules_after_importing(module: str) -> set[str]:
    """The lens_assets modules a fresh interpreter has loaded after ``import module``."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('lens_assets')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    return set(out.split())


@pytest.mark.parametrize("module,forbidden", [
    # the producer's API: a survey team publishes drops without loading the asset graph
    ("lens_assets.inbox", ("lens_assets.assets", "lens_assets.sensors", "lens_assets.definitions")),
    # scoring calls down (model registry) and never into the training side of the graph
    ("lens_assets.assets.scoring", ("lens_assets.assets.evaluation", "lens_assets.assets.training",
                                    "lens_assets.assets.promotion")),
    ("lens_assets.model_registry", ("lens_assets.assets", "lens_assets.sensors")),
])
def test_consumers_and_producers_load_no_module_above_them(module, forbidden):
    loaded = _lens_assets_modules_after_importing(module)
    assert module in loaded
    assert sorted(m for m in loaded if m.startswith(forbidden)) == []
