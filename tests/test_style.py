"""House style, checked like everything else: ruff for Python, clang-format for C++ and CUDA."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_python_style(check):
    result = run(sys.executable, "-m", "ruff", *check, "python", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("clang-format") is None,
    reason="clang-format is not installed (scripts/setup.sh installs it)",
)
def test_cpp_style():
    sources = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "cpp").rglob("*") if p.suffix in {".cpp", ".hpp", ".cu"}
    )
    result = run("clang-format", "--dry-run", "-Werror", *sources)
    assert result.returncode == 0, result.stderr[-3000:]
