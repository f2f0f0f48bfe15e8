"""The README is a front page whose commands are the ones CI runs, and every link in the docs leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
README_LIMIT = 8_000
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCS_INDEX = ROOT / "docs" / "README.md"
MARKDOWN_FILES = [ROOT / "README.md", *DOCS, ROOT / "benchmarks" / "README.md"]

# Code is not markdown: a fenced block or an inline code span may hold brackets that look like links.
_FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", flags=re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", flags=re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", flags=re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", flags=re.MULTILINE)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", flags=re.IGNORECASE)  # http:, https:, mailto:, ...


def _command(comment: str) -> str:
    match = re.search(rf"^\s*(python3 .+?)\s+# {comment}$", README, flags=re.MULTILINE)
    assert match, f"README has no command marked '# {comment}'"
    return match.group(1)


def _without_code(markdown: str) -> str:
    return _CODE_SPAN.sub("", _FENCED_CODE.sub("", markdown))


def links(markdown: str) -> list[str]:
    """The targets of the inline links, images and reference definitions outside code."""
    text = _without_code(markdown)
    return _INLINE_LINK.findall(text) + _REFERENCE_DEFINITION.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, heading in _HEADING.findall(_FENCED_CODE.sub("", markdown)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(markdown: str, where: Path) -> list[str]:
    """The relative links in ``markdown`` (a file in the folder ``where``) that lead nowhere:
    a missing file or folder, or an ``#anchor`` that is not a heading of the markdown file."""
    broken = []
    for target in links(markdown):
        if not target or _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = where / path if path else None
        if file is not None and not file.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor:
            text = markdown if file is None else file.read_text() if file.is_file() and file.suffix == ".md" else None
            if text is None:
                broken.append(f"{target}: an anchor into something that is not a markdown file")
            elif anchor not in anchors(text):
                broken.append(f"{target}: no heading with this anchor")
    return broken


def test_readme_opens_with_the_demo_and_test_commands() -> None:
    head = "\n".join(README.splitlines()[:15])
    assert _command("the main job") in head
    assert _command("the tests") in head
    assert _command("the main job").endswith("adabatch demo")
    assert _command("the tests").endswith("python3 -m pytest")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == _command("the tests")


def test_readme_quickstart_uses_the_public_names() -> None:
    import adabatch

    for name in ("AdaptiveBatchSampler", "BatchSizeScheduler", "schedules", "bn_safe_min_batch_size"):
        assert hasattr(adabatch, name)
        assert name in README


def test_readme_is_a_front_page() -> None:
    assert len(README) <= README_LIMIT, f"README.md has {len(README):,} characters; the manual belongs in docs/"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(path: Path) -> None:
    assert path.exists()
    assert broken_links(path.read_text(), path.parent) == []


def test_every_docs_page_is_reachable_from_the_readme_or_the_index() -> None:
    assert DOCS_INDEX in DOCS
    linked = {
        (source.parent / target.partition("#")[0]).resolve()
        for source in (ROOT / "README.md", DOCS_INDEX)
        for target in links(source.read_text())
        if not _EXTERNAL.match(target) and target.partition("#")[0]
    }
    orphans = [page.name for page in DOCS if page != DOCS_INDEX and page.resolve() not in linked]
    assert orphans == []


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Stopping and resuming exactly", "stopping-and-resuming-exactly"),
        ("`overhead.py`", "overheadpy"),
        ("Memory: growth capped by what the GPU holds", "memory-growth-capped-by-what-the-gpu-holds"),
        ("Several processes: torch.distributed (torchrun, DDP)", "several-processes-torchdistributed-torchrun-ddp"),
        ("The gradient noise scale (`adabatch.noise`) and `schedules.Adaptive`",
         "the-gradient-noise-scale-adabatchnoise-and-schedulesadaptive"),
        ("Epoch end / remainder", "epoch-end--remainder"),
    ],
)
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text("# A page\n\n## Second part\n")
    (tmp_path / "data.txt").write_text("")
    markdown = (
        "# Here\n"
        "[fine](page.md) [fine](page.md#second-part) [fine](#here) [fine](data.txt) [fine](./)\n"
        "[external](https://example.org/missing.md) ![image](page.md)\n"
        "`[in code](missing-in-span.md)`\n"
        "```\n[in a block](missing-in-block.md)\n```\n"
        "[gone](missing.md) ![gone too](img/missing.png) [bad anchor](page.md#third-part)\n"
        "[bad local anchor](#nowhere) [anchor into a non-markdown file](data.txt#x)\n"
        "[ref]: also-missing.md\n"
    )
    assert broken_links(markdown, tmp_path) == [
        "missing.md: no such file",
        "img/missing.png: no such file",
        "page.md#third-part: no heading with this anchor",
        "#nowhere: no heading with this anchor",
        "data.txt#x: an anchor into something that is not a markdown file",
        "also-missing.md: no such file",
    ]
    assert broken_links("[fine](page.md#a-page)", tmp_path) == []


def test_repeated_headings_get_numbered_anchors() -> None:
    assert anchors("# Usage\n## Usage\n### Usage\n```\n# not a heading\n```\n") == {"usage", "usage-1", "usage-2"}
