"""``python -m conformance [--report DIR] [pytest args]``: run the suite, optionally write the report.

Equivalent to ``pytest conformance/ --conformance-report DIR [pytest args]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent


def _names_tests(args: list[str]) -> bool:
    """True when the pytest args already select files or node ids (then don't add the suite dir)."""
    return any(not a.startswith("-") and ("::" in a or os.path.exists(a.split("::")[0])) for a in args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description=__doc__,
        epilog="Other arguments are passed to pytest (e.g. -x -q -m rope -k qwen3).",
    )
    parser.add_argument("--report", metavar="DIR", help="write DIR/conformance.json and DIR/conformance.md")
    args, rest = parser.parse_known_args(argv)
    pytest_args = list(rest) if _names_tests(rest) else [str(SUITE), *rest]
    if args.report:
        pytest_args += ["--conformance-report", args.report]
    return int(pytest.main(pytest_args))


if __name__ == "__main__":
    sys.exit(main())
