"""Every input the fuzzers ever crashed on, kept as a regression; every seed; and a short
run of each fuzz target, so CI exercises them (``fuzz/run.py`` runs them longer).

A file in ``fuzz/regressions/<target>/`` is one crashing input, named for what it
is; ``check`` of ``fuzz/<target>_target.py`` must now accept it. The short run
needs atheris: without it the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS = ("jwt", "config")
#: Seconds each target runs here (``AUTHPROXY_FUZZ_SECONDS`` to change it).
SECONDS = int(os.environ.get("AUTHPROXY_FUZZ_SECONDS", "20"))


def _inputs(kind: str) -> list[tuple[str, Path]]:
    return [
        (target, path)
        for target in TARGETS
        for path in sorted((FUZZ / kind / target).glob("*"))
        if path.is_file()
    ]


def _check(target: str, data: bytes) -> None:
    module = importlib.import_module(f"fuzz.{target}_target")
    module.check(data)


REGRESSIONS = _inputs("regressions")


def test_the_regressions_are_there() -> None:
    """One per bug the fuzzers found (see the commits that fixed them)."""
    names = {f"{target}/{path.name}" for target, path in REGRESSIONS}
    assert names >= {
        "config/upstream-url-bad-ipv6",
        "config/upstream-host-requests-cannot-parse",
        "jwt/cookie-not-utf8",
        "jwt/key-set-oct-without-k",
        "jwt/claim-with-a-lone-surrogate",
    }


@pytest.mark.parametrize(
    ("target", "path"), REGRESSIONS, ids=[f"{t}/{p.name}" for t, p in REGRESSIONS]
)
def test_a_crash_found_by_fuzzing_stays_fixed(target: str, path: Path) -> None:
    _check(target, path.read_bytes())


SEEDS = _inputs("seeds")


@pytest.mark.parametrize(("target", "path"), SEEDS, ids=[f"{t}/{p.name}" for t, p in SEEDS])
def test_the_seeds_pass(target: str, path: Path) -> None:
    _check(target, path.read_bytes())


def test_a_seed_token_passes_the_identity_step() -> None:
    """The claims seed is accepted, so the fuzzer starts past the signature check."""
    from fuzz import jwt_target as fuzz_jwt

    statuses: list[str] = []
    identity, key = fuzz_jwt._setup()
    token = fuzz_jwt._signed(key, (FUZZ / "seeds" / "jwt" / "claims").read_bytes()[1:])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", fuzz_jwt.HEADER_KEY: token}
    identity(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["200 OK"]


def _atheris_or_skip() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("atheris is not installed (pip install atheris); CI runs this")


@pytest.mark.parametrize("target", TARGETS)
def test_the_fuzz_target_runs_clean_for_a_while(target: str, tmp_path: Path) -> None:
    _atheris_or_skip()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            "--seconds",
            str(SECONDS),
            "--workdir",
            str(tmp_path),
            target,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS + 300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"fuzz {target}: clean; Done " in result.stdout
