"""The documentation: README.md is a short front door, docs/ is a mkdocs site that builds strictly.

These checks are durable (no git history, no network): the README's length and its first two
commands, the site's nav against the pages on disk, the README's links, and, where mkdocs is
installed (the `docs` extra), a `mkdocs build --strict` into a temporary folder.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"

FENCE = re.compile(r"^```[a-z]*\n(.*?)^```$", re.S | re.M)


class _AnyTagLoader(yaml.SafeLoader):
    """Reads mkdocs.yml, whose `!relative` and `!ENV` tags plain YAML does not know."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _mkdocs_config() -> dict:
    return yaml.load(MKDOCS_YML.read_text(), Loader=_AnyTagLoader)


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += _nav_pages(value)
        elif not re.match(r"[a-z]+://", value):
            pages.append(value)
    return pages


def _excluded(page: Path) -> bool:
    """What mkdocs.yml's exclude_docs leaves out of the site (e.g. hooks/)."""
    patterns = (_mkdocs_config().get("exclude_docs") or "").split()
    rel = page.relative_to(DOCS).as_posix()
    return any(rel.startswith(p.rstrip("/") + "/") or rel == p for p in patterns)


def _github_slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_front_door_of_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move sections to docs/"


def test_readme_first_two_commands_are_try_it_and_test_it():
    text = README.read_text()
    blocks = list(FENCE.finditer(text))
    assert len(blocks) >= 2
    for block, lead, must_hold in (
        (blocks[0], "**Try it**", "scripts/demo.sh"),
        (blocks[1], "**Test it**", "pytest"),
    ):
        command = block.group(1).strip()
        assert "\n" not in command, f"{lead} must stay one command line: {command!r}"
        assert command.startswith("apt-get update"), f"{lead} starts on a fresh Debian 12"
        assert must_hold in command
        # The paragraph that introduces the command is the last one before it.
        before = text[: block.start()].rstrip()
        paragraph = before.rsplit("\n\n", 1)[-1]
        assert paragraph.lstrip().startswith(lead) or f"\n{lead}" in paragraph, (
            f"the command after {paragraph[:40]!r} should be introduced by {lead}"
        )


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    nav = _nav_pages(_mkdocs_config()["nav"])
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"in mkdocs.yml's nav but not in docs/: {missing}"
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if not _excluded(p)}
    assert on_disk - set(nav) == set(), "pages in docs/ missing from mkdocs.yml's nav"
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"


def test_readme_links_every_page_and_its_links_resolve_on_github():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links {link}, which does not exist"
        if anchor:
            slugs = {_github_slug(h) for h in re.findall(r"(?m)^#+ (.+)$", target.read_text())}
            assert anchor in slugs, f"README.md links {link}: no such heading in {path}"
    linked = {Path(link.partition("#")[0]).as_posix() for link in local}
    for page in _nav_pages(_mkdocs_config()["nav"]):
        assert f"docs/{page}" in linked, f"README.md's map of the docs does not link docs/{page}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict_succeeds(tmp_path):
    site = tmp_path / "site"
    # Not --quiet: it drops the warnings before --strict can count them, and the build passes.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    result = subprocess.run(
        [*command, "--config-file", str(MKDOCS_YML), "--site-dir", str(site)],
        cwd=tmp_path,  # the config's paths must not depend on where it is built from
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # ARCHITECTURE.md is included from the top level, not copied into docs/.
    architecture = (site / "architecture" / "index.html").read_text()
    assert "One package, <code>agent/</code>" in architecture
    # A pipe escaped for GitHub's tables shows as a pipe on the site too (docs/hooks/).
    commands = (site / "commands" / "index.html").read_text()
    assert "table|csv|json" in commands and "table\\|csv" not in commands
