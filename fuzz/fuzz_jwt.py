"""The atheris entry point of :mod:`fuzz.jwt_target` (only what is imported here is
instrumented, which keeps start-up to seconds).

    python -m fuzz.fuzz_jwt -max_total_time=30 CORPUS_DIR fuzz/seeds/jwt
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["authproxy", "jwt", "tomllib", "werkzeug", "fuzz"]):
    from fuzz.jwt_target import check


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
