"""The code stays as clean as its tools say: ruff (lint and format) and mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_lint() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_setup_cfg_holds_only_what_pyproject_cannot_and_agrees_with_ruff() -> None:
    import configparser
    import tomllib

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    # Editor linters only: no build or metadata (pyproject.toml's job), no
    # settings of a tool that reads pyproject.toml.
    assert set(cfg.sections()) == {"pycodestyle", "flake8"}
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    for section in cfg.sections():
        assert cfg.getint(section, "max-line-length") == ruff["line-length"], section
