"""The README and docs/: every reference page one click from the README, every link and anchor
resolves, and the reference names what the code defines (exit codes, error codes, event kinds
and RPC methods). Issue 11: the README keeps the tour, the reference lives in docs/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from engctl import errors

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
CHANGELOG = ROOT / "CHANGELOG.md"

# Issue 11: the README is read top to bottom; the reference is searched in docs/.
README_MAX_BYTES = 25_000

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
# A dotted name in backticks, with the `noun.a|b|c` shorthand of the method lists.
_DOTTED_DOC = re.compile(r"`([a-z_]+)\.((?:[a-z_]+\|)*[a-z_]+)")
# Event kinds and RPC methods as the source spells them.
_DOTTED_SRC = re.compile(
    r"[\"']((?:instance|engine|daemon|policy|registry|request|status|events|logs|metrics"
    r"|session)\.[a-z_]+)[\"']"
)


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a link there is an example, not a link)."""
    return _FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a page (a repeated heading gets -1, -2, … as on GitHub)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in _HEADING.findall(prose(path)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> Iterator[str]:
    """The relative link targets of a page."""
    for target in _LINK.findall(prose(path)):
        if not re.match(r"[a-z]+:", target):
            yield target


def documented_names() -> set[str]:
    """Every dotted name written in backticks in the README and docs/, shorthand expanded."""
    names: set[str] = set()
    for page in PAGES:
        for noun, verbs in _DOTTED_DOC.findall(page.read_text()):
            names.update(f"{noun}.{verb}" for verb in verbs.split("|"))
    return names


def test_docs_exist() -> None:
    """docs/ holds the reference pages (a glob over nothing would make every test below pass)."""
    assert len(DOCS) >= 10


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_readme_links_every_docs_page(page: Path) -> None:
    """Everything the README dropped is one click away: it links every page of docs/."""
    assert f"](docs/{page.name}" in prose(README), f"README does not link docs/{page.name}"


def test_readme_stays_short() -> None:
    """The README is what a user reads top to bottom: under ~25 KB."""
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README is {size} bytes"


@pytest.mark.parametrize("page", [*PAGES, CHANGELOG], ids=lambda p: p.name)
def test_links_and_anchors_resolve(page: Path) -> None:
    """Every relative link names a file that exists, and every #anchor a heading of it."""
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_cite_no_spec(page: Path) -> None:
    """The SPEC is not in the repository: the docs link each other instead of citing it."""
    assert "SPEC §" not in page.read_text()


def test_every_exit_code_is_documented() -> None:
    """docs/cli.md has one row per exit code of engctl.errors, and no other."""
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    text = (ROOT / "docs" / "cli.md").read_text()
    table = text[text.index("## Exit codes") :]
    rows = {int(n) for n in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert rows == codes


def _error_classes() -> list[type[errors.EngctlError]]:
    found: list[type[errors.EngctlError]] = []
    todo: list[type[errors.EngctlError]] = [errors.EngctlError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_is_documented() -> None:
    """docs/protocol.md lists every error class with its JSON-RPC code and exit code."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    rows = {
        name: (int(code), int(exit_code))
        for code, name, exit_code in re.findall(
            r"^\| (-\d+) \| `(\w+)`[^|]*\| (\d+) \|$", text, re.M
        )
    }
    expected = {cls.__name__: (cls.rpc_code, cls.exit_code) for cls in _error_classes()}
    assert rows == expected


def test_every_event_kind_and_method_is_documented() -> None:
    """Each event kind the daemon emits and each RPC method it serves is named in the docs."""
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "engctl").rglob("*.py"))
    used = set(_DOTTED_SRC.findall(source))
    assert used, "no event kinds or methods found in the source"
    missing = sorted(used - documented_names())
    assert not missing, f"not in README.md or docs/: {missing}"


# Keep a Changelog's kinds of change, in its order.
CHANGE_KINDS = ["Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"]


def test_changelog_has_one_heading_of_each_kind_per_version() -> None:
    """Each version of CHANGELOG.md has each kind of change at most once, in Keep a Changelog's
    order (merged branches left three `### Added` under [Unreleased]), and releases are dated."""
    versions = re.split(r"^## ", CHANGELOG.read_text(), flags=re.M)[1:]
    assert versions[0].startswith("[Unreleased]")
    for version in versions:
        title = version.splitlines()[0]
        kinds = re.findall(r"^### (.+)$", version, re.M)
        assert set(kinds) <= set(CHANGE_KINDS), f"{title}: {kinds}"
        assert kinds == sorted(set(kinds), key=CHANGE_KINDS.index), f"{title}: {kinds}"
        if not title.startswith("[Unreleased]"):
            assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", title), title
