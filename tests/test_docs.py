"""The documentation holds together: every relative link in README.md, docs/*.md and the
READMEs of systemd/ and bench/ (which link into docs/) points to a file that exists and,
with a `#fragment`, to a heading that page has (GitHub's anchors); every docs page links
back to the README, and the README links to every docs page; every commit a figure says
it was measured at is in the history.

Links inside code (fenced blocks, `inline code`) are text, not links, and are not checked;
links with a scheme (https:, mailto:) leave the repository and are not followed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINKING = [*PAGES, REPO / "systemd" / "README.md", REPO / "bench" / "README.md"]

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of `text` outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: inline markup reduced to its text, lower case,
    every character but letters, digits, spaces, '-' and '_' dropped, spaces made '-'."""
    text = _LINK.sub(lambda match: match.group(1), heading)
    text = _CODE_SPAN.sub(lambda match: match.group(2), text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of `path`'s headings, repeats numbered as GitHub numbers them (-1, -2)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text()):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in `path`'s prose, code spans left out."""
    found = []
    for number, line in prose_lines(path.read_text()):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            found.append((number, match.group(2)))
    return found


def broken(path: Path, root: Path = REPO) -> list[str]:
    """What is wrong with each relative link of `path`: a missing file, or a missing anchor;
    paths are named relative to `root`."""
    problems = []
    for number, target in links(path):
        if _SCHEME.match(target):
            continue
        location, _, fragment = target.partition("#")
        destination = (path.parent / location).resolve() if location else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            problems.append(f"{where}: {destination.relative_to(root)} has no heading #{fragment}")
    return problems


def test_the_slugs_follow_githubs_rules() -> None:
    assert slug("Mail, LLM and webhooks") == "mail-llm-and-webhooks"
    assert slug("The four patterns, step by step") == "the-four-patterns-step-by-step"
    assert slug("`agentd.testing` and [the API](x.md)") == "agentdtesting-and-the-api"
    assert slug("Health, stalls and background loops") == "health-stalls-and-background-loops"
    assert slug("store_full: what -- it means") == "store_full-what----it-means"


def test_there_are_docs_pages() -> None:
    assert len(PAGES) > 1, "docs/ has no page"


@pytest.mark.parametrize("path", LINKING, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert links(path), f"{path.relative_to(REPO)} links nowhere"
    assert broken(path) == []


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda path: path.name)
def test_every_docs_page_links_back_to_the_readme(path: Path) -> None:
    targets = {target.partition("#")[0] for _, target in links(path)}
    assert "../README.md" in targets


def test_the_readme_links_to_every_docs_page() -> None:
    targets = {target.partition("#")[0] for _, target in links(REPO / "README.md")}
    missing = [path.name for path in sorted(DOCS.glob("*.md")) if f"docs/{path.name}" not in targets]
    assert missing == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    """The checker is not vacuous: it names a missing file and a missing heading, and takes
    what exists, in the same file and another."""
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[ok](other.md#a-part) [ok](other.md#a-part-1) [ok](#here) [ok](https://example.com/x#y)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[no file](missing.md) [no heading](other.md#nothing) [no heading here](#there)\n")
    assert broken(page, tmp_path) == [
        "page.md:10: missing.md: no such file",
        "page.md:10: other.md#nothing: other.md has no heading #nothing",
        "page.md:10: #there: page.md has no heading #there",
    ]


# A figure names the commit it was measured at ("at commit 1d536b8", "at 2cc2343"); a
# commit that is not in the history (lost with an unlanded session, or mistyped) leaves
# the figure unreproducible.
_MEASURED_AT = re.compile(r"\b(?:commit|at|as)\s+`?([0-9a-f]{7,40})\b")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30, check=False)
    except FileNotFoundError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def test_every_commit_a_figure_names_is_in_the_history() -> None:
    if _git("rev-parse", "--is-shallow-repository") != "false":
        pytest.skip("not a full git checkout: old commits cannot be looked up")
    named = {
        (page.relative_to(REPO).as_posix(), commit)
        for page in LINKING
        for _, line in prose_lines(page.read_text())
        for commit in _MEASURED_AT.findall(line)
        if re.search(r"[a-f]", commit)  # not a plain number such as "at 1000000"
    }
    assert named, "the benchmark pages name no commit: has the pattern stopped matching?"
    missing = sorted((page, commit) for page, commit in named
                     if _git("cat-file", "-e", f"{commit}^{{commit}}") is None)
    assert missing == []
