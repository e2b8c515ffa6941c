"""Check that every relative markdown link in the repository's docs points to something that exists.

    python3 docs/check_links.py          # exit 0: all links resolve; 1: one line per broken link

Files checked: README.md, CONTRIBUTING.md, CHANGELOG.md and docs/**/*.md. A link is relative when it
has no scheme (http:, https:, mailto:); its target is resolved against the linking file's folder and
must exist. A `#anchor` on a markdown target (or alone, meaning the same file) must match one of
that file's headings, slugged as GitHub does (lower case, punctuation dropped, spaces to hyphens).
Links inside fenced code blocks and inline code are ignored. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]+(?:\([^()\s]*\))?)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def files() -> List[Path]:
    found = [ROOT / n for n in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md") if (ROOT / n).is_file()]
    return found + sorted((ROOT / "docs").rglob("*.md"))


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line without inline code) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        yield number, re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    seen: dict = {}
    out = set()
    fence = None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            fence = None if fence else stripped[:3]
            continue
        if fence:
            continue
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> List[str]:
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            target = match.group(1)
            if SCHEME.match(target):
                continue
            where, _, anchor = target.partition("#")
            dest = (path.parent / where).resolve() if where else path
            label = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                problems.append(
                    f"{label}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
                )
            elif anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
                problems.append(f"{label}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def main() -> int:
    checked = files()
    problems = [p for f in checked for p in broken_links(f)]
    for problem in problems:
        print(problem)
    if not problems:
        print(f"links ok: {len(checked)} files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
