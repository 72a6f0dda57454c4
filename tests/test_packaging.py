"""The development install (`make run`, `make test`): no setuptools warning, no shadowing by a `netpool` folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_netpool_folder_beside_a_script_does_not_hide_the_package(tmp_path: Path) -> None:
    """A user's folder named ``netpool`` (no ``__init__.py``) next to their script used to win the import.

    The editable install's import hook came after the folder on the path, so
    ``import netpool`` gave an empty namespace package and the first use
    failed with "module 'netpool' has no attribute 'Connection'".
    """
    (tmp_path / "netpool").mkdir()
    script = tmp_path / "server.py"
    script.write_text("import netpool\nprint(netpool.Connection.__name__, netpool.__file__)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    name, path = result.stdout.split()
    assert name == "Connection" and Path(path) == ROOT / "netpool" / "__init__.py"


def test_the_editable_install_is_a_plain_path_entry_without_warnings(tmp_path: Path) -> None:
    """What `make` installs: a .pth path entry, not setuptools' import hook and its "same name" warning."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests",
        "*.so", "bench", "docs"))
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         f"from setuptools import build_meta; print(build_meta.build_editable({str(out)!r}))"],
        cwd=src, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert "same name as your package" not in build.stdout + build.stderr, build.stderr
    (wheel,) = out.glob("netpool-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        (pth,) = [n for n in whl.namelist() if n.endswith(".pth")]
        assert whl.read(pth).decode().split() == [str(src)]
        assert not [n for n in whl.namelist() if "finder" in n], whl.namelist()
