"""The layers of docs/design.md: science never imports dagster or torch; ml never imports dagster (except dagster_pipes)."""

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
