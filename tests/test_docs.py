"""The documentation's relative links point at files that exist (README.md, docs/, bench/README.md):
a page moved or renamed without its links fails here, not in a newcomer's browser."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    pages = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(REPO)}: {target}"
              for page in pages for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme] == []


def test_named_code_files_exist():
    """A module, test or bench script the documentation names exists under that path."""
    pages = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {m for page in pages
             for m in re.findall(r"(?<![\w/.])((?:pipeline|stages|tests|bench)/[\w/]+\.(?:py|sh))", page.read_text())}
    assert named and sorted(m for m in named if not (REPO / m).exists()) == []
