"""The documentation lives in the repository: every relative link of its Markdown files
(README.md, docs/*.md, and every other .md here) resolves to a file inside it."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "build", "dist", ".pytest_cache", ".hypothesis", "__pycache__"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _markdown_files():
    return sorted(p for p in ROOT.rglob("*.md")
                  if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
                  and not any(part.endswith(".egg-info") for part in p.parts))


def relative_links(text: str):
    """Targets of the Markdown links and images outside code blocks, minus web links and
    pure anchors; a target's own ``#anchor`` is dropped."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


def test_the_link_finder_finds_links():
    text = "see [a](docs/a.md#x), ![img](b.png \"t\"), [web](https://x.org), [here](#top)\n" \
           "```\n[not](code.md)\n```\n`[nor](inline.md)`"
    assert list(relative_links(text)) == ["docs/a.md", "b.png"]


def test_markdown_files_include_readme_and_docs():
    names = {p.relative_to(ROOT).as_posix() for p in _markdown_files()}
    assert {"README.md", "docs/contract.md", "docs/papers.md"} <= names


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_inside_the_repository(path):
    for target in relative_links(path.read_text()):
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name}: {target} points outside the repository"
        assert resolved.exists(), f"{path.name}: {target} does not exist"


def test_readme_links_the_contract():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/contract.md)" in readme and "SPEC.md" not in readme
