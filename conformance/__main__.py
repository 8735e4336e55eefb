"""``python -m conformance [--report DIR] [pytest args]``: run the suite, optionally write the report.

Equivalent to ``pytest conformance/ --conformance-report DIR [pytest args]``. Installed
(``unsloth-qwen-compat[conformance]``, no checkout around it), the suite brings its own
pytest settings and keeps pytest's cache in the conformance cache, out of site-packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from conformance import zoo

SUITE = Path(__file__).resolve().parent
INSTALLED_INI = SUITE / "installed.ini"


def _names_tests(args: list[str]) -> bool:
    """True when the pytest args already select files or node ids (then don't add the suite dir)."""
    return any(not a.startswith("-") and ("::" in a or os.path.exists(a.split("::")[0])) for a in args)


def _installed_args(args: list[str]) -> list[str]:
    """pytest settings for a suite outside a checkout, where the caller's args leave them open.

    pytest would look for its settings above site-packages, make site-packages the rootdir
    and write ``.pytest_cache/`` there. The rootdir stays the package's parent, so test ids
    read ``conformance/test_x.py::case`` as in a checkout.
    """
    names = {a.split("=", 1)[0] for a in args}
    extra = []
    if not names & {"-c", "--config-file"}:
        extra += ["-c", str(INSTALLED_INI)]
    if "--rootdir" not in names:
        extra += ["--rootdir", str(zoo.PACKAGE_PARENT)]
    # First, so that a caller's own -o cache_dir=... (later) wins.
    return [*extra, "-o", f"cache_dir={zoo.cache_root() / 'pytest'}"]


def _parallel_args(args: list[str]) -> list[str]:
    """Cases in parallel processes on the one GPU (pytest-xdist), unless the caller chose.

    The models are tiny and the card is large: a leg is bound by Python and kernel launches,
    so CONFORMANCE_WORKERS processes (default: three quarters of the CPU cores, 2 to 12, on a
    GPU; none on CPU) share it, each with its share of the cores for torch's threads
    (conftest.py). On one H200 machine (16 cores: 12 workers) the whole leg 2026.10 ended in
    230 s that way, compile caches warm (conformance/README.md, "How long it takes"). They share
    one oracle cache (oracle_client.py computes each reference once, under a lock);
    ``--dist loadgroup`` keeps each RoPE-grid family's batch in one process.
    """
    names = {a.split("=", 1)[0] for a in args}
    if names & {"-n", "--numprocesses", "--dist"} or any(
        a.startswith("-n") and a[2:].isdigit() for a in args
    ):
        return []
    if "no:xdist" in args or importlib.util.find_spec("xdist") is None:
        return []
    workers = os.environ.get("CONFORMANCE_WORKERS")
    if workers is None:
        import torch

        workers = str(min(12, max(2, (os.cpu_count() or 4) * 3 // 4))) if torch.cuda.is_available() else "0"
    if not workers.isdigit():
        raise SystemExit(f"CONFORMANCE_WORKERS={workers!r}: expected a number of processes (0: none)")
    return ["-n", workers, "--dist", "loadgroup"] if int(workers) > 0 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description=__doc__,
        epilog="Other arguments are passed to pytest (e.g. -x -q -m rope -k qwen3).",
    )
    parser.add_argument("--report", metavar="DIR", help="write DIR/conformance.json and DIR/conformance.md")
    args, rest = parser.parse_known_args(argv)
    pytest_args = list(rest) if _names_tests(rest) else [str(SUITE), *rest]
    pytest_args += _parallel_args(rest)
    if args.report:
        pytest_args += ["--conformance-report", args.report]
    if zoo.CHECKOUT is None:
        pytest_args = _installed_args(pytest_args) + pytest_args
    return int(pytest.main(pytest_args))


if __name__ == "__main__":
    sys.exit(main())
