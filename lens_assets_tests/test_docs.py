"""The contracts in docs/ name what the code defines, and every relative link in README.md and docs/ resolves."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKDOWN = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _missing(names, text: str) -> list[str]:
    """The names that ``text`` never writes as inline code (`name`)."""
    return sorted(n for n in set(names) if f"`{n}`" not in text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: inline code marks dropped, lower case, punctuation other than ``-`` and ``_``
    removed, spaces as hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def broken_links(path: Path, *, root: Path) -> list[str]:
    """``target: why`` for each relative link of the markdown file ``path`` whose file is not inside ``root`` or
    whose ``#anchor`` is no heading of that file (links inside fenced code are not links)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, data:
            continue
        file_part, _, frag = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root.resolve()):
            out.append(f"{target}: outside the repository")
        elif not dest.exists():
            out.append(f"{target}: no such file {dest.relative_to(root.resolve())}")
        elif frag and dest.is_file() and dest.suffix == ".md":
            anchors = {anchor(h) for h in _HEADING.findall(_FENCE.sub("", dest.read_text(encoding="utf-8")))}
            if frag not in anchors:
                out.append(f"{target}: {dest.name} has no heading with anchor #{frag}")
    return out


def test_docs_exist():
    assert {p.name for p in DOCS.glob("*.md")} >= {"design.md", "fits_inbox_contract.md", "assets.md", "metrics.md",
                                                   "data_layout.md"}


def test_fits_contract_doc_names_every_quarantine_reason_and_keyword():
    from lens_assets.science.fits_contract import BAND_FLAGS, BAND_KEYWORDS, PRIMARY_KEYWORDS, QUARANTINE_REASONS

    text = _text("fits_inbox_contract.md")
    assert _missing(QUARANTINE_REASONS, text) == []
    assert _missing(PRIMARY_KEYWORDS, text) == []
    assert _missing(BAND_KEYWORDS, text) == []
    assert _missing(BAND_FLAGS, text) == []
    # each reason has its own row of the reasons table: "| `reason` | what triggers it |"
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, re.M))
    assert sorted(set(QUARANTINE_REASONS) - rows) == []
    from lens_assets.inbox import COMPLETE_MARKER

    assert f"`{COMPLETE_MARKER}`" in text


def test_assets_doc_has_a_section_per_asset_and_names_every_check_sensor_job_and_schedule():
    from lens_assets.definitions import defs

    text = _text("assets.md")
    graph = defs.resolve_asset_graph()
    sections = {h.strip("` ") for h in re.findall(r"^### (.+)$", text, re.M)}
    assert sorted({k.to_user_string() for k in graph.get_all_asset_keys()} - sections) == []
    assert _missing([c.name for c in graph.asset_check_keys], text) == []
    assert _missing([s.name for s in defs.sensors] + [s.name for s in defs.schedules] + [j.name for j in defs.jobs],
                    text) == []


def test_metrics_doc_names_the_headline_keys_and_every_bin():
    from lens_assets.assets.evaluation import HEADLINE
    from lens_assets.science.metrics import ARC_SNR_BINS, BOOTSTRAP_METRICS, FLUX_RATIO_BINS, THETA_E_BINS

    text = _text("metrics.md")
    assert _missing(HEADLINE, text) == []
    assert _missing(BOOTSTRAP_METRICS, text) == []
    assert _missing([name for bins in (FLUX_RATIO_BINS, THETA_E_BINS, ARC_SNR_BINS) for name, _, _ in bins], text) == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path, root=REPO) == []


def test_broken_links_reports_a_missing_file_an_unknown_anchor_and_an_escape(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## The `report.json` keys\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok too](docs/a.md#the-reportjson-keys) [web](https://example.org/x)\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#nowhere) [out](../elsewhere.md)\n"
                    "```\n[in code](not/a/link.md)\n```\n")
    assert broken_links(page, root=tmp_path) == [
        "docs/b.md: no such file docs/b.md",
        "docs/a.md#nowhere: a.md has no heading with anchor #nowhere",
        "../elsewhere.md: outside the repository",
    ]
