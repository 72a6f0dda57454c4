"""The linters, as part of `make test`: ruff with the rules pinned in pyproject.toml, over everything we ship or run;
mypy with the settings there, over the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "netpool", "tests", "examples", "fuzz",
                             "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing(tmp_path: Path) -> None:
    """mypy over the package with the settings in pyproject.toml (strict for the public modules).

    Its cache goes to a fresh temporary folder, never into the repository:
    a cold run, about ten seconds.
    """
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
                            cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
