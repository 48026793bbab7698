"""Every Python example in README.rst and the documentation runs, as written, in a
temporary working directory with the default store moved into it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
#: The README first, then every page of the documentation that shows code.
PAGES = [README, *sorted((ROOT / "docs").glob("*.rst"))]


def python_blocks() -> List[str]:
    return [block for page in PAGES for block in page_blocks(page)]


def page_blocks(page: Path) -> List[str]:
    blocks = []
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == ".. code-block:: python":
            body = []
            for following in lines[i + 2 :]:
                if following and not following.startswith("    "):
                    break
                body.append(following[4:])
            blocks.append("\n".join(body).strip() + "\n")
    return blocks


def needs_server(code: str) -> bool:
    """Examples that need a Redis or PostgreSQL server run in tests/test_servers.py."""
    return re.search(r"redis|postgres", code, re.I) is not None


LOCAL = [b for b in python_blocks() if not needs_server(b)]


def test_readme_has_examples() -> None:
    assert len([b for b in page_blocks(README) if not needs_server(b)]) >= 3


@pytest.mark.parametrize("code", LOCAL, ids=[f"example{i}" for i in range(len(LOCAL))])
def test_readme_example_runs(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BROKERLOCK_URL", f"sqlite:///{tmp_path}/default.sqlite3")
    monkeypatch.chdir(tmp_path)  # examples that name a relative path write here
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip(), "every example shows what it did"


def test_readme_is_valid_restructuredtext() -> None:
    """PyPI refuses a long description that does not render; catch it here."""
    import docutils.core

    docutils.core.publish_doctree(
        README.read_text(encoding="utf-8"), settings_overrides={"halt_level": 2, "report_level": 2}
    )


def test_readme_links_name_pages_that_exist() -> None:
    """Every documentation link in the README names a page of docs/."""
    text = README.read_text(encoding="utf-8")
    pages = re.findall(r"https://brokerlock\.readthedocs\.io/en/latest/([\w-]+)\.html", text)
    assert len(pages) >= 5
    missing = [p for p in pages if not (ROOT / "docs" / f"{p}.rst").exists()]
    assert not missing, f"README links to pages docs/ does not have: {missing}"
