"""mkdocs hook: the site's home page is the repository's README.md, so the two can never disagree.

Links into docs/ are rewritten to the site's pages; links to other repository files (LICENSE, CITATION.cff),
which the site does not carry, become their names in code.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def site_links(markdown: str) -> str:
    def rewrite(match: re.Match) -> str:
        bang, text, target = match.groups()
        if target.startswith(("http://", "https://", "#")):
            return match.group(0)
        if target.startswith("docs/"):
            return f"{bang}[{text}]({target[len('docs/'):]})"
        return f"`{target}`" if text == target else f"{text} (`{target}`)"

    return LINK.sub(rewrite, markdown)


def on_files(files: Files, config) -> Files:
    readme = Path(config["docs_dir"]).parent / "README.md"
    files.append(File.generated(config, "index.md", content=site_links(readme.read_text())))
    return files
