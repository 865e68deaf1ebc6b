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


FOOTER = re.compile(r"\n---\nProvenance: commit [0-9a-f]{7,}\S*, \d{4}-\d\d-\d\d \d\d:\d\d UTC.*; `python -m "
                    r"benchmarks\.[a-z_0-9]+( [^`]*)?`; .+; models \(SHA-256 of the weight files, first 16 hex digits\): "
                    r"(none loaded|`[^`]+` \([0-9a-f]{16}\)(, `[^`]+` \([0-9a-f]{16}\))*)\.\n$")


def current_results() -> list[str]:
    results = ROOT / "docs" / "results"
    return sorted(str(p.relative_to(results)) for p in results.rglob("*.md") if "archive" not in p.parts)


def test_the_provenance_footer_pattern_by_hand():
    ok = ("x\n\n---\nProvenance: commit 81d3144+uncommitted, 2026-12-07 18:30 UTC (the run started at d5c663d); "
          "`python -m benchmarks.kv_cache --n 2`; AMD EPYC, 1 torch threads; models (SHA-256 of the weight files, "
          "first 16 hex digits): `runs/a` (0123456789abcdef), `b` (fedcba9876543210).\n")
    assert FOOTER.search(ok)
    for bad in (ok.replace("commit 81d3144", "commit ?"), ok.replace("`python -m benchmarks.kv_cache --n 2`", "-"),
                ok.replace("(0123456789abcdef)", "(0123)"), ok + "more text\n"):
        assert not FOOTER.search(bad)


@pytest.mark.parametrize("name", current_results())
def test_every_current_result_file_records_its_provenance(name):
    """Commit, date, command, machine and the checksum of every model loaded, as benchmarks/common.py's save
    writes them (superseded files go to docs/results/archive/, which is not checked)."""
    assert FOOTER.search((ROOT / "docs" / "results" / name).read_text()), f"{name}: no provenance footer"
