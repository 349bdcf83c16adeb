"""Run every fuzz target (or those named) for a bounded time; exit 1 if any crashed.

    python -m fuzz.run                 # each target for 30 s
    python -m fuzz.run --seconds 300 jwt

Each target starts from its seeds (``fuzz/seeds/<target>``) and its dictionary
(``fuzz/<target>.dict``, if any) and grows a corpus in ``<workdir>/corpus/<target>``
(default workdir: ``fuzz/work``, ignored by git). A crashing input is written to
``<workdir>/crashes/<target>/``: make it a regression by copying it to
``fuzz/regressions/<target>/<what-it-is>`` (``tests/test_fuzz_regressions.py``
runs every file there), then fix the code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("jwt", "config")


def run_target(target: str, seconds: int, workdir: Path) -> tuple[bool, str]:
    """Fuzz *target* for *seconds*; (clean, output)."""
    corpus = workdir / "corpus" / target
    crashes = workdir / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        f"fuzz.fuzz_{target}",
        f"-max_total_time={seconds}",
        "-timeout=20",  # seconds for one input
        "-rss_limit_mb=2048",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
    ]
    dictionary = HERE / f"{target}.dict"
    if dictionary.exists():
        command.append(f"-dict={dictionary}")
    command += [str(corpus), str(HERE / "seeds" / target)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 120,  # instrumenting takes a while; a hang is a failure too
    )
    output = "\n".join(
        line
        for line in (result.stdout + result.stderr).splitlines()
        if not line.startswith("INFO: Instrumenting")
    )
    found = sorted(p.name for p in crashes.iterdir())
    clean = result.returncode == 0 and not found
    if found:
        output += "\ncrashing inputs: " + ", ".join(str(crashes / name) for name in found)
    return clean, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=30, help="per target (default 30)")
    parser.add_argument("--workdir", type=Path, default=HERE / "work")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; expected some of {TARGETS}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    failed = []
    for target in args.targets or TARGETS:
        clean, output = run_target(target, args.seconds, args.workdir)
        stats = [line for line in output.splitlines() if line.startswith(("Done ", "stat::"))]
        print(f"fuzz {target}: {'clean' if clean else 'CRASHED'}; " + " ".join(stats[:1]))
        if not clean:
            print(output[-6000:])
            failed.append(target)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
