"""lens_assets.layout names every path under the storage root; the modules around the assets ask it instead of
spelling paths, and docs/data_layout.md lists each of its paths."""

import ast
import inspect
import re
from pathlib import Path

import pytest

from lens_assets import layout
from lens_assets.resources.storage import LocalStorage

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "lens_assets"
STORAGE_METHODS = {"path", "pull", "push", "write_text", "write_parquet", "exists", "list_dirs", "url", "publish_dir"}
# modules whose every path lies under the storage root: they may neither give storage a literal part nor join one
UNDER_ROOT = sorted([*(PKG / "assets").glob("*.py"), *(PKG / "sensors").glob("*.py"), PKG / "model_registry.py",
                     PKG / "inbox.py", PKG / "demo.py"])
# modules with scratch or cache folders of their own: they may not give storage a literal part
STORAGE_USERS = [PKG / "resources" / "train_remote.py", REPO / "benchmarks" / "bench_scoring.py"]


def _places(survey="des", drop="night-1", member="regnetx_002", version="0123456789abcdef") -> dict:
    values = {"survey": survey, "drop": drop, "member": member, "version": version}
    return {name: fn(*(values[p] for p in inspect.signature(fn).parameters)) for name, fn in layout.PLACES.items()}


def test_every_place_of_a_survey_is_a_distinct_path_strictly_under_the_root(tmp_path):
    storage = LocalStorage(root=str(tmp_path / "root"))
    places = _places()
    assert len(places) >= 40  # the functions are found (PLACES is not empty by accident)
    for name, parts in places.items():
        assert isinstance(parts, tuple) and parts, name
        assert all(isinstance(p, str) and p and "/" not in p and p not in (".", "..") for p in parts), (name, parts)
        path = storage.path(*parts)
        assert path.is_relative_to(storage.root_path) and path != storage.root_path, name
        assert storage.relative(path) == layout.relative(parts)
    assert len(set(places.values())) == len(places)
    # two surveys (or two drops) never share a file
    other = _places(survey="hsc", drop="night-2")
    assert set(places.values()).isdisjoint(other.values()) or \
        {k for k in places if places[k] == other[k]} == {"inbox_root"}


def test_files_sit_in_the_folders_the_layout_names():
    p = _places()
    assert p["catalog_table"][:-1] == p["quarantine_table"][:-1] == p["catalog_dir"]
    assert p["shards_rows"][:-1] == p["shards_manifest"][:-1] == p["shards_dir"]
    assert p["member_dir"][:-1] == p["ensemble_manifest"][:-1] == p["models_dir"]
    assert p["complete_marker"] == (*p["inbox_drop"], layout.COMPLETE_MARKER)
    assert p["inbox_drop"][:-1] == p["inbox_survey"] and p["inbox_survey"][:1] == p["inbox_root"]
    for name in ("promoted_ensemble", "promoted_calibrator", "promoted_checkpoint", "promotion_doc"):
        assert p[name][:-1] == p["promoted_dir"], name  # promoted_model replaces the folder as one
    for name in ("report_json", "report_md", "report_roc", "report_score_histograms", "report_reliability"):
        assert p[name][:-1] == p["report_dir"], name  # bologna_report pushes the folder once
    for name in ("candidate_table", "candidate_quarantine", "candidate_histogram", "candidate_gallery"):
        assert p[name][:-1] == p["candidates_dir"], name
    for name in ("cluster_vetted_model_file", "cluster_vetted_calibrator_file"):
        assert p[name][:-1] == p["cluster_vetted_dir"], name  # write_cluster_manifest publishes the folder as one
    assert p["cluster_vetted_dir"][:-2] == p["cluster_models_dir"]
    assert (layout.simulation_drop("baseline", 3) == "sim-3"
            and layout.simulation_drop("physical", 3) == "sim-physical-3")


def test_shard_folder_names_are_the_shard_formats_own():
    from lens_assets.science.shards import MANIFEST_FILE, ROWS_FILE

    assert layout.shards_manifest("des")[-1] == MANIFEST_FILE
    assert layout.shards_rows("des")[-1] == ROWS_FILE
    from lens_assets.inbox import COMPLETE_MARKER

    assert COMPLETE_MARKER == layout.COMPLETE_MARKER == "_COMPLETE"


def test_data_layout_doc_lists_every_place_with_its_function():
    rows = [line for line in (REPO / "docs" / "data_layout.md").read_text().splitlines() if line.startswith("|")]
    missing = {name: template for name, template in layout.templates().items()
               if not any(f"`{template}`" in row and f"`{name}`" in row for row in rows)}
    assert missing == {}


def _storage_receiver(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "storage") or (
        isinstance(node, ast.Attribute) and node.attr == "storage")


def spelled_paths(source: str, *, joins: bool = True) -> list[str]:
    """``line: code`` for each storage call given a literal path part, and (``joins``) each ``path / "literal"``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        literal = None
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STORAGE_METHODS
                and _storage_receiver(node.func.value)):
            literal = next((a for a in node.args if isinstance(a, (ast.Constant, ast.JoinedStr))
                            and (isinstance(a, ast.JoinedStr) or isinstance(a.value, str))), None)
        elif joins and isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and (
                isinstance(node.right, ast.JoinedStr)
                or (isinstance(node.right, ast.Constant) and isinstance(node.right.value, str))):
            literal = node.right
        if literal is not None:
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


@pytest.mark.parametrize("path", UNDER_ROOT + STORAGE_USERS, ids=lambda p: str(p.relative_to(REPO)))
def test_callers_build_no_path_themselves(path):
    assert spelled_paths(path.read_text(), joins=path in UNDER_ROOT) == []


def test_spelled_paths_finds_literal_parts_and_joins():
    src = ('storage.pull("catalog", survey)\nself.storage.url(f"inbox/{s}")\nstorage.path(*layout.catalog_dir(s))\n'
           'out_dir / "report.json"\nout / Path(p).name\nstorage.path(f)\n')
    assert [re.sub(r"^\d+: ", "", s) for s in spelled_paths(src)] == [
        "storage.pull('catalog', survey)", "self.storage.url(f'inbox/{s}')", "out_dir / 'report.json'"]
    assert len(spelled_paths(src, joins=False)) == 2
