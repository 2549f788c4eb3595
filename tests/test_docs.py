"""The documentation holds together: ``docs/architecture.md`` names every module of the app, every relative
link in ``README.md`` and ``docs/*.md`` leads to a file that exists, and the README stays a short front page
that starts with the two commands. Plain text checks: no network, no import of the app."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ARCHITECTURE = DOCS / "architecture.md"

# the app's packages and top-level scripts, whose every module the architecture page names
PACKAGES = ("pages/", "ui/", "domain/", "storage/", "unet/", "web/", "bench/", "scripts/")
TOP_LEVEL = ("app.py",)
NOT_LISTED = ("storage/migrations/versions/",)  # one entry for all migrations

README_MAX_LINES = 150
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.DOTALL)  # a code span never crosses a blank line


def _git(*args: str) -> list[str]:
    """The paths ``git ls-files`` prints, run from the repository root; skips when there is no git or no
    repository here (an unpacked copy of the sources)."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, timeout=60,
                              check=False)
    except FileNotFoundError:
        pytest.skip("git is not installed: cannot list the repository's modules")
    except subprocess.TimeoutExpired:
        pytest.skip("git ls-files did not answer within 60 s")
    if done.returncode != 0:
        pytest.skip(f"git ls-files failed here (not a git checkout?): {done.stderr.decode(errors='replace').strip()}")
    return [p for p in done.stdout.decode().split("\0") if p]


def app_modules() -> list[str]:
    """Every Python module of the app's packages and top-level scripts: tracked, or untracked and not
    ignored, and present in the working tree."""
    paths = set(_git("--", "*.py")) | set(_git("--others", "--exclude-standard", "--", "*.py"))
    return sorted(p for p in paths
                  if p.endswith(".py") and (p in TOP_LEVEL or p.startswith(PACKAGES))
                  and not p.startswith(NOT_LISTED) and (ROOT / p).is_file())


def named(path: str, text: str) -> bool:
    """Whether ``text`` names ``path`` as a path of its own (``ui/live.py`` is not named by ``xui/live.py``)."""
    return re.search(rf"(?<![\w/.-]){re.escape(path)}(?![\w/])", text) is not None


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of a page's Markdown links that are neither URLs (a scheme) nor anchors of the page itself;
    code blocks and code spans are left out (what they show is not a link)."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not target.startswith("#") and not SCHEME.match(target)]


def test_the_architecture_page_names_every_module():
    modules = app_modules()
    assert "app.py" in modules and "storage/service.py" in modules, f"listing the modules went wrong: {modules}"
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = [m for m in modules if not named(m, text)]
    assert not missing, (f"{ARCHITECTURE.relative_to(ROOT)} does not name {len(missing)} module(s); add a line "
                         "for each: " + ", ".join(missing))


def test_every_relative_link_leads_to_a_file():
    broken, checked = [], 0
    for page in doc_pages():
        for target in relative_links(page):
            checked += 1
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: ({target})")
    assert checked, "no relative link found at all: is the link pattern right?"
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in relative_links(README)}
    unlinked = [str(p.relative_to(ROOT)) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, "README.md's Documentation section does not link: " + ", ".join(unlinked)


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the details into docs/")
    head = "\n".join(lines[:10])
    for command in ("./run.sh", "./test.sh"):
        assert command in head, f"README.md does not show `{command}` in its first 10 lines"
