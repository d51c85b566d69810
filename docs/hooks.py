"""mkdocs hook: ``<!-- readme: Heading -->`` in a page is replaced by that README section.

The docs show the README's own text (one source), with links to repository files turned into
links to the repository, so the strict build finds no broken link.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = "https://github.com/mechsteer/mechsteer/blob/main/"
MARK = re.compile(r"<!-- readme: (.+?) -->")
LINK = re.compile(r"\]\((?!https?://|#)([^)]+)\)")


def readme_section(heading: str) -> str:
    """The README section under ``heading``, up to the next heading (without its heading line)."""
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+) (.*)$", line)
        if m and m.group(2).strip() == heading:
            body = []
            for nxt in lines[i + 1 :]:
                if re.match(r"^#+ ", nxt):  # up to the next heading: a subsection has its own marker
                    break
                body.append(nxt)
            return LINK.sub(lambda l: f"]({REPO}{l.group(1)})", "\n".join(body))
    raise ValueError(f"README.md has no section {heading!r} (docs include it).")


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARK.sub(lambda m: readme_section(m.group(1)), markdown)
