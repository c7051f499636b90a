"""The repository speaks about the project and its users: no tracked file reads like a work diary (work-session
headings, issue numbers, notes to whoever works on it next), and every document a tracked file cites is in the
repository (docs/<name>.md, with the section it names)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# (pattern, what a hit means). Phrases, not words: "session" is a legitimate word in code (pytest's
# scope="session", an HTTP session), "next" and "blocked" too.
WORK_LOG = [
    (r"(?i)\bissues?\s*#?\d+", "an issue number"),
    (r"(?i)^\s*#+\s*sessions?\b", "a work-session heading"),
    (r"(?i)\b(?:this|next|previous|last|earlier|later|that|one|each|every|a|the|second|first|work|working)"
     r"\s+sessions?\b", "a work session"),
    (r"(?i)\bsessions?\s+(?:of\s+|on\s+)?\d{4}-\d{2}-\d{2}", "a dated work session"),
    (r"\b\d{4}-\d{2}-\d{2}[a-z]\b", "a date with a letter suffix (a work-session label)"),
    (r"(?i)status per issue", "a status-per-issue page"),
    (r"(?i)\bfor the next\s+(?:session|person|engineer|developer|maintainer|agent|one|worker)\b",
     "a note to whoever works next"),
    (r"(?i)\bwhoever\s+(?:works|picks|comes|takes|continues)", "a note to whoever works next"),
    (r"(?i)\bnotes?\s+(?:to|for)\s+(?:the\s+)?next\b", "a note to whoever works next"),
    (r"\bNEXT(?::| for\b)", "a to-do marker"),
    (r"(?i)\b(?:marked|is|are|stays|remains)\s+blocked\b|\(blocked\b", "a work-tracking status"),
    (r"(?i)\bwork[- ]?(?:log|diary)\b", "a work log"),
]

# Documents outside the repository, or cited without their folder: cite them as docs/<name>.md.
OUTSIDE = [
    (r"(?<![\w/.-])(?:\.\./|/work/)shared\b", "a path outside the repository"),
    (r"\bDESIGN\b", "a design document outside the repository (docs/methods.md has the data contracts)"),
    (r"(?<!docs/)(?<![\w.-])(?:DESIGN|design|methods|evaluation|status|style|workflow|results|cluster|findings)"
     r"\.md\b", "a document cited without docs/ (or not in the repository)"),
]

DOC_REFERENCE = re.compile(r"\bdocs/([\w.-]+\.(?:md|png|svg))")
# docs/<name>.md "Section" or docs/<name>.md, "Section": the section must be a heading of that document.
SECTION_REFERENCE = re.compile(r'\bdocs/([\w.-]+\.md),?\s+(?:section\s+)?"([^"\n]+)"')


def tracked_texts() -> list[tuple[str, list[str]]]:
    """(path, lines) of every tracked text file but this one."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to check")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                           text=True).stdout.split("\0")
    texts = []
    for name in sorted(f for f in files if f and f != THIS):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the work tree
        try:
            texts.append((name, path.read_text(encoding="utf-8").splitlines()))
        except UnicodeDecodeError:
            continue  # binary (docs/rounds.png)
    return texts


@pytest.fixture(scope="module")
def texts() -> list[tuple[str, list[str]]]:
    return tracked_texts()


def hits(texts, patterns) -> list[str]:
    compiled = [(re.compile(p), why) for p, why in patterns]
    found = []
    for name, lines in texts:
        for number, line in enumerate(lines, 1):
            for pattern, why in compiled:
                match = pattern.search(line)
                if match:
                    found.append(f"{name}:{number}: {why} ({match.group(0)!r}): {line.strip()[:160]}")
    return found


def headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in doc.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def test_the_patterns_find_what_they_are_meant_to():
    # the sample lines are assembled, so that this file does not itself read like the work log it describes
    work, task, shared = "Ses" + "sion", "Iss" + "ue", "../" + "shared/"
    diary = [("x.md", [f"## {work} 2026-12-04e (AMD EPYC)", f"{task} 5's bar is met.", "NEXT: try mDPO",
                       f"notes for the next {work.lower()}", f"(see {shared}DESIGN.md)", "methods.md \"APASI\"",
                       f"the next {work.lower()} should measure it", "Whoever works next: start here"])]
    assert len({f.split(":")[1] for f in hits(diary, WORK_LOG + OUTSIDE)}) == 8
    legitimate = [("x.py", ['@pytest.fixture(scope="session")', "s = requests.Session()", "next(iter(files))",
                            "the transfer stopped early; kept for the next try", "docs/methods.md \"APASI\"",
                            "results/comparison.md and summary.md", "a blocked port"])]
    assert hits(legitimate, WORK_LOG + OUTSIDE) == []


def test_no_tracked_file_reads_like_a_work_log(texts):
    found = hits(texts, WORK_LOG)
    assert not found, "work-log wording in tracked files:\n" + "\n".join(found)


def test_no_tracked_file_cites_a_document_outside_the_repository(texts):
    found = hits(texts, OUTSIDE)
    assert not found, "documents cited that a clone does not have:\n" + "\n".join(found)


def test_every_cited_docs_file_exists(texts):
    missing = [f"{name}:{number}: docs/{doc}" for name, lines in texts for number, line in enumerate(lines, 1)
               for doc in DOC_REFERENCE.findall(line) if not (ROOT / "docs" / doc).is_file()]
    assert not missing, "cited but not in docs/:\n" + "\n".join(missing)


def test_every_cited_section_exists(texts):
    missing = []
    for name, lines in texts:
        for number, line in enumerate(lines, 1):
            for doc, section in SECTION_REFERENCE.findall(line):
                path = ROOT / "docs" / doc
                if path.is_file() and section not in headings(path):
                    missing.append(f'{name}:{number}: docs/{doc} has no heading "{section}"')
    assert not missing, "\n".join(missing)
