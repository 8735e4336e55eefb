"""``python -m unsloth_qwen_compat conformance --report DIR [pytest args]``: the GPU conformance suite.

It runs ``python -m conformance --report DIR [pytest args]`` in a child process. The suite
ships as the ``conformance`` package of the ``unsloth-qwen-compat[conformance]`` extra and
imports the shim and Unsloth itself, in the order it checks, so this process imports
neither of them, nor the suite. The child works in a scratch directory: Unsloth writes its
compile cache (``unsloth_compiled_cache/``) into the working directory. Standard library
only, so that ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

INSTALL_HINT = "pip install 'unsloth-qwen-compat[conformance]'"

DESCRIPTION = (
    "Run the conformance suite (tiny random Qwen models through Unsloth with the shim, against "
    "a Hugging Face reference computed in a process without Unsloth) on this environment's "
    "Unsloth, transformers and PEFT, and write its report: an upgrade canary. Meant for a CUDA "
    "GPU; without one the suite's mechanics run on Unsloth's CPU fallback and the numbers say "
    "nothing about Unsloth's kernels. Exits with pytest's exit code."
)

#: What the suite needs beside torch, Unsloth and this package, by import name: the
#: ``conformance`` package itself and what the extra installs.
SUITE_MODULES = ("conformance", "pytest", "transformers", "peft", "tokenizers", "safetensors", "accelerate")

#: The directory holding this package: a checkout's root (a pyproject.toml beside the
#: package), or site-packages.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report",
        metavar="DIR",
        required=True,
        help="write DIR/conformance.md and DIR/conformance.json (created if missing)",
    )
    parser.epilog = (
        "Other arguments go to pytest, e.g. -x -q, -m rope, -k qwen3, -n 2 (pytest-xdist). The "
        "suite runs in a scratch working directory: give paths among them absolute (test files "
        f"ending in .py are made absolute here). Needs the suite: {INSTALL_HINT}. "
        "UNSLOTH_QWEN_COMPAT_DISABLE=1 measures stock Unsloth; CONFORMANCE_CACHE, CONFORMANCE_DTYPE "
        "as in the suite's README."
    )


def child_environment() -> dict[str, str]:
    """This process's environment; from a checkout, with the checkout first on PYTHONPATH.

    The child runs elsewhere, so a checkout that this process imports through its working
    directory must be named; an install is found by the child as it was found here.
    """
    env = dict(os.environ)
    if (PACKAGE_PARENT / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
    return env


def missing_modules(env: dict[str, str], cwd: str) -> list[str]:
    """The suite's modules that a child with ``env`` in ``cwd`` cannot import (looked up only)."""
    code = (
        "import importlib.util, sys\n"
        "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *SUITE_MODULES],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    # A lookup that failed to run says nothing: the suite's own run then shows why.
    return done.stdout.split() if done.returncode == 0 else []


def absolute_test_paths(pytest_args: list[str], cwd: Path) -> list[str]:
    """Test files (``x.py``, ``x.py::case``) that exist under ``cwd``, made absolute for the child."""
    out = []
    for arg in pytest_args:
        path, sep, node = arg.partition("::")
        if not arg.startswith("-") and path.endswith(".py") and (cwd / path).is_file():
            arg = str((cwd / path).resolve()) + sep + node
        out.append(arg)
    return out


def _exit_code(returncode: int) -> int:
    # A child killed by a signal reads as the shell writes it (128 + the signal's number).
    return returncode if returncode >= 0 else 128 - returncode


def run(report: str, pytest_args: list[str]) -> int:
    """Run the suite; its report goes to ``report``; pytest's exit code."""
    here = Path.cwd()
    report_dir = (here / Path(report).expanduser()).resolve()
    env = child_environment()
    with tempfile.TemporaryDirectory(prefix="unsloth-qwen-compat-conformance-") as scratch:
        missing = missing_modules(env, scratch)
        if missing:
            print(
                f"the conformance suite needs {', '.join(missing)}, not importable here; "
                f"install it with: {INSTALL_HINT}",
                file=sys.stderr,
            )
            return 2
        command = [
            sys.executable,
            "-m",
            "conformance",
            "--report",
            str(report_dir),
            *absolute_test_paths(pytest_args, here),
        ]
        print(f"running: {' '.join(command[1:])}  (in {scratch})", file=sys.stderr, flush=True)
        child = subprocess.Popen(command, cwd=scratch, env=env)
        try:
            returncode = child.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too (one process group): pytest stops and still writes
            # the report of what ran, which is worth waiting for.
            returncode = child.wait()
    written = [report_dir / name for name in ("conformance.md", "conformance.json")]
    if all(path.is_file() for path in written):
        print(f"conformance report: {written[0]} and {written[1]} (pytest exit {returncode})")
    else:
        print(f"conformance report: none written to {report_dir} (pytest exit {returncode})")
    return _exit_code(returncode)
