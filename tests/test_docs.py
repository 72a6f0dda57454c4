"""The API reference (docs/api, `make docs`) builds without a warning and documents every public name.

Built once per run into pytest's temporary directory (HTML and doctrees
both), so the test writes nothing into the checkout. About 6 seconds.
"""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import netpool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the reference as `make docs` does, with warnings as errors; returns the HTML folder."""
    out = tmp_path_factory.mktemp("docs")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(ROOT / "docs" / "api"), str(out / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, f"sphinx failed:\n{result.stdout}\n{result.stderr}"
    return out / "html"


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _text(fragment: str) -> str:
    """What a reader sees of an HTML fragment, whitespace collapsed."""
    parser = _Text()
    parser.feed(fragment)
    return " ".join(html.unescape("".join(parser.parts)).split())


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's description as help() shows it (the "Fields:" section netpool.field_docs appends)."""
    section = (cls.__doc__ or "").split("\nFields:\n", 1)[1]
    docs: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in section.splitlines():
        if line.startswith("    "):
            lines.append(line.strip())
        elif line.strip():  # "name = default" or "name (required)"
            lines = docs[re.split(r"[ =(]", line, maxsplit=1)[0]] = []
    # The reST markup the docstrings use for code (``x``) is gone in the HTML.
    return {name: " ".join(" ".join(lines).replace("``", "").split()) for name, lines in docs.items()}


def _entry(page: str, target: str) -> str:
    """The text of the documentation entry whose anchor is ``target`` (its signature and its description)."""
    start = page.index(f'id="{target}"')
    return _text(page[start:page.index("</dd>", start)])


@pytest.mark.parametrize("cls", [netpool.ListenerConfig, netpool.TLSConfig], ids=lambda cls: cls.__name__)
def test_every_settings_field_is_documented_with_its_description(built: Path, cls: type) -> None:
    page = (built / "listener.html").read_text(encoding="utf-8")
    docs = _field_docs(cls)
    assert set(docs) == {field.name for field in dataclasses.fields(cls)}
    for name, description in docs.items():
        assert description != "(undocumented)", f"{cls.__name__}.{name} has no docstring"
        entry = _entry(page, f"netpool.{cls.__name__}.{name}")
        assert description in entry, f"{cls.__name__}.{name}: {description!r} not in {entry!r}"


def test_settings_fields_appear_once(built: Path) -> None:
    # The docstring help() shows carries a copy of every field's text; the
    # reference drops it (docs/api/conf.py), as each field has its own entry.
    page = (built / "listener.html").read_text(encoding="utf-8")
    text = _text(page)
    description = _field_docs(netpool.ListenerConfig)["acceptor_nice"]
    assert text.count(description) == 1


def test_every_public_name_is_in_the_reference(built: Path) -> None:
    pages = "".join(path.read_text(encoding="utf-8") for path in built.glob("*.html"))
    missing = [name for name in netpool.__all__ if f'id="netpool.{name}"' not in pages]
    assert not missing, f"in netpool.__all__ but not in docs/api: {missing}"
