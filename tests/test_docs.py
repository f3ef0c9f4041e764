"""The docs stay true to the tree: the config reference is current, and every relative link in
README.md and docs/*.md points at a file that exists."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_config_reference_is_current():
    from ttt_jax.config.reference import reference

    page = (ROOT / "docs" / "config.md").read_text()
    assert page == reference(), (
        "docs/config.md is stale: run `python -m ttt_jax.config.reference > docs/config.md`")


def test_config_reference_documents_every_field():
    import dataclasses

    from ttt_jax.config.reference import SECTIONS, field_docs

    undocumented = [f"{p}.{f.name}" for p, cls in SECTIONS for f in dataclasses.fields(cls)
                    if not field_docs(cls).get(f.name, ("", ""))[1]]
    assert not undocumented, f"config fields without a docstring: {undocumented}"


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)   # links inside code are code
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_link_pattern_finds_relative_links():
    sample = "see [a](docs/x.md#y), ![p](img.png \"t\"), [w](https://e.org) and [s](#here)"
    assert [t for t in LINK.findall(sample) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)] == [
        "docs/x.md#y", "img.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = [t for t in _relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than ``-`` dropped, spaces -> ``-``."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    heads = [ln.lstrip("#").strip().lower() for ln in text.splitlines() if ln.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h).replace(" ", "-") for h in heads}


def test_anchor_rule_matches_github():
    assert _anchors_of("## Context parallelism: weak scaling, 4 x H100\n## `ttt-jax train tiny`") == {
        "context-parallelism-weak-scaling-4-x-h100", "ttt-jax-train-tiny"}


def _anchors_of(text: str) -> set[str]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".md", delete=False) as f:
        f.write(text)
    return _anchors(Path(f.name))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_anchors_resolve(page):
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if anchor and dest.suffix == ".md" and dest.exists() and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing headings: {broken}"
