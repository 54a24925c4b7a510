"""Ruff and mypy, as configured in pyproject.toml, pass on the code (the tools come from the
environment that runs the tests: the `test` extra installs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    result = run_tool("ruff", "check", "--output-format", "concise", "ocifs", "tests", "scripts")
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"


def test_mypy() -> None:
    result = run_tool("mypy", "ocifs")
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
