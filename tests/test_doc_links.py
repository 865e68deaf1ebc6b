"""Every relative link in the user docs points at a file that exists (a moved or archived result file breaks no
link silently)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "clients/README.md", "diffpo_serve/bundled_model/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """The targets of a markdown text's ``[...](target)`` links that are paths in the repository (no URL, no
    in-page anchor), with any ``#anchor`` cut."""
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        out.append(target.split("#")[0])
    return out


def test_relative_links_finds_paths_only():
    text = "[a](docs/x.md) [b](https://e.org/y) [c](#top) [d](results/z.png#frag) ![e](f.png)"
    assert relative_links(text) == ["docs/x.md", "results/z.png", "f.png"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    path = ROOT / doc
    missing = [t for t in relative_links(path.read_text()) if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_the_benchmarks_page_stays_short():
    """docs/benchmarks.md holds current results only and reads in minutes: at most 400 lines (the development
    history goes to docs/history.md and docs/results/archive/)."""
    assert len((ROOT / "docs" / "benchmarks.md").read_text().splitlines()) <= 400
