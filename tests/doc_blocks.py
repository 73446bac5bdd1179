"""The code blocks of README.md and docs/*.md, found by the heading of their section, for the tests that run them.

A section is named by its heading line (`## Usage`, `### PerceptionLM`; a heading that starts with the given
text matches). Each heading a test names must occur in exactly one document. A block whose fence says
`not-run` after its language (```` ```bash not-run ````) is one no test runs: tests/test_readme.py checks that
every other python or bash block belongs to a section some test runs.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)


def documents() -> list[Path]:
    """README.md, then the guides in docs/ in name order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _headed(text: str, heading: str) -> str | None:
    """The text after the heading line that starts with `heading`, up to the next heading of the same level or
    higher; None where there is no such heading."""
    lines = text.splitlines(keepends=True)
    level = len(heading) - len(heading.lstrip("#"))
    for i, line in enumerate(lines):
        if line.startswith(heading):
            rest = []
            for later in lines[i + 1:]:
                hashes = len(later) - len(later.lstrip("#"))
                if 0 < hashes <= level and later[hashes:hashes + 1] == " " and not _in_fence(rest):
                    break
                rest.append(later)
            return "".join(rest)
    return None


def _in_fence(lines: list[str]) -> bool:
    return sum(line.startswith("```") for line in lines) % 2 == 1


def section(heading: str) -> tuple[Path, str]:
    """(the document, the section's text) of the one document with that heading."""
    found = [(doc, body) for doc in documents() if (body := _headed(doc.read_text(), heading)) is not None]
    assert len(found) == 1, f"heading {heading!r} in {[str(d.relative_to(ROOT)) for d, _ in found] or 'no document'}"
    return found[0]


def block(heading: str, language: str = "python") -> str:
    """The first `language` block of the section `heading`."""
    doc, body = section(heading)
    for lang, _, code in FENCE.findall(body):
        if lang == language:
            return code
    raise AssertionError(f"no {language} block under {heading!r} in {doc.relative_to(ROOT)}")


def run_python(heading: str) -> dict:
    """Executes the section's first python block; returns its globals."""
    doc, _ = section(heading)
    scope: dict = {}
    exec(compile(block(heading), f"{doc.relative_to(ROOT)} ({heading})", "exec"), scope)
    return scope


def all_blocks() -> list[tuple[Path, str, str, str, str]]:
    """(document, heading of the innermost section, language, fence options, code) of every fenced block."""
    out = []
    for doc in documents():
        heading, text = "", doc.read_text()
        fences = {m.start(): m for m in FENCE.finditer(text)}
        position = 0
        for line in text.splitlines(keepends=True):
            if position in fences:
                m = fences[position]
                out.append((doc, heading, m.group(1), m.group(2).strip(), m.group(3)))
            elif line.startswith("#") and not any(m.start() < position < m.end() for m in fences.values()):
                heading = line.strip()
            position += len(line)
    return out
